"""Structured outputs in the engine (issue #20): grammars from JSON schemas, regexes, EBNF and
choices constrain what the default model generates, on CPU, in every overlap mode."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

from graphrt import Engine, SamplingParams, StructuredOutputsParams  # noqa: E402
from graphrt.errors import RequestRejected  # noqa: E402
from graphrt.request import FinishReason  # noqa: E402

S = {"type": "string", "maxLength": 10}
# Integers need a range: an unbounded one lets a greedy model write digits forever.
I = {"type": "integer", "minimum": -1000, "maximum": 1000}

# Twenty-two schemas: nested objects, arrays with maxItems, enums, integer ranges, string
# maxLength, anyOf, $ref, const, booleans, numbers and nulls.
SCHEMAS: list[dict] = [
    {"type": "object", "properties": {"name": S}, "required": ["name"]},
    {
        "type": "object",
        "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["age"],
    },
    {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}},
        "required": ["color"],
    },
    {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": S, "maxItems": 3}},
        "required": ["tags"],
    },
    {
        "type": "object",
        "properties": {
            "person": {
                "type": "object",
                "properties": {"first": S, "last": S},
                "required": ["first", "last"],
                "additionalProperties": False,
            }
        },
        "required": ["person"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"id": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 999}, S]}},
        "required": ["id"],
    },
    {
        "$defs": {"pt": {"type": "object", "properties": {"x": I}}},
        "type": "object",
        "properties": {"a": {"$ref": "#/$defs/pt"}, "b": {"$ref": "#/$defs/pt"}},
        "required": ["a", "b"],
    },
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
    {
        "type": "object",
        "properties": {"score": {"type": "number", "minimum": 0, "maximum": 1}},
        "required": ["score"],
    },
    {"type": "object", "properties": {"v": {"const": "fixed"}}, "required": ["v"]},
    {
        "type": "array",
        "items": {"type": "integer", "minimum": -5, "maximum": 5},
        "minItems": 1,
        "maxItems": 4,
    },
    {"type": "array", "items": {"enum": [1, 2, 3]}, "maxItems": 2},
    {
        "type": "object",
        "properties": {
            "matrix": {
                "type": "array",
                "maxItems": 2,
                "items": {"type": "array", "maxItems": 2, "items": I},
            }
        },
        "required": ["matrix"],
    },
    {
        "type": "object",
        "properties": {"n": {"type": "null"}, "s": S},
        "required": ["n", "s"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "kind": {"enum": ["cat", "dog"]},
            "legs": {"type": "integer", "minimum": 0, "maximum": 4},
        },
        "required": ["kind", "legs"],
    },
    {
        "type": "object",
        "properties": {
            "address": {
                "type": "object",
                "properties": {
                    "city": S,
                    "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                },
                "required": ["city", "zip"],
            }
        },
        "required": ["address"],
    },
    {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "maxItems": 2,
                "items": {
                    "type": "object",
                    "properties": {
                        "sku": S,
                        "qty": {"type": "integer", "minimum": 1, "maximum": 99},
                    },
                    "required": ["sku", "qty"],
                },
            }
        },
        "required": ["items"],
    },
    {"type": "object", "properties": {"code": {"type": "string", "maxLength": 3}}},
    {
        "type": "object",
        "properties": {"when": {"anyOf": [{"type": "null"}, I]}},
        "required": ["when"],
    },
    {
        "$defs": {
            "node": {
                "type": "object",
                "properties": {"val": I, "next": {"type": "null"}},
                "required": ["val", "next"],
            }
        },
        "$ref": "#/$defs/node",
    },
    {"type": "string", "maxLength": 12},
    {"type": "integer", "minimum": 10, "maximum": 99},
]

PROMPT = "Answer with JSON only."


@pytest.fixture(scope="module")
def engine(default_model_dir):
    eng = Engine(str(default_model_dir), show_progress=False, max_model_len=1024)
    yield eng
    eng.shutdown()


def _params(schema: dict, temperature: float, **kw) -> SamplingParams:
    so = StructuredOutputsParams(json=schema)
    return SamplingParams(
        temperature=temperature, seed=7, max_tokens=200, structured_outputs=so, **kw
    )


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_every_output_parses_and_validates_against_its_schema(engine, temperature) -> None:
    assert len(SCHEMAS) >= 20
    outs = engine.generate([PROMPT] * len(SCHEMAS), [_params(s, temperature) for s in SCHEMAS])
    for schema, out in zip(SCHEMAS, outs):
        c = out.outputs[0]
        assert c.finish_reason == FinishReason.STOP, (schema, c.text)
        jsonschema.validate(json.loads(c.text), schema)
        assert _fixed_whitespace(c.text), c.text  # json_whitespace="fixed", the default


def _fixed_whitespace(text: str) -> bool:
    """Outside string literals, the only whitespace is one space after each ',' and ':'."""
    rest = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)
    return not re.search(r"\s", re.sub(r"[,:] ", "", rest)) and not re.search(r"[,:](?! )", rest)


def test_streamed_deltas_concatenate_to_the_same_valid_json(engine) -> None:
    schema = SCHEMAS[4]
    final = engine.generate([PROMPT], _params(schema, 0.0))[0].outputs[0].text
    streamed = "".join(o.outputs[0].delta_text for o in engine.stream(PROMPT, _params(schema, 0.0)))
    assert streamed == final
    jsonschema.validate(json.loads(streamed), schema)


def test_regex_choice_grammar_and_json_object(engine) -> None:
    cases = [
        (StructuredOutputsParams(regex=r"[0-9]{3}-[a-z]{2}"), r"[0-9]{3}-[a-z]{2}"),
        (StructuredOutputsParams(choice=["alpha", "beta", "gamma"]), r"alpha|beta|gamma"),
        (StructuredOutputsParams(grammar='root ::= "yes" | "no" | "maybe"'), r"yes|no|maybe"),
    ]
    params = [
        SamplingParams(temperature=t, seed=3, max_tokens=32, structured_outputs=so)
        for so, _ in cases
        for t in (0.0, 1.0)
    ]
    outs = engine.generate(["Pick one:"] * len(params), params)
    for i, out in enumerate(outs):
        assert re.fullmatch(cases[i // 2][1], out.outputs[0].text), out.outputs[0].text
    obj = SamplingParams(
        temperature=1.0,
        seed=5,
        max_tokens=200,
        structured_outputs=StructuredOutputsParams(json_object=True),
    )
    text = engine.generate([PROMPT], obj)[0].outputs[0].text
    assert isinstance(json.loads(text), dict)


def test_unconstrained_requests_beside_constrained_ones_are_unchanged(engine) -> None:
    plain = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = engine.generate(["The capital of France is"], plain)[0].outputs[0].token_ids
    mixed = engine.generate(["The capital of France is", PROMPT], [plain, _params(SCHEMAS[0], 0.0)])
    assert mixed[0].outputs[0].token_ids == alone
    jsonschema.validate(json.loads(mixed[1].outputs[0].text), SCHEMAS[0])


def test_n_completions_each_follow_their_own_grammar_state(engine) -> None:
    p = _params(SCHEMAS[3], 1.0).replace(n=3)
    out = engine.generate([PROMPT], p)[0]
    assert len(out.outputs) == 3
    for c in out.outputs:
        jsonschema.validate(json.loads(c.text), SCHEMAS[3])


def test_a_completed_grammar_ends_the_request_even_with_ignore_eos(engine) -> None:
    so = StructuredOutputsParams(choice=["done"])
    p = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True, structured_outputs=so)
    c = engine.generate(["Say done:"], p)[0].outputs[0]
    assert c.text == "done" and c.finish_reason == FinishReason.STOP


@pytest.mark.parametrize(
    "so, feature",
    [
        (StructuredOutputsParams(json={"type": "object", "properties": {"a": {"type": "nope"}}}),
         "json"),
        (StructuredOutputsParams(regex="(unclosed"), "regex"),
        (StructuredOutputsParams(grammar="root ::= undefined_rule"), "grammar"),
    ],
)  # fmt: skip
def test_bad_constraints_are_rejected_naming_the_parameter(engine, so, feature) -> None:
    with pytest.raises(RequestRejected, match=f"structured_outputs.{feature}") as e:
        engine.add_request(None, PROMPT, SamplingParams(structured_outputs=so))
    assert e.value.param == "structured_outputs"
    assert ".cc:" not in str(e.value)  # xgrammar's source location is not the user's business
    assert not engine.has_unfinished()
    # The engine keeps serving.
    ok = engine.generate([PROMPT], _params(SCHEMAS[1], 0.0))[0].outputs[0].text
    jsonschema.validate(json.loads(ok), SCHEMAS[1])


def test_abort_while_waiting_for_the_grammar_frees_everything(engine) -> None:
    rid = engine.add_request(None, PROMPT, _params(SCHEMAS[5], 0.0))
    assert engine.abort(rid)
    engine.drain()
    assert not engine.has_unfinished()
    assert engine._num_constrained == 0 and not engine._grammar_waiting
    assert engine.scheduler.num_unfinished == 0


def test_structured_outputs_params_validation() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(regex="a", choice=["a"])
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="not valid JSON"):
        StructuredOutputsParams(json="{")
    with pytest.raises(TypeError, match="unknown fields"):
        SamplingParams(structured_outputs={"jsn": {}})
    a = SamplingParams(structured_outputs={"json": {"type": "object"}})
    b = SamplingParams(structured_outputs=StructuredOutputsParams(json='{"type": "object"}'))
    assert a == b and hash(a) == hash(b)
    assert a.structured_outputs.to_dict() == {"json": '{"type": "object"}'}
    assert StructuredOutputsParams(choice=["x"]).to_dict() == {"choice": ["x"]}


def test_every_overlap_mode_gives_identical_constrained_outputs(engine) -> None:
    params = [_params(s, t) for s in SCHEMAS[:6] for t in (0.0, 1.0)]
    got = {}
    try:
        for mode in ("off", "thread", "inline", "two_events"):
            engine.set_overlap(mode)
            outs = engine.generate([PROMPT] * len(params), params)
            got[mode] = [o.outputs[0].token_ids for o in outs]
    finally:
        engine.set_overlap("thread")
    for mode in ("thread", "inline", "two_events"):
        assert got[mode] == got["off"], mode


def test_preempted_constrained_requests_recompute_the_same_valid_outputs(
    engine, default_model_dir
) -> None:
    schemas = [SCHEMAS[1], SCHEMAS[2], SCHEMAS[7], SCHEMAS[9]] * 2
    params = [_params(s, t).replace(max_tokens=60) for s, t in zip(schemas, [0.0, 1.0] * 4)]
    prompt = "Reply with a JSON value, nothing else. " * 5  # 51 tokens
    want = [o.outputs[0].token_ids for o in engine.generate([prompt] * 8, params)]
    # 29 usable pages of 4 tokens: two requests are admitted, and their outputs outgrow them.
    with Engine(
        str(default_model_dir), show_progress=False, max_model_len=128, num_pages=30, page_size=4
    ) as small:
        outs = small.generate([prompt] * 8, params)
        assert small.scheduler.num_preemptions > 0
        assert small._num_constrained == 0
    assert [o.outputs[0].token_ids for o in outs] == want
    for schema, out in zip(schemas, outs):
        jsonschema.validate(json.loads(out.outputs[0].text), schema)


def test_a_grammar_that_allows_nothing_fails_only_its_request(engine, monkeypatch) -> None:
    so = engine.structured_outputs()
    fill = so.fill

    def fill_nothing_for_choices(states, out):
        bad = fill(states, out)
        for r, s in enumerate(states):
            if s is not None and s is getattr(fill_nothing_for_choices, "victim", None):
                out[r] = 0
                bad.append(r)
        return bad

    monkeypatch.setattr(so, "fill", fill_nothing_for_choices)
    victim = _params(SCHEMAS[0], 0.0)
    ok = _params(SCHEMAS[1], 0.0)
    rid = engine.add_request(None, PROMPT, victim)
    fill_nothing_for_choices.victim = engine._groups[rid][0].grammar
    other = engine.add_request(None, PROMPT, ok)
    outs = {o.request_id: o for o in engine.drain() if o.finished}
    assert outs[rid].outputs[0].finish_reason == FinishReason.ERROR
    assert "allows no next token" in outs[rid].error
    jsonschema.validate(json.loads(outs[other].outputs[0].text), SCHEMAS[1])
    assert engine._num_constrained == 0 and engine.scheduler.num_unfinished == 0


def test_a_token_the_grammar_rejects_fails_the_request(engine, monkeypatch) -> None:
    from graphrt.structured_outputs import StructuredOutputs

    accept = StructuredOutputs.accept
    seen: list[int] = []

    def reject_third(self, states, tokens):
        seen.extend(tokens)  # one row: one token per call
        return [False] if len(seen) == 3 else accept(self, states, tokens)

    monkeypatch.setattr(StructuredOutputs, "accept", reject_third)
    res = engine.generate([PROMPT], _params(SCHEMAS[0], 0.0))[0]
    assert res.outputs[0].finish_reason == FinishReason.ERROR
    assert "does not follow the request's grammar" in res.error
    assert len(res.outputs[0].token_ids) == 3
    assert engine._num_constrained == 0


def test_grammar_compilation_past_its_time_limit_fails_the_request(engine, monkeypatch) -> None:
    import threading

    so = engine.structured_outputs()
    release = threading.Event()
    compile_ = so._compile

    def slow(constraint):
        release.wait(10)
        return compile_(constraint)

    monkeypatch.setattr(so, "_compile", slow)
    monkeypatch.setattr(so, "compile_timeout_s", 0.2)
    try:
        slow_p = SamplingParams(
            max_tokens=8, structured_outputs=StructuredOutputsParams(regex="slow[0-9]")
        )
        res = engine.generate([PROMPT], slow_p)[0]
    finally:
        release.set()
    assert res.outputs[0].finish_reason == FinishReason.ERROR
    assert "took longer than 0.2 s" in res.error
    assert not engine._grammar_waiting and engine._num_constrained == 0


def test_the_grammar_cache_is_bounded_and_shared(engine, monkeypatch) -> None:
    so = engine.structured_outputs()
    monkeypatch.setattr(so, "_max_cached", 2)
    constraints = [StructuredOutputsParams(regex=f"cache{i}[a-z]") for i in range(4)]
    futures = [so.start(c) for c in constraints]
    for f in futures:
        f.result(timeout=30)
    assert so.start(constraints[3]) is futures[3]  # one compilation per constraint
    so.start(StructuredOutputsParams(regex="cache_last"))
    assert len(so._futures) <= 2


def _split_params() -> list[SamplingParams]:
    """Greedy and sampled rows under a JSON schema, a regex and a choice, plus an
    unconstrained row, for a tiny byte-level model."""
    out = []
    for t in (0.0, 1.0):
        for so in (
            StructuredOutputsParams(json=SCHEMAS[6]),
            StructuredOutputsParams(regex=r"[a-z]{3,8}-[0-9]{2,5}"),
            StructuredOutputsParams(choice=["alpha", "beta", "gamma"]),
        ):
            out.append(SamplingParams(temperature=t, seed=11, max_tokens=48, structured_outputs=so))
    out.append(SamplingParams(temperature=1.0, seed=5, max_tokens=48, ignore_eos=True))
    return out


@pytest.mark.parametrize("overlap", ["thread", "off"])
def test_split_steps_equal_unsplit_steps(tiny_byte_model, overlap) -> None:
    """Decode steps with constrained rows run split (forward, then the masked sampler once the
    host has the masks) or, with cuda_graph_structured off, whole after the masks: the same
    tokens either way, and every finished output follows its constraint."""
    params = _split_params()
    prompts = ["json: ", "id: ", "pick: ", "more: ", "x"] * 2 + ["y", "z"]
    got, stats = {}, {}
    for split in (True, False):
        eng = Engine(
            str(tiny_byte_model),
            show_progress=False,
            max_model_len=256,
            cuda_graph_batch_sizes=(4, 8, 16),
            cuda_graph_structured=split,
            overlap=overlap,
        )
        try:
            outs = eng.generate(prompts[: len(params)], params)
            got[split] = [o.outputs[0] for o in outs]
            stats[split] = dict(eng.stats)
        finally:
            eng.shutdown()
    assert [c.token_ids for c in got[True]] == [c.token_ids for c in got[False]]
    assert stats[True]["split_steps"] > 0 and stats[False]["split_steps"] == 0
    for p, c in zip(params, got[True], strict=True):
        so = p.structured_outputs
        if so is None or c.finish_reason != "stop":
            continue
        if so.json is not None:  # the params hold the schema as JSON text
            jsonschema.validate(json.loads(c.text), json.loads(so.json))
        elif so.regex is not None:
            assert re.fullmatch(so.regex, c.text), c.text
        else:
            assert c.text in so.choice
    assert any(c.finish_reason == "stop" for c in got[True])


def _split_engine(model, overlap: str) -> Engine:
    """An engine whose decode steps with constrained rows run split, in buckets of 4 and 8."""
    return Engine(
        str(model),
        show_progress=False,
        max_model_len=256,
        cuda_graph_batch_sizes=(4, 8),
        overlap=overlap,
    )


class _RecordingLauncher:
    """A launcher that logs what the engine submits, in order, and passes it on."""

    def __init__(self, inner) -> None:
        self.inner, self.log = inner, []

    mode = property(lambda self: self.inner.mode)
    overlapped = property(lambda self: self.inner.overlapped)
    profiler = property(
        lambda self: self.inner.profiler, lambda self, p: setattr(self.inner, "profiler", p)
    )

    def submit(self, plan, masked=False):
        self.log.append(("forward" if masked else "step", plan.step_id))
        return self.inner.submit(plan, masked=masked)

    def submit_masks(self, handle, wait=True) -> None:
        self.log.append(("sampler", handle.step_id))
        self.inner.submit_masks(handle, wait=wait)

    def shutdown(self) -> None:
        self.inner.shutdown()


@pytest.mark.parametrize("overlap", ["thread", "inline", "off"])
def test_a_split_steps_sampler_and_the_next_step_go_out_back_to_back(
    tiny_byte_model, overlap
) -> None:
    """A split step's sampler is launched as soon as its masks are filled; overlapped, the next
    step is planned before that, while the forward runs, and launched right behind the sampler,
    so no host work lies between the two (ARCHITECTURE.md, "Structured outputs"). Without
    overlap the next step is planned only after the split step's ids are processed."""
    from graphrt.overlap import Launcher, StepProfiler

    eng = _split_engine(tiny_byte_model, overlap)
    try:
        rec = _RecordingLauncher(Launcher(eng.runner, overlap, max_rows=eng.config.max_num_seqs))
        eng.use_launcher(rec)

        class Planned(StepProfiler):
            def scheduled(self, plan, seconds) -> None:
                rec.log.append(("planned", plan.step_id))
                super().scheduled(plan, seconds)

        eng.set_profiler(Planned(eng.runner.device))
        params = _split_params()[:4]
        want = [o.outputs[0].token_ids for o in eng.generate(["json: ", "id: ", "pick: ", "x"],
                                                             params)]  # fmt: skip
        assert eng.stats["split_steps"] > 1
        eng.set_overlap("off")
        plain = [o.outputs[0].token_ids for o in eng.generate(["json: ", "id: ", "pick: ", "x"],
                                                              params)]  # fmt: skip
    finally:
        eng.shutdown()
    assert want == plain  # planning early changes no token
    log = rec.log[: rec.log.index(("sampler", max(s for k, s in rec.log if k == "sampler"))) + 2]
    samplers = [i for i, (kind, _) in enumerate(log) if kind == "sampler"]
    assert len(samplers) > 1
    behind = 0
    for i in samplers:
        n = log[i][1]
        if overlap == "off":
            assert log[i - 1] == ("forward", n), log
            continue
        # Between the forward and its sampler only the next step's planning; right after the
        # sampler, that step's launch.
        assert log[i - 1] in (("forward", n), ("planned", n + 1)), log
        if log[i - 1] == ("planned", n + 1):
            assert log[i - 2] == ("forward", n), log
            assert log[i + 1] in (("forward", n + 1), ("step", n + 1)), log
            behind += 1
    assert behind >= (len(samplers) - 1 if overlap != "off" else 0)


