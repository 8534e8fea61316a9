"""Engine behaviour on CPU: batch invariance, chunked prefill, preemption, overlap modes,
streaming, stop conditions, n > 1, aborts, rejections and page accounting."""

from __future__ import annotations

import random

import pytest

from graphrt import Engine, RequestRejected, SamplingParams

MODES = ["off", "inline", "thread", "two_events"]


def _prompts(seed: int = 0, n: int = 6) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(rng.randrange(3, 70))] for _ in range(n)]


def _greedy(max_tokens: int = 12) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def _engine(model_dir, **kw) -> Engine:
    kw.setdefault("overlap", "off")
    return Engine(str(model_dir), show_progress=False, **kw)


def _ids(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def llama(tiny_model_factory):
    return tiny_model_factory("LlamaForCausalLM")


@pytest.fixture(scope="module")
def alone(llama) -> list[list[int]]:
    """Each prompt generated on its own: the reference for batch invariance."""
    eng = _engine(llama)
    ref = [eng.generate([p], _greedy())[0].outputs[0].token_ids for p in _prompts()]
    eng.shutdown()
    return ref


def _assert_all_free(eng: Engine) -> None:
    assert eng.pages.num_free == eng.pages.num_usable
    assert eng.slots.num_free == eng.slots.num_usable
    assert not eng.scheduler.running and not eng.scheduler.waiting
    assert not eng.has_unfinished()


@pytest.mark.parametrize("mode", MODES)
def test_batch_invariance_and_modes(llama, alone, mode: str) -> None:
    eng = _engine(llama, overlap=mode)
    assert _ids(eng.generate(_prompts(), _greedy())) == alone
    _assert_all_free(eng)
    eng.shutdown()


@pytest.mark.parametrize("mode", ["off", "thread"])
def test_chunked_prefill_small_budget(llama, alone, mode: str) -> None:
    eng = _engine(llama, overlap=mode, max_num_batched_tokens=16)
    assert _ids(eng.generate(_prompts(), _greedy())) == alone
    _assert_all_free(eng)
    eng.shutdown()


@pytest.mark.parametrize("mode", MODES)
def test_forced_preemption_recomputes_same_tokens(llama, alone, mode: str) -> None:
    # 24 usable pages of 4 tokens: the six requests (up to 81 tokens each) cannot all fit.
    eng = _engine(llama, overlap=mode, num_pages=25, page_size=4, max_num_batched_tokens=32)
    assert _ids(eng.generate(_prompts(), _greedy())) == alone
    assert eng.scheduler.num_preemptions > 0
    _assert_all_free(eng)
    eng.shutdown()


def test_graph_buckets_off_and_tiny_buckets_agree(llama, alone) -> None:
    for kw in ({"cuda_graph_max_bs": 0}, {"cuda_graph_batch_sizes": (1, 3)}):
        eng = _engine(llama, **kw)
        assert _ids(eng.generate(_prompts(), _greedy())) == alone, kw
        eng.shutdown()


def test_seeded_sampling_reproducible_across_batches_and_modes(llama) -> None:
    params = SamplingParams(
        temperature=0.9, top_p=0.9, top_k=50, seed=1234, max_tokens=16, ignore_eos=True
    )
    prompts = _prompts(1)
    results = []
    for mode, kw in (
        ("off", {}),
        ("thread", {"max_num_batched_tokens": 16}),
        ("inline", {"num_pages": 25, "page_size": 4}),
    ):
        eng = _engine(llama, overlap=mode, **kw)
        batch = _ids(eng.generate(prompts, params))
        single = _ids(eng.generate(prompts[2:3], params))
        assert single[0] == batch[2]
        results.append(batch)
        eng.shutdown()
    assert results[0] == results[1] == results[2]
    other = SamplingParams(
        temperature=0.9, top_p=0.9, top_k=50, seed=99, max_tokens=16, ignore_eos=True
    )
    eng = _engine(llama)
    assert _ids(eng.generate(prompts, other)) != results[0]
    eng.shutdown()


def test_n_completions_differ_and_are_reproducible(llama) -> None:
    eng = _engine(llama, overlap="thread")
    p = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=10, ignore_eos=True)
    a = eng.generate([[1, 2, 3, 4]], p)[0]
    b = eng.generate([[1, 2, 3, 4]], p)[0]
    assert [c.index for c in a.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in a.outputs}) > 1
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    _assert_all_free(eng)
    eng.shutdown()


