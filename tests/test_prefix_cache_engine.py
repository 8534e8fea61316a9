"""The prefix cache through the whole engine (CPU, fp32, tiny random models): with the cache on,
every output equals the cache-off output, in every overlap mode, with chunked prefill,
preemption and eviction in a small KV pool, aborts, ``n > 1``, seeded sampling and logprobs."""

from __future__ import annotations

import random

import pytest

from graphrt import Engine, SamplingParams

MODES = ["thread", "inline", "off", "two_events"]


@pytest.fixture(scope="module")
def llama(tiny_model_factory):
    return tiny_model_factory("LlamaForCausalLM")


def _workload(seed: int = 0) -> list[tuple[str, list[int], SamplingParams, int | None]]:
    """(request id, prompt, params, step at which to abort it or None). Prompts share one of a
    few system prompts, and some repeat whole; about one in eight is aborted."""
    rng = random.Random(seed)
    systems = [[rng.randrange(3, 250) for _ in range(rng.randint(17, 45))] for _ in range(3)]
    out = []
    for i in range(36):
        prompt = list(rng.choice(systems)) if rng.random() < 0.8 else []
        prompt += [rng.randrange(3, 250) for _ in range(rng.randint(1, 20))]
        if i % 9 == 4:
            prompt = list(out[i - 1][1])  # a repeat: fully cached but for its last page
        kind = i % 4
        params = SamplingParams(
            max_tokens=rng.randint(4, 24),
            temperature=0.0 if kind in (0, 1) else 0.8,
            top_k=0 if kind != 3 else 20,
            seed=1000 + i,
            n=3 if i % 7 == 3 else 1,
            logprobs=2 if kind == 1 else None,
            ignore_eos=True,
        )
        abort_at = rng.randint(2, 40) if i % 8 == 5 else None
        out.append((f"r{i}", prompt, params, abort_at))
    return out


def _run(model, *, cache: bool, mode: str, **settings) -> tuple[dict, Engine]:
    eng = Engine(
        str(model),
        show_progress=False,
        overlap=mode,
        enable_prefix_caching=cache,
        max_num_batched_tokens=48,
        max_num_seqs=6,
        num_pages=16,  # 15 usable pages of 16 tokens: preemption and eviction happen
        **settings,
    )
    work = _workload()
    finals: dict[str, object] = {}
    pending = list(work)
    step = 0
    while pending or eng.has_unfinished():
        # Arrivals: a few each step, so later requests find earlier ones' pages.
        for rid, prompt, params, _ in pending[:3]:
            eng.add_request(rid, prompt, params, stream=False)
        pending = pending[3:]
        for rid, _, _, abort_at in work:
            if abort_at == step:
                eng.abort(rid)
        for out in eng.step():
            if out.finished:
                finals[out.request_id] = out
        step += 1
    eng._flush()
    return finals, eng


def _summary(out) -> list:
    return [
        (
            c.token_ids,
            c.finish_reason,
            [(t.token_id, [i for i, _ in t.top]) for t in c.logprobs or []],
        )
        for c in out.outputs
    ]


@pytest.mark.parametrize("mode", MODES)
def test_cache_on_equals_cache_off(llama, mode: str) -> None:
    off, eng_off = _run(llama, cache=False, mode=mode)
    on, eng = _run(llama, cache=True, mode=mode)
    aborted = {rid for rid, _, _, abort_at in _workload() if abort_at is not None}
    done = [rid for rid in off if rid not in aborted]
    assert len(done) > 25
    for rid in done:
        assert _summary(on[rid]) == _summary(off[rid]), rid
        for a, b in zip(on[rid].outputs, off[rid].outputs):
            for x, y in zip(a.logprobs or [], b.logprobs or []):
                assert x.logprob == pytest.approx(y.logprob, abs=1e-4)
    # The cache did its work: hits, a repeat served whole but for its last page, siblings
    # sharing, eviction and preemption in the small pool.
    s = eng.scheduler
    assert s.prefix_hits > 300 and s.prefix_hits < s.prefix_queries
    assert on["r4"].num_cached_tokens >= 16 and off["r4"].num_cached_tokens is None
    assert eng.pages.num_evicted > 0 and s.num_preemptions > 0
    # Everything was handed back, and the accounting holds.
    for e in (eng, eng_off):
        e.pages.check()
        assert e.pages.num_used == 0 and e.pages.num_free == e.pages.num_usable
        e.shutdown()


def test_num_cached_tokens_of_a_repeated_prompt(llama) -> None:
    eng = Engine(str(llama), show_progress=False)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompt = list(range(3, 3 + 40))  # two full pages and 8 tokens
    first = eng.generate([prompt], params)[0]
    again = eng.generate([prompt], params)[0]
    assert (first.num_cached_tokens, again.num_cached_tokens) == (0, 32)
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    # The next turn of a chat: the history with the reply. The page that the reply's first
    # eight tokens completed was cached too.
    turn = prompt + list(first.outputs[0].token_ids[:8]) + [7] * 4
    assert eng.generate([turn], params)[0].num_cached_tokens == 48
    salted = eng.add_request("s", prompt, params, stream=False, cache_salt="tenant")
    outs = eng.drain()
    assert salted == "s" and outs[-1].num_cached_tokens == 0
    eng.shutdown()


def test_cache_salt_must_be_a_string(llama) -> None:
    from graphrt import RequestRejected

    eng = Engine(str(llama), show_progress=False)
    with pytest.raises(RequestRejected, match="cache_salt"):
        eng.add_request("x", [1, 2, 3], SamplingParams(max_tokens=2), cache_salt=7)  # type: ignore[arg-type]
    eng.shutdown()


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["thread", "off"])
def test_cache_on_equals_cache_off_on_the_gpu(tiny_model_factory, mode: str) -> None:
    """The same on CUDA in bf16, with decode graphs and the Triton kernels: prefix pages that
    another request's step wrote, reached through page-table writes in eager steps and the
    graphs' ring. Greedy rows must agree exactly (a peaked init keeps bf16 rounding from
    flipping near-ties); sampled rows must finish."""
    d = tiny_model_factory(
        "LlamaForCausalLM", initializer_range=0.3, hidden_size=256, intermediate_size=512,
        num_attention_heads=4, head_dim=64,
    )  # fmt: skip
    gpu = dict(device="cuda", dtype="bfloat16", attention_backend="triton")
    off, eng_off = _run(d, cache=False, mode=mode, **gpu)
    on, eng = _run(d, cache=True, mode=mode, **gpu)
    assert eng.stats["graph_steps"] > 0 and eng.scheduler.prefix_hits > 300
    aborted = {rid for rid, _, _, abort_at in _workload() if abort_at is not None}
    greedy = {rid for rid, _, params, _ in _workload() if params.temperature == 0}
    for rid in off:
        if rid in aborted:
            continue
        assert on[rid].outputs[0].finish_reason == "length", rid
        if rid in greedy:
            assert [c.token_ids for c in on[rid].outputs] == [
                c.token_ids for c in off[rid].outputs
            ], rid
    for e in (eng, eng_off):
        e.pages.check()
        assert e.pages.num_used == 0
        e.shutdown()
