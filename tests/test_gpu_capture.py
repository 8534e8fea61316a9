"""On CUDA: every decode bucket, and padded batch sizes, give the same greedy tokens from graph
replay as from eager execution; for each architecture and attention backend."""

from __future__ import annotations

import pytest
import torch

from graphrt import Engine, SamplingParams
from graphrt.capture.buckets import bucket_for

pytestmark = pytest.mark.gpu

BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32)
HEAD64 = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, head_dim=64)
SIZES = sorted(set(BUCKETS) | {3, 5, 13})


def _backends() -> list:
    out = ["torch", "triton"]
    try:
        import flashinfer  # noqa: F401

        out.append("flashinfer")
    except ImportError:
        out.append(pytest.param("flashinfer", marks=pytest.mark.skip("flashinfer not installed")))
    return out


def _prompts(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(n)
    return [
        torch.randint(0, 256, (int(torch.randint(4, 60, (1,), generator=g)),), generator=g).tolist()
        for _ in range(n)
    ]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"])
def test_graph_replay_equals_eager(tiny_model_factory, arch: str, backend: str) -> None:
    # A larger init spread gives peaked logits, so bf16 rounding cannot flip near-ties; head_dim
    # 64 is one flashinfer compiles kernels for.
    d = tiny_model_factory(arch, initializer_range=0.3, **HEAD64)
    common = dict(
        show_progress=False,
        dtype="bfloat16",
        attention_backend=backend,
        max_model_len=256,
        overlap="off",
    )
    graph = Engine(str(d), cuda_graph_batch_sizes=BUCKETS, **common)
    eager = Engine(str(d), cuda_graph_max_bs=0, **common)
    assert graph.runner.graphs.captured and not eager.runner.graphs.captured
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    for n in SIZES:
        prompts = _prompts(n)
        before = graph.stats["graph_steps"]
        g = [o.outputs[0].token_ids for o in graph.generate(prompts, params)]
        e = [o.outputs[0].token_ids for o in eager.generate(prompts, params)]
        assert g == e, f"bs={n} (bucket {bucket_for(list(BUCKETS), n)})"
        assert graph.stats["graph_steps"] > before
    assert eager.stats["graph_steps"] == 0
    graph.shutdown()
    eager.shutdown()


def test_pdl_changes_no_token(tiny_model_factory) -> None:
    """Programmatic dependent launch changes when kernels start, never what they compute: graphs
    captured with it give exactly the tokens and logprobs of graphs captured without it. The
    shapes put every one-row linear layer on the GEMV (the down projection with SiLU fused)."""
    from graphrt.kernels.pdl import pdl_supported

    if not pdl_supported(torch.device("cuda")):
        pytest.skip("PDL needs sm_90")
    d = tiny_model_factory(
        "LlamaForCausalLM",
        initializer_range=0.3,
        hidden_size=512,
        intermediate_size=1024,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        vocab_size=1024,
    )
    common = dict(
        show_progress=False, dtype="bfloat16", max_model_len=256, cuda_graph_batch_sizes=BUCKETS
    )
    on = Engine(str(d), pdl=True, **common)
    off = Engine(str(d), pdl=False, **common)
    assert on.runner.settings.pdl and on.runner.ops.pdl and not off.runner.settings.pdl
    # The greedy graphs (argmax only), then the full-sampler graphs (logprobs).
    for lp in (None, 2):
        params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=lp)
        for n in (1, 3, 8, 13):
            prompts = _prompts(n)
            a = [o.outputs[0] for o in on.generate(prompts, params)]
            b = [o.outputs[0] for o in off.generate(prompts, params)]
            assert [x.token_ids for x in a] == [x.token_ids for x in b], f"bs={n} lp={lp}"
            lp_a = [x.cumulative_logprob for x in a]
            assert lp_a == [x.cumulative_logprob for x in b], f"bs={n}"
    assert on.stats["graph_steps"] > 0
    on.shutdown()
    off.shutdown()


EVERYTHING_PARAMS = dict(top_k=20, top_p=0.9, min_p=0.05, logprobs=3)