@pytest.mark.parametrize("forward_done", [True, False])
def test_profiler_marks_split_steps_whose_forward_ended_before_the_masks(
    tiny_byte_model, monkeypatch, forward_done
) -> None:
    """``StepRecord.masks_late``: a split step's forward had ended on the GPU when its sampler
    was launched (the GPU waited for the host's masks). On the CPU, with stand-in CUDA events
    whose ``query`` says whether the forward is done, every split step is marked, or none."""
    import torch

    from graphrt.overlap import StepProfiler

    class Event:
        def __init__(self, *a, **kw) -> None:
            pass

        def record(self) -> None:
            pass

        def query(self) -> bool:
            return forward_done

    monkeypatch.setattr(torch.cuda, "Event", Event)
    eng = _split_engine(tiny_byte_model, "inline")
    try:
        prof = StepProfiler(eng.runner.device)
        prof.cuda = True  # events, as on a GPU
        eng.set_profiler(prof)
        eng.generate(["json: ", "id: ", "pick: ", "x"], _split_params()[:4])
        eng.set_profiler(None)
    finally:
        eng.shutdown()
    split = [r for r in prof.records.values() if r.mid is not None]
    assert len(split) > 1
    assert all(r.masks_late == forward_done for r in split)
    assert not any(r.masks_late for r in prof.records.values() if r.mid is None)