def test_max_tokens_and_context_limit(llama) -> None:
    eng = _engine(llama, max_model_len=40)
    out = eng.generate([[1] * 30], SamplingParams(temperature=0, max_tokens=None, ignore_eos=True))[
        0
    ].outputs[0]
    assert len(out.token_ids) == 10 and out.finish_reason == "length"
    out = eng.generate([[1] * 5], SamplingParams(temperature=0, max_tokens=3))[0].outputs[0]
    assert len(out.token_ids) <= 3
    eng.shutdown()


def test_stop_token_ids_and_min_tokens(llama, alone) -> None:
    eng = _engine(llama, overlap="thread")
    prompt = _prompts()[0]
    ref = alone[0]
    stop = ref[4]
    first = ref.index(stop)
    out = eng.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop])
    )[0].outputs[0]
    assert out.token_ids == ref[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    # min_tokens bans the stop id until enough tokens exist, so the output changes.
    out = eng.generate(
        [prompt],
        SamplingParams(temperature=0, max_tokens=12, min_tokens=first + 2, stop_token_ids=[stop]),
    )[0].outputs[0]
    assert stop not in out.token_ids[: first + 2]
    _assert_all_free(eng)
    eng.shutdown()


def test_rejections_name_the_problem(llama) -> None:
    eng = _engine(llama, max_model_len=64, max_logprobs=5)
    cases = [
        ([], SamplingParams(), "empty"),
        ([1] * 64, SamplingParams(), "context length"),
        ([1] * 10, SamplingParams(max_tokens=60), "max_tokens"),
        ([1, 999], SamplingParams(), "vocabulary"),
        ([1, 2], SamplingParams(logprobs=6), "max_logprobs"),
        ("hello", SamplingParams(), "tokenizer"),
    ]
    for prompt, params, msg in cases:
        with pytest.raises(RequestRejected, match=msg):
            eng.add_request(None, prompt, params)
    # The engine still serves after the rejections, and nothing leaked.
    assert len(eng.generate([[1, 2, 3]], _greedy(4))[0].outputs[0].token_ids) == 4
    _assert_all_free(eng)
    eng.shutdown()


def test_request_too_big_for_pool_rejected(llama) -> None:
    eng = _engine(llama, num_pages=5, page_size=4)
    with pytest.raises(RequestRejected, match="KV pages"):
        eng.add_request(None, [1] * 10, SamplingParams(max_tokens=20))
    eng.shutdown()


@pytest.mark.parametrize("mode", MODES)
def test_abort_frees_pages_mid_generation(llama, mode: str) -> None:
    eng = _engine(llama, overlap=mode)
    keep = eng.add_request("keep", [1, 2, 3], _greedy(20))
    drop = eng.add_request("drop", list(range(50)), _greedy(200))
    outs = []
    for _ in range(5):
        outs += eng.step()
    assert eng.pages.num_used > 0
    assert eng.abort(drop)
    assert not eng.abort(drop)
    while eng.has_unfinished():
        outs += eng.step()
    eng.drain()
    finals = [o for o in outs if o.finished]
    assert [o.request_id for o in finals] == [keep]
    assert len(finals[0].outputs[0].token_ids) == 20
    _assert_all_free(eng)
    eng.shutdown()


def test_stream_deltas_concatenate(llama) -> None:
    eng = _engine(llama, overlap="thread")
    pieces, last = [], None
    for out in eng.stream([3, 1, 4, 1, 5], _greedy(15)):
        pieces += out.outputs[0].delta_token_ids
        last = out
    assert last is not None and last.finished
    assert pieces == last.outputs[0].token_ids and len(pieces) == 15
    _assert_all_free(eng)
    eng.shutdown()


def test_closing_a_stream_aborts_it(llama) -> None:
    eng = _engine(llama, overlap="thread")
    it = eng.stream([1, 2, 3], _greedy(100))
    next(it)
    it.close()
    eng.drain()
    _assert_all_free(eng)
    eng.shutdown()


# ---- text features on the real default model ---------------------------------------------


@pytest.fixture(scope="module")
def smol(default_model_dir):
    eng = Engine(str(default_model_dir), show_progress=False, overlap="thread")
    yield eng
    eng.shutdown()


def test_stream_text_equals_final_text(smol) -> None:
    msgs = [{"role": "user", "content": "Write one sentence with an emoji and the word café."}]
    prompt = smol.tokenizer.apply_chat_template(msgs)
    text = "".join(o.outputs[0].delta_text for o in smol.stream(prompt, _greedy(40)))
    final = smol.generate([prompt], _greedy(40))[0].outputs[0]
    assert text == final.text == smol.tokenizer.decode(final.token_ids)


def test_stop_strings_across_tokens(smol) -> None:
    prompt = "The capital of France is"
    full = smol.generate([prompt], _greedy(30))[0].outputs[0].text
    words = full.split()
    assert len(words) > 4
    stop = words[3][1:] + " " + words[4][:2]  # spans a word (and token) boundary
    cut = full.index(stop)
    for include in (False, True):
        p = SamplingParams(
            temperature=0,
            max_tokens=30,
            ignore_eos=True,
            stop=[stop],
            include_stop_str_in_output=include,
        )
        out = smol.generate([prompt], p)[0].outputs[0]
        assert out.text == full[: cut + (len(stop) if include else 0)]
        assert out.finish_reason == "stop" and out.stop_reason == stop
        streamed = "".join(o.outputs[0].delta_text for o in smol.stream(prompt, p))
        assert streamed == out.text


def test_chat_uses_template_and_stops_at_eos(smol) -> None:
    out = smol.chat(
        [{"role": "user", "content": "Say hello."}], SamplingParams(temperature=0, max_tokens=64)
    )[0].outputs[0]
    assert out.finish_reason == "stop"
    assert "<|im_end|>" not in out.text and out.text.strip()


def test_text_side_behind_the_core_trims_after_a_stop_string(smol) -> None:
    """The core deals in ids; the text side may run steps behind it (the server's API
    processes). A stop string found late ends the completion where a synchronous check would
    have, the ids the core sampled past it are dropped, and aborting it in the core frees its
    pages. Outputs equal ``generate``'s, streamed deltas included."""
    from graphrt.output_processor import OutputProcessor

    prompt = "The capital of France is"
    full = smol.generate([prompt], _greedy(30))[0].outputs[0].text
    words = full.split()
    stop = words[2] + " " + words[3][:2]
    cases = {
        "stop": SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop]),
        "plain": _greedy(12),
        "n2": SamplingParams(temperature=0.9, seed=3, n=2, max_tokens=10, ignore_eos=True),
    }
    want = {k: smol.generate([prompt], p)[0] for k, p in cases.items()}
    text_side = OutputProcessor(smol.tokenizer)
    ids = smol.tokenizer.encode(prompt)
    for k, p in cases.items():
        seq_ids = smol.add_core_request(k, ids, p)
        text_side.register(text_side.new_group(k, seq_ids, prompt, ids, p, stream=True))
    lag: list = []  # the core's steps, handed to the text side three steps late
    streamed: dict[str, str] = {k: "" for k in cases}
    final = {}
    while smol.has_unfinished() or lag:
        if smol.has_unfinished():
            lag.append(smol.core_step())
        if len(lag) > 3 or not smol.has_unfinished():
            outs, ended = text_side.process(lag.pop(0))
            for seq in ended:
                assert smol.end_sequence(seq.request_id, seq.finish_reason)
            for o in outs:
                streamed[o.request_id] += o.outputs[0].delta_text
                if o.finished:
                    final[o.request_id] = o
    while smol.inflight_plan is not None:
        assert not smol.core_step().seq_ids  # the extra step of finished requests
    assert set(final) == set(cases) and len(smol.outputs) == 0
    for k, w in want.items():
        got = final[k]
        assert [c.token_ids for c in got.outputs] == [c.token_ids for c in w.outputs]
        assert [c.text for c in got.outputs] == [c.text for c in w.outputs]
        assert [c.finish_reason for c in got.outputs] == [c.finish_reason for c in w.outputs]
    assert final["stop"].outputs[0].stop_reason == stop
    assert streamed["stop"] == want["stop"].outputs[0].text
    assert smol.pages.num_free == smol.pages.num_usable