@pytest.mark.parametrize("extra", [EVERYTHING_PARAMS, {}], ids=["everything", "sampled"])
def test_sampled_graph_replay_equals_eager(tiny_model_factory, extra) -> None:
    """Graph replay equals eager for the full sampler (filters, logprobs) and for the
    temperature-only ``SAMPLED`` variant (penalties and bans, no sort, no log-softmax)."""
    d = tiny_model_factory("LlamaForCausalLM", initializer_range=0.3)
    common = dict(show_progress=False, dtype="bfloat16", max_model_len=256, overlap="thread")
    graph = Engine(str(d), cuda_graph_batch_sizes=(4, 8), **common)
    eager = Engine(str(d), cuda_graph_max_bs=0, **common)
    params = SamplingParams(
        temperature=0.8, seed=3, repetition_penalty=1.2, max_tokens=10, ignore_eos=True, **extra
    )
    prompts = _prompts(5)
    g = graph.generate(prompts, params)
    e = eager.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in g] == [o.outputs[0].token_ids for o in e]
    graph.shutdown()
    eager.shutdown()


def test_capture_progress_and_memory_accounting(tiny_model_factory) -> None:
    d = tiny_model_factory("LlamaForCausalLM")
    eng = Engine(str(d), show_progress=False, dtype="bfloat16", cuda_graph_max_bs=64)
    r = eng.runner
    assert [s.bs for s in r.graphs.stats] == sorted(r.graphs.buckets, reverse=True)
    assert r.graph_memory_bytes >= 0
    assert eng.pages.num_usable > 0
    eng.shutdown()


def test_shutdown_frees_gpu_memory(tiny_model_factory) -> None:
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    eng = Engine(
        str(tiny_model_factory("LlamaForCausalLM")),
        show_progress=False,
        dtype="bfloat16",
        cuda_graph_max_bs=16,
        gpu_memory_utilization=0.3,
    )
    eng.generate([[1, 2, 3]] * 3)
    held = torch.cuda.memory_allocated() - before
    assert held > (1 << 20)
    eng.shutdown()
    import gc

    gc.collect()
    torch.cuda.synchronize()
    # Everything the engine owned is gone; a few MB of library workspaces may remain.
    assert torch.cuda.memory_allocated() - before < max(held // 20, 8 << 20)
    with pytest.raises(RuntimeError, match="shut down"):
        eng.add_request(None, [1, 2], None)


def test_structured_split_graphs_equal_eager(tiny_byte_model) -> None:
    """Decode steps with constrained rows replay the bucket's split graphs (forward, then the
    masked sampler once the host has the masks): the same tokens as eager steps, greedy and
    sampled, beside an unconstrained row."""
    pytest.importorskip("xgrammar")
    from graphrt import StructuredOutputsParams
    from graphrt.capture.graph_runner import LOGITS, MASKED_VARIANTS

    constraints = [
        StructuredOutputsParams(json={"type": "array", "items": {"type": "integer"}}),
        StructuredOutputsParams(regex=r"[a-z]{3,8}-[0-9]{2,5}"),
        StructuredOutputsParams(choice=["alpha", "beta", "gamma"]),
    ]
    params = [
        SamplingParams(temperature=t, seed=11, max_tokens=40, structured_outputs=so)
        for t in (0.0, 1.0)
        for so in constraints
    ]
    params.append(SamplingParams(temperature=1.0, seed=5, max_tokens=40, ignore_eos=True))
    prompts = ["json: ", "id: ", "pick: ", "a", "b", "c", "d"]
    common = dict(show_progress=False, dtype="bfloat16", max_model_len=256)
    graph = Engine(str(tiny_byte_model), cuda_graph_batch_sizes=(4, 8), **common)
    eager = Engine(str(tiny_byte_model), cuda_graph_max_bs=0, **common)
    try:
        keys = {k for _, k in graph.runner.graphs.graphs}
        assert LOGITS in keys and set(MASKED_VARIANTS) <= keys
        g = graph.generate(prompts, params)
        e = eager.generate(prompts, params)
        assert [o.outputs[0].token_ids for o in g] == [o.outputs[0].token_ids for o in e]
        assert not any(o.error for o in g)
        assert graph.stats["split_steps"] > 0 and eager.stats["split_steps"] == 0
    finally:
        graph.shutdown()
        eager.shutdown()