@pytest.mark.parametrize("overlap", ["thread", "inline"])
def test_shutdown_mid_split_steps_finishes_the_step_launched_ahead(
    tiny_byte_model, overlap
) -> None:
    """Stopped between steps while a split step's successor is launched (its forward only, its
    sampler still to come), shutdown gives that step all-allowing masks, waits for it and frees
    its buffers instead of hanging on a sampler nobody launches."""
    from graphrt.overlap import StepHandle

    eng = _split_engine(tiny_byte_model, overlap)
    so = StructuredOutputsParams(regex=r"[a-z]{30,40}")
    params = SamplingParams(temperature=0, max_tokens=40, structured_outputs=so)
    try:
        for i in range(3):
            eng.add_request(f"r{i}", f"p{i}", params)
        for _ in range(40):
            eng.step()
            ahead = eng._ahead
            if isinstance(ahead, StepHandle) and ahead.masked and not ahead.masks_submitted:
                break
        else:
            pytest.fail("no split step was launched ahead")
        free = eng.launcher.pool._free.qsize()
    finally:
        eng.shutdown()
    assert eng._ahead is None and eng._inflight is None
    assert ahead.masks_submitted
    assert eng.launcher.pool._free.qsize() == free + 2  # the step ahead's and the one in flight


@pytest.mark.parametrize("overlap", ["thread", "inline"])
def test_a_constrained_prompt_arriving_mid_split_steps_is_held_then_launched(
    tiny_byte_model, overlap
) -> None:
    """A constrained prompt that arrives while split steps run: the step that carries it is
    planned during a split step's forward but needs that step's tokens first, so it is held
    (``Engine._ahead``) and launched by the next call. A request aborted while it is held is
    freed; the others follow their grammars to the end and every page comes back."""
    from graphrt.step_plan import StepPlan

    eng = _split_engine(tiny_byte_model, overlap)
    so = StructuredOutputsParams(regex=r"[a-z]{20,30}")
    params = SamplingParams(temperature=0, max_tokens=30, structured_outputs=so)
    final: dict[str, object] = {}
    held = aborted = False
    try:
        for i in range(2):
            eng.add_request(f"r{i}", f"p{i}", params)
        while eng.has_unfinished():
            for o in eng.step():
                if o.finished:
                    final[o.request_id] = o
            if eng.stats["split_steps"] >= 3 and "late" not in final and not held:
                if "late" not in eng._groups:
                    eng.add_request("late", "q", params)
                    eng.add_request("gone", "z", params)
                elif isinstance(eng._ahead, StepPlan):
                    held = True
                    assert any(r.request_id == "gone" for r in eng._ahead.requests)
                    aborted = eng.abort("gone")
        assert held and aborted
        assert set(final) == {"r0", "r1", "late"}  # an aborted request reports nothing more
        for rid in ("r0", "r1", "late"):
            c = final[rid].outputs[0]
            assert final[rid].error is None and re.fullmatch(r"[a-z]{20,30}", c.text), c.text
        assert eng.pages.num_free == eng.pages.num_usable
    finally:
        eng.shutdown()


