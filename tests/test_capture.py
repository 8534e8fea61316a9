"""Decode buckets, static buffers and padding, exercised on CPU through the same step function
the CUDA graphs capture."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from graphrt import Engine, SamplingParams
from graphrt.capture.buckets import bucket_for, default_buckets, make_buckets
from graphrt.capture.graph_runner import pad_waste, variant_for
from graphrt.capture.static_buffers import (
    INPUT_ROWS,
    POSITIONS,
    SEQ_LENS,
    SLOTS,
    UPDATES,
    StepIO,
    StepIOError,
    fill_inputs,
)
from graphrt.memory.page_allocator import DUMMY_PAGE, DUMMY_SLOT
from graphrt.sampling import EVERYTHING, GREEDY, SAMPLED, SamplerFlags


def test_default_buckets_dense_then_sixteen() -> None:
    b = default_buckets(256)
    assert b[:8] == [1, 2, 4, 8, 12, 16, 24, 32]
    assert b[8:] == list(range(48, 257, 16))
    assert default_buckets(20) == [1, 2, 4, 8, 12, 16, 20]
    assert default_buckets(100)[-1] == 100 and 96 in default_buckets(100)
    assert default_buckets(0) == []


def test_make_buckets_settings() -> None:
    assert make_buckets(0, None, 256) == []
    assert make_buckets(64, None, 256)[-1] == 64
    assert make_buckets(256, None, 40)[-1] == 40  # never above max_num_seqs
    assert make_buckets(256, (8, 2, 32), 16) == [2, 8]
    with pytest.raises(ValueError, match="above max_num_seqs"):
        make_buckets(256, (64,), 16)


@pytest.mark.parametrize(("bs", "want"), [(1, 1), (3, 4), (5, 8), (13, 16), (33, 48), (256, 256)])
def test_bucket_for_pads_to_next(bs: int, want: int) -> None:
    assert bucket_for(default_buckets(256), bs) == want


def test_bucket_for_above_largest_is_eager() -> None:
    assert bucket_for([1, 2, 4], 5) is None


def test_pad_waste() -> None:
    assert pad_waste([1, 2, 4], np.array([4, 4])) == 0.0
    assert pad_waste([4], np.array([3])) == pytest.approx(0.25)


def test_fill_inputs_carries_page_updates() -> None:
    staging = np.full((INPUT_ROWS, 8), -1, dtype=np.int64)
    upd = np.array([[7, 9], [2, 0], [41, 42]])
    rows = fill_inputs(staging, np.array([7, 3, 9]), np.array([33, 4, 1]), 4, upd)
    assert rows.shape == (3, 4)  # what the graph reads
    assert staging[UPDATES:, :2].tolist() == upd.tolist()
    assert staging[UPDATES, 2:4].tolist() == [-1, -1]  # the bucket's other columns: no write
    rows = fill_inputs(staging, np.array([7]), np.array([33]), 4)  # a step without writes
    assert staging[UPDATES, :4].tolist() == [-1] * 4


def test_fill_inputs_pads_with_dummy_rows() -> None:
    staging = np.full((INPUT_ROWS, 8), 12345, dtype=np.int64)
    rows = fill_inputs(staging, np.array([7, 3, 9]), np.array([10, 4, 1]), 8)
    assert rows.shape == (3, 8)
    assert rows[SLOTS].tolist() == [7, 3, 9] + [DUMMY_SLOT] * 5
    assert rows[POSITIONS].tolist() == [9, 3, 0] + [0] * 5
    assert rows[SEQ_LENS].tolist() == [10, 4, 1] + [1] * 5


def test_step_io_slots_are_held_until_released() -> None:
    """A graph step holds its ring slot until its ids are read; handing the slot to a later
    step before that raises, instead of letting the later step overwrite its inputs or ids."""
    io = StepIO(4, 8, torch.device("cpu"))
    assert io.inputs.shape == (4, 8, INPUT_ROWS)  # column-major slots
    assert (io.inputs[..., SLOTS] == DUMMY_SLOT).all() and (io.inputs[..., UPDATES] == -1).all()
    leases = []
    for step in range(4):
        k, arr = io.slot_inputs()
        assert k == step and arr.shape == (INPUT_ROWS, 8)
        io.next += 1  # what a replay does
        leases.append(io.lease(k, step))
    with pytest.raises(StepIOError, match="ring slot 0 is still held by step 0"):
        io.slot_inputs()  # a fifth step in flight
    leases[0].release()
    leases[0].release()  # idempotent: the handle's error path may release twice
    assert io.slot_inputs()[0] == 4 and io.lease(4, 10).slot == 0
    with pytest.raises(StepIOError, match="still held by step 1"):
        io.lease(5, 9)
    io.ids[2, :3] = torch.tensor([5, 6, 7])
    assert leases[2].ids[:3].tolist() == [5, 6, 7]  # a view of the pinned row, no copy
    io.ids[2, -1] = 2  # the tag the graph writes: graph step 2 wrote this row
    leases[2].check()
    io.ids[3, -1] = 7  # a row written by another graph step than the lease's
    with pytest.raises(StepIOError, match="holds the ids of graph step 7, not of graph step 3"):
        leases[3].check()
    io.stage_all(np.array([3, 4]), np.array([10, 20]), 4)
    assert (io.inputs[:, :4, SLOTS] == torch.tensor([3, 4, DUMMY_SLOT, DUMMY_SLOT])).all()
    assert (io.inputs[:, :2, POSITIONS] == torch.tensor([9, 19])).all()


@pytest.mark.parametrize("overlap", ["off", "thread", "two_events"])
def test_graph_steps_go_through_the_ring(llama, overlap: str) -> None:
    """Every graph step took the next ring slot and gave it back once its ids were read."""
    eng = Engine(str(llama), show_progress=False, overlap=overlap, cuda_graph_max_bs=8)
    params = SamplingParams(temperature=0, max_tokens=9, ignore_eos=True)
    eng.generate([[1, 2, 3], [4, 5, 6, 7], [8]], params)
    io = eng.runner.graphs.io
    assert eng.stats["graph_steps"] > 3
    assert io.next == eng.stats["graph_steps"] == int(io.pos.item())
    assert all(h is None for h in io._holder)
    eng.shutdown()


def test_ring_out_of_step_fails_loudly(llama) -> None:
    """A replay the host did not count (the device's count ran ahead) would hand steps each
    other's inputs and ids; the ids' tag catches it, and the step's requests fail with the
    reason instead of decoding garbage."""
    eng = Engine(str(llama), show_progress=False, overlap="thread", cuda_graph_max_bs=8)
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    ok = eng.generate([[1, 2, 3]], params)[0]
    assert ok.error is None and len(ok.outputs[0].token_ids) == 5
    eng.runner.graphs.io.pos += 1
    bad = eng.generate([[1, 2, 3]], params)[0]
    assert bad.error is not None and "out of step" in bad.error
    assert eng.pages.num_free == eng.pages.num_usable  # the failed request freed its pages
    eng.shutdown()


def test_variant_choice() -> None:
    assert variant_for(GREEDY) == GREEDY
    assert variant_for(SamplerFlags(logprobs=True)) == EVERYTHING
    assert variant_for(SamplerFlags(full=True)) == SAMPLED
    assert variant_for(SamplerFlags(full=True, filters=True)) == EVERYTHING
    assert variant_for(SamplerFlags(filters=True)) == EVERYTHING


@pytest.fixture(scope="module")
def llama(tiny_model_factory):
    return tiny_model_factory("LlamaForCausalLM")


def _run(model_dir, prompts, **kw):
    eng = Engine(str(model_dir), show_progress=False, overlap="off", **kw)
    used: list[int | None] = []
    run = eng.runner.graphs.run

    def spy(plan, bucket, flags, **kw):
        used.append(bucket)
        return run(plan, bucket, flags, **kw)

    eng.runner.graphs.run = spy
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    ids = [o.outputs[0].token_ids for o in eng.generate(prompts, params)]
    return eng, ids, used


@pytest.mark.parametrize("n", [3, 5, 13])
def test_padded_buckets_match_eager(llama, n: int) -> None:
    prompts = [[(7 * i + j) % 256 for j in range(5 + i)] for i in range(n)]
    eager, ref, used = _run(llama, prompts, cuda_graph_max_bs=0)
    assert used == []
    eng, ids, used = _run(llama, prompts, cuda_graph_batch_sizes=(1, 2, 4, 8, 16))
    assert ids == ref
    assert bucket_for([1, 2, 4, 8, 16], n) in used  # the full batch ran padded
    # Padded rows wrote only into the dummy page: pages nobody owned are still zero.
    owned_ever = set(range(1, 1 + sum(eng.pages.pages_for(len(p) + 6) for p in prompts)))
    for layer in eng.runner.kv.k:
        for page in range(layer.shape[0]):
            if page != DUMMY_PAGE and page not in owned_ever:
                assert torch.count_nonzero(layer[page]) == 0, page
    eager.shutdown()
    eng.shutdown()


def test_above_largest_bucket_runs_eagerly(llama) -> None:
    prompts = [[i + 1, i + 2, i + 3] for i in range(6)]
    _, ref, _ = _run(llama, prompts, cuda_graph_max_bs=0)
    eng, ids, used = _run(llama, prompts, cuda_graph_batch_sizes=(1, 2, 4))
    assert ids == ref
    # Six rows decode together throughout, above the largest bucket: every step was eager.
    assert used == [] and eng.stats["graph_steps"] == 0 and eng.stats["steps"] > 1
    eng.shutdown()


def test_capture_profile_cli_without_cuda(llama, tmp_path, capsys) -> None:
    from graphrt.capture_profile import main

    js, png = tmp_path / "p.json", tmp_path / "p.png"
    rc = main(
        [
            "--model",
            str(llama),
            "--max-num-seqs",
            "4",
            "--iters",
            "3",
            "--json",
            str(js),
            "--plot",
            str(png),
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    captured = capsys.readouterr()
    if not torch.cuda.is_available():
        assert "no CUDA device" in captured.err
    import json

    data = json.loads(js.read_text())
    assert [r["bs"] for r in data["rows"]] == [1, 2, 4]
    assert all(r["eager_ms"] > 0 and r["replay_ms"] is None for r in data["rows"])
    assert png.stat().st_size > 1000


def test_capture_profile_scales_to_the_kv_pool(llama, capsys) -> None:
    """The default --max-num-seqs (256) with a KV pool too small for 256 rows of the default
    context: the profile shrinks to the rows that fit, says so, and succeeds."""
    from graphrt.capture_profile import main

    # 1 MiB of fp32 KV for the tiny model: 128 pages, 16 rows of 128 tokens.
    args = ["--model", str(llama), "--iters", "3", "--device", "cpu", "--cpu-kv-cache-gb", "0.001"]
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "profiling batches up to 16, not 32" in err
    rc = main([*args, "--context-len", "4096"])
    assert rc == 1 and "fewer than the smallest batch" in capsys.readouterr().err


def test_capture_buckets_loop(monkeypatch) -> None:
    """The capture loop both graph runners share, with the two CUDA calls it makes stubbed:
    largest bucket first, every sampler variant, a stat per bucket, the ring's counts restarted;
    out of memory and other failures become a CaptureError naming the bucket and the setting."""
    from graphrt.capture.graph_runner import VARIANTS, CaptureError, capture_buckets

    free = iter(range(1000, 0, -7))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a, **k: (next(free), 2000))
    io = StepIO(4, 8, torch.device("cpu"))
    io.pos += 3
    io.next = 3
    seen: list[tuple[int, SamplerFlags]] = []
    graphs: dict = {}
    stats: list = []
    kw = dict(what="thing of {} units", oom_hint="max_things", off_hint="Turn it off.")

    def ok(size: int, flags: SamplerFlags) -> str:
        seen.append((size, flags))
        return f"g{size}"

    capture_buckets([2, 8, 4], ok, graphs, stats, io, show_progress=False, **kw)
    assert [s for s, _ in seen] == [s for s in (8, 4, 2) for _ in VARIANTS]
    assert {f for _, f in seen} == set(VARIANTS)
    assert [st.bs for st in stats] == [8, 4, 2] and all(st.graph_bytes > 0 for st in stats)
    assert len(graphs) == 3 * len(VARIANTS) and io.next == 0 and int(io.pos.item()) == 0

    def oom(size: int, flags: SamplerFlags) -> str:
        raise torch.cuda.OutOfMemoryError("no room")

    with pytest.raises(CaptureError, match=r"thing of 8 units: lower max_things or gpu_memory"):
        capture_buckets([2, 8], oom, {}, [], io, show_progress=False, **kw)

    def broken(size: int, flags: SamplerFlags) -> str:
        raise ValueError("bad shape")

    with pytest.raises(CaptureError, match=r"8 units failed: ValueError: bad shape\. Turn"):
        capture_buckets([8], broken, {}, [], io, show_progress=False, **kw)