def test_the_text_thread_gives_up_the_gil_every_few_rows(smol, monkeypatch) -> None:
    """On its own thread the text side sleeps(0) every ``TEXT_THREAD_YIELD_ROWS`` rows of a
    step, so threads waking from GIL-free waits (the step thread on ``copy_done``, the launcher)
    run without waiting for the whole step's text work; the outputs are the same."""
    from graphrt import output_processor as op

    assert smol.outputs.yield_rows == (op.TEXT_THREAD_YIELD_ROWS if smol.config.text_thread else 0)
    with pytest.raises(ValueError, match="yield_rows"):
        op.OutputProcessor(smol.tokenizer, yield_rows=-1)
    sleeps: list[None] = []
    monkeypatch.setattr(op, "_yield_gil", lambda: sleeps.append(None))
    prompt = "Once upon a time"
    ids = smol.tokenizer.encode(prompt)
    params = SamplingParams(temperature=0.8, seed=7, n=5, max_tokens=6, ignore_eos=True)
    plain, yielding = op.OutputProcessor(smol.tokenizer), op.OutputProcessor(smol.tokenizer, 2)
    seq_ids = smol.add_core_request("r", ids, params)
    for proc in (plain, yielding):
        proc.register(proc.new_group("r", seq_ids, prompt, ids, params, stream=True))
    texts: dict[int, list[str]] = {0: [], 2: []}
    rows = 0
    while smol.has_unfinished() or smol.inflight_plan is not None:
        step = smol.core_step()
        rows += len(step.seq_ids)
        for proc in (plain, yielding):
            outs, _ = proc.process(step)
            texts[proc.yield_rows] += [c.text for o in outs for c in o.outputs]
    assert texts[0] == texts[2] and texts[0]
    assert rows >= 25 and len(sleeps) == sum(n // 2 for n in _rows_per_step(rows, 5))


def _rows_per_step(total: int, width: int) -> list[int]:
    """``total`` rows in steps of ``width`` (the last one shorter)."""
    return [width] * (total // width) + ([total % width] if total % width else [])


def test_gc_freeze_until_shutdown(tiny_model_factory) -> None:
    """Start-up's objects leave the cyclic collector's reach while the engine runs (a full
    collection over them stalls the step loop), and come back at shutdown, so the engine's
    own reference cycles can be collected; ``gc_freeze=False`` leaves the collector alone."""
    import gc

    d = tiny_model_factory("LlamaForCausalLM")
    gc.unfreeze()
    eng = Engine(str(d), show_progress=False, gc_freeze=False)
    assert gc.get_freeze_count() == 0
    eng.shutdown()
    eng = Engine(str(d), show_progress=False)
    assert gc.get_freeze_count() > 1000
    out = eng.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=2))
    assert len(out[0].outputs[0].token_ids) == 2
    eng.shutdown()
    assert gc.get_freeze_count() == 0