@pytest.mark.parametrize("overlap", ["thread", "off"])
@pytest.mark.parametrize("where", ["sampler", "launcher"])
def test_a_failed_split_sampler_fails_its_step_and_the_engine_goes_on(
    tiny_byte_model, overlap, where
) -> None:
    """The sampler half of a split step fails (in the runner, or in the launcher around it):
    the step's requests end with the error instead of hanging, their pages are freed, and the
    next requests are served."""
    eng = _split_engine(tiny_byte_model, overlap)
    so = StructuredOutputsParams(regex=r"[a-z]{20,30}")
    params = SamplingParams(temperature=0, max_tokens=24, structured_outputs=so)
    calls = {"n": 0}

    def fault(*args) -> None:
        calls["n"] += 1
        raise RuntimeError("injected sampler fault")

    try:
        if where == "sampler":
            real = eng.runner.execute_sampler
            eng.runner.execute_sampler = fault
        else:
            real = eng.launcher._launch
            eng.launcher._launch = lambda handle, sampler: (
                fault() if sampler else real(handle, sampler)
            )
        outs = eng.generate(["ab", "cd"], [params, params])
        assert calls["n"] >= 1
        assert all(o.outputs[0].finish_reason == "error" for o in outs)
        assert all("injected sampler fault" in o.error for o in outs)
        if where == "sampler":
            eng.runner.execute_sampler = real
        else:
            eng.launcher._launch = real
        ok = eng.generate(["ef"], params)[0]
        assert ok.error is None and re.fullmatch(r"[a-z]*", ok.outputs[0].text)
        assert eng.pages.num_free == eng.pages.num_usable
    finally:
        eng.shutdown()


