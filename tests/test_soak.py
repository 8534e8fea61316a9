"""Soak: thousands of requests with random arrivals, lengths, sampling parameters, stop ids,
aborts (also mid-stream) and forced preemption, in every overlap mode.

Every finished request's tokens must equal its reference: the same request run alone (greedy)
or with the same seed (sampled). Aborted requests must have received a prefix of it. The prefix
cache is on, as by default. At the end the page and slot allocators are full again (free or
cached), their accounting holds, and no request is left.
"""

from __future__ import annotations

import os
import random

import pytest

from graphrt import Engine, SamplingParams

N_REQUESTS = int(os.environ.get("GRAPHRT_SOAK_REQUESTS", 5000))
MODES = ["thread", "inline", "off", "two_events"]


def _combos(rng: random.Random, n: int) -> list[tuple[list[int], SamplingParams]]:
    """Distinct (prompt, params) pairs; requests reuse them with their own max_tokens/stops."""
    out = []
    for i in range(n):
        prompt = [rng.randrange(128) for _ in range(rng.randrange(1, 40))]
        kind = i % 4
        if kind == 0:
            params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
        elif kind == 1:
            params = SamplingParams(
                temperature=0.8, top_p=0.9, seed=i, max_tokens=24, ignore_eos=True
            )
        elif kind == 2:
            params = SamplingParams(
                temperature=1.0,
                top_k=8,
                min_p=0.02,
                seed=i,
                repetition_penalty=1.3,
                frequency_penalty=0.5,
                max_tokens=24,
                ignore_eos=True,
            )
        else:
            params = SamplingParams(
                temperature=0, presence_penalty=1.0, max_tokens=24, ignore_eos=True, logprobs=2
            )
        out.append((prompt, params))
    return out


@pytest.fixture(scope="module")
def soak_model(tmp_path_factory):
    from conftest import save_tiny_model

    d = tmp_path_factory.mktemp("soak")
    return save_tiny_model(
        d,
        "LlamaForCausalLM",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=128,
        max_position_embeddings=128,
    )


@pytest.fixture(scope="module")
def references(soak_model):
    rng = random.Random(0)
    combos = _combos(rng, 96)
    eng = Engine(str(soak_model), show_progress=False, overlap="off", max_num_seqs=1)
    refs = [eng.generate([p], sp)[0].outputs[0].token_ids for p, sp in combos]
    eng.shutdown()
    return combos, refs


def _expected(ref: list[int], max_tokens: int, stop_ids: tuple[int, ...]) -> list[int]:
    out = ref[:max_tokens]
    for i, t in enumerate(out):
        if t in stop_ids:
            return out[: i + 1]
    return out


@pytest.mark.parametrize("mode", MODES)
def test_soak(soak_model, references, mode: str) -> None:
    combos, refs = references
    rng = random.Random(MODES.index(mode))
    # A pool of 160 pages of 4 tokens (640 tokens) for up to 48 running requests of up to 64
    # tokens each: preemption is forced all the time.
    eng = Engine(
        str(soak_model),
        show_progress=False,
        overlap=mode,
        max_num_seqs=48,
        num_pages=161,
        page_size=4,
        max_num_batched_tokens=256,
        max_waiting_requests=N_REQUESTS,
    )
    live: dict[str, dict] = {}
    done = aborted = 0
    submitted = 0
    step = 0
    while submitted < N_REQUESTS or live:
        for _ in range(rng.randrange(0, 16) if submitted < N_REQUESTS else 0):
            if submitted == N_REQUESTS:
                break
            c = rng.randrange(len(combos))
            prompt, base = combos[c]
            stop = (rng.randrange(128),) if rng.random() < 0.3 else ()
            params = base.replace(max_tokens=rng.randrange(1, 25), stop_token_ids=stop)
            rid = f"r{submitted}"
            eng.add_request(rid, prompt, params)
            live[rid] = {
                "ref": _expected(refs[c], params.max_tokens, stop),
                "got": [],
                "abort_at": step + rng.randrange(1, 30) if rng.random() < 0.1 else None,
            }
            submitted += 1
        for out in eng.step():
            st = live[out.request_id]
            st["got"] += out.outputs[0].delta_token_ids
            if out.finished:
                assert out.error is None, out.error
                assert st["got"] == st["ref"], out.request_id
                del live[out.request_id]
                done += 1
        for rid in [r for r, st in live.items() if st["abort_at"] == step]:
            assert eng.abort(rid)
            st = live.pop(rid)
            assert st["got"] == st["ref"][: len(st["got"])], rid
            aborted += 1
        step += 1
        assert step < 20 * N_REQUESTS, "no progress"
    eng.drain()
    assert done + aborted == N_REQUESTS and aborted > N_REQUESTS // 50
    assert eng.scheduler.num_preemptions > N_REQUESTS // 100
    # The prefix cache is on (the default): prompts repeat, so it hit, and the small pool
    # evicted. Every page is free or cached again, and the accounting holds.
    assert eng.config.enable_prefix_caching
    assert eng.scheduler.prefix_hits > N_REQUESTS and eng.pages.num_evicted > N_REQUESTS // 10
    eng.pages.check()
    assert eng.pages.num_used == 0
    assert eng.pages.num_free == eng.pages.num_usable
    assert eng.slots.num_free == eng.slots.num_usable
    assert not eng.scheduler.running and not eng.scheduler.waiting and not eng.has_unfinished()
    eng.shutdown()