def test_text_thread_outputs_equal_the_step_threads(default_model_dir) -> None:
    """The text side on its own thread (the default) and on the step thread give the same
    outputs: ids, text, finish and stop reasons, logprobs, and streamed deltas that
    concatenate to the final text, with stop strings found while the core runs ahead."""
    prompts = ["The capital of France is", "Once upon a time", "1, 2, 3,"]
    cases = [
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[" the", "5"]),
        SamplingParams(temperature=0.8, seed=5, n=2, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=10, logprobs=2),
    ]
    got = {}
    for threaded in (False, True):
        eng = Engine(str(default_model_dir), show_progress=False, text_thread=threaded)
        streamed: dict[str, list[str]] = {}
        final = {}
        for i, p in enumerate(prompts):
            for j, sp in enumerate(cases):
                eng.add_request(f"{i}-{j}", p, sp)
        for out in eng.drain():
            deltas = streamed.setdefault(out.request_id, [""] * len(out.outputs))
            for c in out.outputs:
                deltas[c.index] += c.delta_text
            if out.finished:
                final[out.request_id] = out
        assert eng.pages.num_free == eng.pages.num_usable and not eng.has_unfinished()
        eng.shutdown()
        assert len(final) == len(prompts) * len(cases)
        for rid, out in final.items():
            assert streamed[rid] == [c.text for c in out.outputs]
        got[threaded] = {
            rid: [
                (c.token_ids, c.text, c.finish_reason, c.stop_reason, c.cumulative_logprob)
                for c in out.outputs
            ]
            for rid, out in final.items()
        }
    assert got[True] == got[False]
    assert any(c[2] == "stop" for v in got[True].values() for c in v)  # a stop string hit