@pytest.mark.parametrize("mode", ["fixed", "flexible"])
def test_json_whitespace_setting(tiny_byte_model, mode) -> None:
    """``json_whitespace``: "fixed" allows no blank after '{' and exactly ", " between items;
    "flexible" allows blanks (up to a cap) wherever JSON does."""
    eng = Engine(str(tiny_byte_model), show_progress=False, max_model_len=128, json_whitespace=mode)
    try:
        so = eng.structured_outputs()
        schema = {"type": "array", "items": {"type": "integer"}}
        fut = so.start(StructuredOutputsParams(json=schema))
        fut.result(timeout=30)
        state = so.matcher_state(fut)
        assert so.poll(state) is None

        def allowed(ch: str) -> bool:
            mask = np.empty((1, so.words), dtype=np.int32)
            so.fill([state], mask)
            return bool((mask[0, ord(ch) // 32] >> (ord(ch) % 32)) & 1)

        assert so.accept([state], [ord("[")]) == [True]
        assert allowed(" ") == (mode == "flexible") and allowed("1")
        assert so.accept([state], [ord("1")]) == [True] and so.accept([state], [ord(",")]) == [True]
        assert allowed(" ") and allowed("2") == (mode == "flexible")
    finally:
        eng.shutdown()


def test_grammar_threads_policy(tiny_byte_model, monkeypatch) -> None:
    """Auto (0): one thread up to PARALLEL_MIN_ROWS rows, the host's threads above; N > 1:
    N threads for any batch of a few rows; 1: never threaded."""
    from graphrt import structured_outputs as so_mod

    monkeypatch.setattr(so_mod, "MASK_THREADS", 4)
    tok = __import__("transformers").AutoTokenizer.from_pretrained(str(tiny_byte_model))
    auto = so_mod.StructuredOutputs(tok, 258, [0], mask_threads=0)
    two = so_mod.StructuredOutputs(tok, 258, [0], mask_threads=2)
    one = so_mod.StructuredOutputs(tok, 258, [0], mask_threads=1)
    try:
        n = so_mod.PARALLEL_MIN_ROWS
        assert auto.mask_threads == 4 and not auto._parallel(n - 1) and auto._parallel(n)
        assert two._parallel(4) and not two._parallel(3)
        assert not one._parallel(10_000)
    finally:
        for s in (auto, two, one):
            s.close()


def test_padded_vocabulary_masks_equal_unpadded_ones(tiny_byte_model) -> None:
    """A model vocabulary padded past its tokenizer's: xgrammar sees only the tokenizer's ids
    (its accept slows with every padding id it must treat as special), the padding ids are
    never allowed, and the allowed set is otherwise that of the unpadded vocabulary. A padding
    id is refused without reaching xgrammar."""
    from graphrt.structured_outputs import StructuredOutputs

    tok = __import__("transformers").AutoTokenizer.from_pretrained(str(tiny_byte_model))
    n = len(tok)
    plain = StructuredOutputs(tok, n, [0])
    padded = StructuredOutputs(tok, n + 100, [0])
    try:
        assert padded._xgr_vocab == n and padded.words > plain.words
        so = StructuredOutputsParams(json={"type": "array", "items": {"type": "integer"}})
        states = []
        for svc in (plain, padded):
            fut = svc.start(so)
            fut.result(timeout=30)
            st = [svc.matcher_state(fut) for _ in range(3)]
            for x in st:
                assert svc.poll(x) is None
            states.append(st)
        for toks in ([ord("[")] * 3, [ord("1"), ord("2"), ord("]")], [ord(","), 0, 0]):
            a = np.full((3, plain.words), 7, dtype=np.int32)
            b = np.full((3, padded.words), 7, dtype=np.int32)
            plain.fill(states[0], a)
            padded.fill(states[1], b)
            bits_a = np.unpackbits(a.view(np.uint8), axis=1, bitorder="little")[:, :n]
            bits_b = np.unpackbits(b.view(np.uint8), axis=1, bitorder="little")
            assert np.array_equal(bits_a, bits_b[:, :n]) and not bits_b[:, n:].any()
            assert plain.accept(states[0], toks) == padded.accept(states[1], toks)
        assert padded.accept(states[1][:1], [n + 5]) == [False]
    finally:
        plain.close()
        padded.close()


def test_padded_model_vocabulary_end_to_end(tiny_model_factory) -> None:
    """A model whose vocabulary (320) is padded past its tokenizer's (258), on the split path:
    constrained outputs never take a padding id, and parse and validate."""
    from conftest import save_byte_tokenizer

    d = tiny_model_factory("LlamaForCausalLM", vocab_size=320, initializer_range=0.3)
    if not (d / "tokenizer.json").is_file():
        save_byte_tokenizer(d)
    eng = Engine(str(d), show_progress=False, max_model_len=256, cuda_graph_batch_sizes=(4, 8))
    try:
        schema = {"type": "array", "items": {"enum": ["ab", "cd"]}, "maxItems": 3}
        params = SamplingParams(
            temperature=1.0,
            seed=3,
            max_tokens=40,
            structured_outputs=StructuredOutputsParams(json=schema),
        )
        outs = eng.generate(["x", "y", "z", "w"], params)
        for o in outs:
            c = o.outputs[0]
            assert o.error is None and max(c.token_ids) < 258, c.token_ids
            if c.finish_reason == "stop":
                jsonschema.validate(json.loads(c.text), schema)
        assert any(o.outputs[0].finish_reason == "stop" for o in outs)
    finally:
        eng.shutdown()


@pytest.mark.parametrize("threads", [1, 2])
def test_batched_accept_matches_one_by_one(tiny_byte_model, threads) -> None:
    """``StructuredOutputs.accept`` over several rows (xgrammar's threaded batch, or a loop on
    one thread) gives the verdicts and matcher states of accepting each row alone, refusals
    included."""
    eng = Engine(
        str(tiny_byte_model), show_progress=False, max_model_len=128, grammar_threads=threads
    )
    try:
        so = eng.structured_outputs()
        assert so.mask_threads == threads
        fut = so.start(StructuredOutputsParams(regex=r"[ab]{2,6}"))
        fut.result(timeout=30)

        def fresh(n):
            states = [so.matcher_state(fut) for _ in range(n)]
            for s in states:
                assert so.poll(s) is None and s.matcher is not None
            return states

        toks = [ord("a"), ord("b"), ord("c"), ord("a"), ord("z"), ord("b")]
        batched, alone = fresh(6), fresh(6)
        assert so.accept(batched, toks) == [True, True, False, True, False, True]
        assert [s.accept(t) for s, t in zip(alone, toks, strict=True)] == so.accept(fresh(6), toks)
        words = np.empty((2, 6, so.words), dtype=np.int32)
        so.fill(batched, words[0])
        so.fill(alone, words[1])
        assert np.array_equal(words[0], words[1])
    finally:
        eng.shutdown()
