"""Steps that carry prefill tokens, through the mixed step function the CUDA graphs capture
(token buckets, padding, the ring's mixed layout), exercised on CPU; and, on CUDA, captured
mixed graphs against eager steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from graphrt import Engine, SamplingParams
from graphrt.capture.mixed_graph_runner import (
    MixedGraphSpec,
    default_token_buckets,
    token_pad_waste,
)
from graphrt.capture.static_buffers import (
    M_CU_Q,
    M_IDS,
    M_OUT_SLOTS,
    M_POSITIONS,
    M_SEQ_LENS,
    M_SLOTS,
    M_TOKEN_SLOTS,
    M_UPDATES,
    MIXED_ROWS,
    fill_mixed_inputs,
)
from graphrt.memory.page_allocator import DUMMY_PAGE, DUMMY_SLOT
from graphrt.runner import largest_step_rows
from graphrt.step_plan import StepPlan

ARCHS = ["LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"]


def test_default_token_buckets() -> None:
    b = default_token_buckets(2048)
    assert b[:16] == list(range(16, 257, 16))
    assert b[16:] == [384, 512, 768, 1024, 1536, 2048]
    assert default_token_buckets(100) == [16, 32, 48, 64, 80, 96, 100]
    assert default_token_buckets(5000)[-3:] == [3072, 4096, 5000]
    assert default_token_buckets(0) == []


def test_token_pad_waste() -> None:
    assert token_pad_waste([16, 32], np.array([16, 32])) == 0.0
    assert token_pad_waste([16, 32], np.array([24])) == pytest.approx(0.25)


def _plan(query_lens: list[int], slots: list[int], seq_lens: list[int], updates=None) -> StepPlan:
    t = sum(query_lens)
    ids = np.arange(100, 100 + t, dtype=np.int64)
    ids[0] = -1  # a decode row's token, from the token buffer
    positions = np.concatenate([np.arange(s - q, s) for q, s in zip(query_lens, seq_lens)]).astype(
        np.int64
    )
    b = len(slots)
    return StepPlan(
        step_id=1,
        is_decode=False,
        requests=[None] * b,  # type: ignore[list-item]
        samples=np.ones(b, dtype=bool),
        slots=np.array(slots, dtype=np.int64),
        out_slots=np.array([s if i != 2 else DUMMY_SLOT for i, s in enumerate(slots)]),
        seq_lens=np.array(seq_lens, dtype=np.int64),
        query_lens=np.array(query_lens, dtype=np.int64),
        input_ids=ids,
        positions=positions,
        page_updates=np.zeros((3, 0), dtype=np.int64) if updates is None else updates,
    )


def test_fill_mixed_inputs_pads_tokens_rows_and_offsets() -> None:
    """Real tokens and rows first; padding tokens are id 0 at position 0 in the dummy slot,
    padding rows feed no token (their offsets repeat the real token count) and sample into the
    dummy slot, and only the given page writes are marked."""
    staging = np.full((MIXED_ROWS, 40), 77, dtype=np.int64)  # stale values of an older step
    upd = np.array([[3, 5], [0, 1], [9, 12]], dtype=np.int64)
    plan = _plan([1, 6, 2], slots=[3, 5, 7], seq_lens=[30, 6, 18], updates=upd)
    fill_mixed_inputs(staging, plan, tokens=16, rows=16, page_updates=upd)
    assert staging[M_IDS, :9].tolist() == plan.input_ids.tolist()
    assert (staging[M_IDS, 9:16] == 0).all() and (staging[M_POSITIONS, 9:16] == 0).all()
    assert staging[M_POSITIONS, :9].tolist() == [29, 0, 1, 2, 3, 4, 5, 16, 17]
    assert staging[M_TOKEN_SLOTS, :16].tolist() == [3] + [5] * 6 + [7] * 2 + [DUMMY_SLOT] * 7
    assert staging[M_SLOTS, :16].tolist() == [3, 5, 7] + [DUMMY_SLOT] * 13
    assert staging[M_OUT_SLOTS, :4].tolist() == [3, 5, DUMMY_SLOT, DUMMY_SLOT]
    assert staging[M_SEQ_LENS, :4].tolist() == [30, 6, 18, 0]
    assert staging[M_CU_Q, :17].tolist() == [0, 1, 7, 9] + [9] * 13
    assert staging[M_UPDATES:, :2].tolist() == upd.tolist()
    assert (staging[M_UPDATES, 2:17] == -1).all()
    assert (staging[:, 17:] == 77).all()  # past the bucket's columns: not this step's


def test_bucket_for_needs_tokens_and_rows() -> None:
    from graphrt.capture.mixed_graph_runner import MixedGraphRunner

    spec = MixedGraphSpec(buckets=(16, 32, 64), max_num_seqs=20, max_logprobs=0)
    assert [spec.rows_for(t) for t in spec.buckets] == [16, 20, 20]
    r = MixedGraphRunner.__new__(MixedGraphRunner)
    r.spec, r.buckets = spec, list(spec.buckets)
    assert r.bucket_for(_plan([1, 6, 2], [3, 5, 7], [30, 6, 18])) == 16
    assert r.bucket_for(_plan([17], [3], [17])) == 32
    assert r.bucket_for(_plan([65], [3], [65])) is None  # above the largest: eager


def _engines(d, **kw) -> tuple[Engine, Engine]:
    common = dict(show_progress=False, max_model_len=256, max_num_batched_tokens=48, **kw)
    on = Engine(str(d), **common)
    off = Engine(str(d), cuda_graph_max_tokens=0, **common)
    assert on.runner.mixed_graphs is not None and off.runner.mixed_graphs is None
    return on, off


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, 250, (int(torch.randint(1, 90, (1,), generator=g)),), generator=g).tolist()
        for _ in range(n)
    ]


@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_step_function_equals_eager(tiny_model_factory, arch: str) -> None:
    """Chunked prefills (48-token budget, prompts up to 90 tokens), decode rows among them and
    a fully cached prompt: the padded mixed step function gives the eager steps' tokens and
    logprobs, greedy and sampled."""
    d = tiny_model_factory(arch)
    on, off = _engines(d)
    prompts = _prompts(12)
    prompts.append(list(prompts[0]))  # all cached but its last token
    for params in (
        SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=6, ignore_eos=True),
    ):
        a = [o.outputs[0] for o in on.generate(prompts, params)]
        b = [o.outputs[0] for o in off.generate(prompts, params)]
        assert [x.token_ids for x in a] == [x.token_ids for x in b]
        lp_a = [x.cumulative_logprob or 0.0 for x in a]
        lp_b = [x.cumulative_logprob or 0.0 for x in b]
        np.testing.assert_allclose(lp_a, lp_b, rtol=1e-4, atol=1e-4)
    assert on.stats["mixed_graph_steps"] > 5 and off.stats["mixed_graph_steps"] == 0
    on.shutdown()
    off.shutdown()


@pytest.mark.parametrize(
    ("max_tokens", "max_num_seqs", "max_len", "want"),
    [
        (2048, 256, 131072, [8] * 256),  # the token budget, over every row
        (2048, 1, 384, [384]),  # one row: no longer than its page-table row holds
        (2048, 4, 300, [300] * 4),  # 4 rows of at most 300 hold 1,200 tokens
        (10, 4, 100, [3, 3, 2, 2]),  # the remainder spread, no row above the others + 1
        (3, 8, 100, [1, 1, 1]),  # never more rows than tokens
    ],
)
def test_largest_step_rows(max_tokens: int, max_num_seqs: int, max_len: int, want) -> None:
    """The memory-profiling step is the largest the scheduler can form. A row longer than
    max_model_len made the attention kernel read past its page-table row: an illegal memory
    access on the H100 (Llama-3.1-8B, max_num_seqs 1, max_model_len 384)."""
    q = largest_step_rows(max_tokens, max_num_seqs, max_len)
    assert q.tolist() == want
    assert q.max() <= max_len and len(q) <= max_num_seqs


def test_mixed_buckets_stop_at_the_largest_step(tiny_model_factory) -> None:
    """No step holds more than max_num_seqs rows of max_model_len tokens: no bucket above it."""
    d = tiny_model_factory("LlamaForCausalLM")
    eng = Engine(str(d), show_progress=False, max_model_len=64, max_num_seqs=2)
    spec = eng.runner.mixed_graph_spec()
    assert spec is not None and spec.buckets[-1] == 128
    eng.shutdown()


def test_padding_tokens_write_only_the_dummy_page(tiny_model_factory) -> None:
    """A 5-token prompt runs in the 16-token bucket: its 11 padding tokens write their K/V to
    the dummy page and nowhere else; the one real page is the only other page written."""
    d = tiny_model_factory("LlamaForCausalLM")
    eng = Engine(str(d), show_progress=False, max_model_len=256, enable_prefix_caching=False)
    kv = eng.runner.kv
    for cache in (*kv.k, *kv.v):
        cache.fill_(7.0)
    out = eng.generate([[5, 6, 7, 8, 9]], SamplingParams(temperature=0, max_tokens=1))
    assert len(out[0].outputs[0].token_ids) == 1
    assert eng.stats["mixed_graph_steps"] == 1 and eng.stats["steps"] == 1
    written = set()
    for cache in (*kv.k, *kv.v):
        changed = (cache != 7.0).flatten(1).any(dim=1)
        written |= set(torch.nonzero(changed).flatten().tolist())
    assert DUMMY_PAGE in written  # the padding went somewhere: the dummy page
    assert len(written - {DUMMY_PAGE}) == 1  # and the prompt's own page is the only other
    eng.shutdown()


def test_long_cached_prefix_page_writes_outside_the_ring(tiny_model_factory) -> None:
    """A request that maps a long cached prefix writes more page-table entries than its
    bucket's ring columns hold (one token left to compute: bucket 16, 17 columns): the writes
    go ahead of the replay instead, and the tokens match the eager engine."""
    d = tiny_model_factory("LlamaForCausalLM")
    common = dict(show_progress=False, max_model_len=512, page_size=4)
    on = Engine(str(d), **common)
    off = Engine(str(d), cuda_graph_max_tokens=0, **common)
    prompt = list(range(3, 3 + 4 * 30 + 1))  # 30 full pages, then one token
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    for eng in (on, off):
        eng.generate([prompt], params)  # fills the cache
    a = on.generate([prompt], params)[0]
    b = off.generate([prompt], params)[0]
    assert a.num_cached_tokens == 120 and a.outputs[0].token_ids == b.outputs[0].token_ids
    on.shutdown()
    off.shutdown()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("arch", ARCHS)
def test_captured_mixed_graphs_equal_eager_on_the_gpu(tiny_model_factory, arch, dtype) -> None:
    """On CUDA with the Triton backend: captured mixed graphs (every token bucket up to a
    96-token budget, padded rows and tokens, decode rows among prefill chunks) against eager
    steps. The two run decode rows of a mixed step through different kernels (the graph's
    decode kernel, eager's extend kernel below its split threshold), so they round differently:
    in fp32 every greedy id must match; in bf16, where a near-tie may flip a later token, every
    first token must match and logprobs agree within bf16 tolerance."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    d = tiny_model_factory(arch, initializer_range=0.3)
    common = dict(
        show_progress=False,
        dtype=dtype,
        attention_backend="triton",
        max_model_len=256,
        max_num_batched_tokens=96,
        cuda_graph_batch_sizes=(1, 2, 4, 8, 16, 32),
    )
    on = Engine(str(d), **common)
    off = Engine(str(d), cuda_graph_max_tokens=0, **common)
    assert on.runner.mixed_graphs.captured
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1)
    for n, seed in ((1, 0), (5, 1), (24, 2)):
        prompts = _prompts(n, seed)
        a = [o.outputs[0] for o in on.generate(prompts, params)]
        b = [o.outputs[0] for o in off.generate(prompts, params)]
        if dtype == "float32":
            assert [x.token_ids for x in a] == [x.token_ids for x in b], f"n={n}"
            lp_a = [x.cumulative_logprob for x in a]
            np.testing.assert_allclose(lp_a, [x.cumulative_logprob for x in b], atol=1e-3)
        else:
            assert [x.token_ids[0] for x in a] == [x.token_ids[0] for x in b], f"n={n}"
            first_a = [x.logprobs[0].logprob for x in a]
            first_b = [x.logprobs[0].logprob for x in b]
            np.testing.assert_allclose(first_a, first_b, atol=0.05)
    assert on.stats["mixed_graph_steps"] > 0 and off.stats["mixed_graph_steps"] == 0
    io = on.runner.mixed_graphs.io
    assert io.next == int(io.pos.item())  # every replay advanced both counts
    on.shutdown()
    off.shutdown()
