"""The benchmark scripts and the GPU suite, on CPU: each benchmark runs end to end on a tiny
random model and writes JSON with the expected keys; the suite's runner handles missing, failing
and hung phases; its table builder renders sample JSON."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
# No wheels to install: the suite plans exactly the phases --only names (a checkout may have a
# .wheels/ of its own, which would add the install phase).
NO_WHEELS = ["--wheels", "/nonexistent-wheels"]


def _load(name: str) -> ModuleType:
    """A benchmark script as a module (benchmarks/ is not a package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # Tiny matmuls gain nothing from a second thread, and on a busy 2-core machine spinning
    # OpenMP threads make them a thousand times slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def llama(tiny_model_factory) -> Path:
    return tiny_model_factory("LlamaForCausalLM")


def _is_stat(s: dict) -> bool:
    return s["min"] <= s["median"] <= s["max"] and len(s["values"]) >= 5


# ---- offline throughput ---------------------------------------------------------------------


def test_offline_throughput_with_hf_peer(llama, tmp_path) -> None:
    mod = _load("offline_throughput")
    out = tmp_path / "offline.json"
    rc = mod.main(
        [
            "--model", str(llama), "--load-format", "dummy", "--device", "cpu",
            "--num-requests", "6", "--min-input-len", "3", "--max-input-len", "12",
            "--min-output-len", "2", "--max-output-len", "5", "--max-num-seqs", "4",
            "--peer", "hf", "--hf-max-requests", "4", "--hf-batch-size", "2",
            "--hf-max-output-len", "3", "--hf-cb-num-blocks", "16",
            "--hf-cb-max-batch-tokens", "128", "--json", str(out),
        ]
    )  # fmt: skip
    assert rc == 0
    d = json.loads(out.read_text())
    h = d["header"]
    assert h["device"] == "cpu" and h["hbm_bytes_per_s"] is None and "ceiling" not in d
    assert h["workload"]["requests"] == 6
    assert 3 <= h["workload"]["prompt_len"]["min"] <= h["workload"]["prompt_len"]["max"] <= 12
    g = d["graphrt"]
    for key in ("requests_per_s", "output_tok_s", "total_tok_s", "elapsed_s"):
        assert _is_stat(g[key]) and g[key]["median"] > 0
    assert len(g["runs"]) == 5
    assert g["total_tok_s"]["median"] > g["output_tok_s"]["median"]
    peer = d["peer"]
    assert peer["subsample"]["requests"] == 4 and peer["subsample"]["output_len"]["max"] <= 3
    assert _is_stat(peer["graphrt_same_requests"]["output_tok_s"])
    gen = peer["generate"]
    assert _is_stat(gen["output_tok_s"]) and gen["batch_size"] == 2 and gen["num_batches"] == 2
    # Every row of a batch makes the batch's longest output: at least what was asked.
    assert gen["generated_tokens"] >= peer["subsample"]["output_tokens"]
    cb = peer["cb"]
    assert "unavailable" in cb or _is_stat(cb["output_tok_s"])
    assert d["ratios"]["graphrt_vs_hf_generate"] > 0
    assert d["ratios"]["graphrt_vs_hf_generate_same_requests"] > 0


def test_offline_throughput_fixed_shape(llama, tmp_path) -> None:
    mod = _load("offline_throughput")
    out = tmp_path / "fixed.json"
    argv = ["--model", str(llama), "--load-format", "dummy", "--device", "cpu"]
    argv += ["--input-len", "7", "--output-len", "3", "--num-requests", "5", "--json", str(out)]
    assert mod.main(argv) == 0
    d = json.loads(out.read_text())
    wl = d["header"]["workload"]
    assert wl["prompt_len"]["min"] == wl["prompt_len"]["max"] == 7
    assert wl["output_tokens"] == 15 and "peer" not in d and d["ratios"] == {}
    assert d["header"]["max_model_len"] == 64  # sized from the workload, not the model limit


def test_offline_profile_summary_splits_time_by_step_kind() -> None:
    """--profile: GPU seconds per kind of step from start/end events, idle = gaps between one
    step's end and the next one's start (overlap, where a start precedes the end before it,
    counts as none)."""
    from types import SimpleNamespace

    mod = _load("offline_throughput")
    from graphrt.overlap import StepRecord

    def ev(t_ms):
        return SimpleNamespace(elapsed_time=lambda other: other.t - t_ms, t=t_ms)

    def rec(i, start, end, **kw):
        r = StepRecord(i, kw.pop("bs"), kw.pop("dec"), **kw)
        r.start, r.end = ev(start), ev(end)
        r.schedule_s, r.launch_s, r.process_s = 1e-3, 2e-3, 3e-3
        return r

    recs = [
        rec(0, 0.0, 10.0, bs=2, dec=False, num_tokens=100, decode_rows=0),
        rec(1, 9.0, 14.0, bs=3, dec=False, num_tokens=50, decode_rows=2),  # starts early
        rec(2, 15.0, 17.0, bs=3, dec=True, num_tokens=3, decode_rows=3, graph_bs=4),
        rec(3, 20.0, 22.0, bs=3, dec=True, num_tokens=3, decode_rows=3, graph_bs=4),
    ]
    p = mod.summarize_steps(recs, wall=0.025)
    assert p["steps"] == 4 and p["gpu_span_s"] == 0.022
    assert abs(p["gpu_idle_s"] - 0.004) < 1e-12  # 14 -> 15 and 17 -> 20
    k = p["kinds"]
    assert set(k) == {"prefill only, eager", "prefill + decode, eager", "decode, graph"}
    assert k["decode, graph"]["steps"] == 2 and abs(k["decode, graph"]["gpu_s"] - 0.004) < 1e-12
    assert k["prefill + decode, eager"]["prefill_tokens_per_step"] == 48
    assert k["prefill only, eager"]["share_of_wall"] == 0.010 / 0.025
    assert k["decode, graph"]["launch_ms"] == 2.0


def test_offline_profile_runs_on_cpu(llama) -> None:
    """The profile runs drive the whole workload (CPU: no events, so no tables) and a kernel
    window past the run's end is an error, not a silent empty table."""
    mod = _load("offline_throughput")
    from graphrt import Engine

    wl = mod.Workload(prompts=[[1, 2, 3], [4, 5, 6, 7]], output_lens=[3, 2])
    eng = Engine(str(llama), load_format="dummy", device="cpu", show_progress=False)
    try:
        p = mod.profile_steps(eng, wl)
        assert p["cuda"] is False and p["steps"] >= 3 and not eng.has_unfinished()
        # step() calls: with overlap one more than planned steps, to process the last one,
        # and with the text side on its thread one more, to take its last outputs.
        assert mod._run_steps(eng, wl) in range(p["steps"], p["steps"] + 3)
        sys.path.insert(0, str(BENCH))  # profile_kernels imports step_profile by name
        try:
            with pytest.raises(RuntimeError, match="window"):
                mod.profile_kernels(eng, wl, first=1, steps=50)
        finally:
            sys.path.remove(str(BENCH))
        assert not eng.has_unfinished()
    finally:
        eng.shutdown()


def test_offline_workload_is_seeded_and_in_range() -> None:
    mod = _load("offline_throughput")
    args = mod.parse_args(["--model", "x", "--num-requests", "50", "--workload-seed", "3"])
    a, b = mod.make_workload(args, 100), mod.make_workload(args, 100)
    assert a.prompts == b.prompts and a.output_lens == b.output_lens
    assert all(64 <= len(p) <= 1024 and max(p) < 100 for p in a.prompts)
    assert all(64 <= o <= 512 for o in a.output_lens)
    sub = a.subsample(10, 70)
    assert sub.prompts == a.prompts[:10] and max(sub.output_lens) <= 70
    batches = mod.hf_batches(a.subsample(10, None), 4)
    lens = [a.output_lens[i] for b in batches for i in b]
    assert lens == sorted(lens) and [len(b) for b in batches] == [4, 4, 2]
    with pytest.raises(SystemExit):
        mod.parse_args(["--model", "x", "--repeats", "3"])


def test_offline_decode_ceiling_arithmetic() -> None:
    mod = _load("offline_throughput")
    wl = mod.Workload(prompts=[[0] * 10, [0] * 20], output_lens=[3, 1])
    c = mod.decode_ceiling(wl, weight_bytes=100, kv_bytes_per_token=1, max_batch=2, bw=1.0)
    # Request 0 decodes 2 tokens reading 11 and 12 KV tokens; request 1 only prefills.
    assert c["decode_steps"] == 1 and c["bytes"] == 100 + 23
    assert c["output_tok_s"] == pytest.approx(4 / 123)


def test_prefill_flops_and_the_roofline_with_prompts(llama) -> None:
    """Prefill FLOPs by hand for the tiny Llama: 2 x non-embedding weights per new token, the
    LM head once, and causal attention over each new token's context, cached tokens included.
    The roofline charges KV reads at HBM bandwidth, prompt attention at the GEMM rate, and the
    longer of the steps' weight reads and every row's dense FLOPs."""
    from graphrt import Engine
    from graphrt.measure import prefill_flops

    mod = _load("offline_throughput")
    eng = Engine(str(llama), show_progress=False, max_model_len=256)
    c = eng.runner.model_cfg
    emb = c.vocab_size * c.hidden_size
    body = sum(p.numel() for p in eng.runner.model.parameters()) - emb
    if not c.tie_word_embeddings:
        body -= emb
    per_ctx = 4 * c.num_layers * c.num_heads * c.head_dim
    assert prefill_flops(eng, 10) == pytest.approx(2 * body * 10 + per_ctx * 55 + 2 * emb)
    # 4 cached tokens, 6 new at contexts 5..10.
    assert prefill_flops(eng, 10, cached=4) == pytest.approx(2 * body * 6 + per_ctx * 45 + 2 * emb)
    wl = mod.Workload(prompts=[[0] * 10, [0] * 20], output_lens=[3, 1])
    decode = mod.decode_ceiling(wl, weight_bytes=1000, kv_bytes_per_token=1, max_batch=2, bw=1.0)
    assert decode["decode_rows"] == 2 and decode["kv_bytes"] == 23
    attn = per_ctx * (55 + 210)
    # Two decode rows pay body + head, 30 prompt tokens pay body, each prompt one head row.
    dense = 2 * (2 * body + 2 * emb) + 30 * 2 * body + 2 * 2 * emb
    for rate, bound in ((1.0, "flops"), (1e12, "bytes")):
        b = mod.roofline_ceiling(wl, decode, eng, rate, bw=1.0)
        want = 23 + attn / rate + max(1000, dense / rate)
        assert b["dense_bound"] == bound and b["seconds"] == pytest.approx(want)
        assert b["output_tok_s"] == pytest.approx(4 / want)
    eng.shutdown()


# ---- decode roofline --------------------------------------------------------------------------


def test_prefix_cache_benchmark_runs_and_reports(llama, tmp_path, capsys) -> None:
    out = tmp_path / "prefix.json"
    args = ["--model", str(llama), "--device", "cpu", "--repeats", "3", "--json", str(out)]
    args += ["--num-requests", "4", "--system-len", "40", "--question-len", "8"]
    args += ["--output-len", "3", "--conversations", "2", "--turns", "3"]
    args += ["--first-turn-len", "20", "--turn-len", "6"]
    assert _load("prefix_cache").main(args) == 0
    res = json.loads(out.read_text())
    w = res["workloads"]
    assert set(w) == {"shared", "multiturn", "none"}
    for wl in w.values():
        assert len(wl["runs"]["on"]) == len(wl["runs"]["off"]) == 3
        assert all(r["hit_rate"] == 0 for r in wl["runs"]["off"])
    # 4 x 48-token prompts sharing 40: two full pages of each of the last three are cached.
    assert w["shared"]["stats"]["on"]["hit_rate"]["median"] == pytest.approx(3 * 32 / (4 * 48))
    assert w["multiturn"]["stats"]["on"]["hit_rate"]["median"] > 0.2
    assert w["none"]["stats"]["on"]["hit_rate"]["median"] == 0
    assert "on/off  throughput" in capsys.readouterr().out
    suite = _load("gpu_suite")
    table = suite.section_prefix({"phases": [{"kind": "prefix", "model": "m", "result": res}]})
    assert any(line.startswith("| shared |") for line in table)


def test_prefill_latency_runs_and_the_suite_reports_it(llama, tmp_path, capsys) -> None:
    """On CPU: both engines (mixed step function and eager) run every repetition, each prompt
    is one prefill step, and the suite's table shows the two side by side; the suite plans the
    phase only when asked (opt-in)."""
    out = tmp_path / "prefill.json"
    args = ["--model", str(llama), "--device", "cpu", "--repeats", "3", "--json", str(out)]
    args += ["--prompt-lens", "16", "40", "--max-model-len", "128"]
    assert _load("prefill_latency").main(args) == 0
    res = json.loads(out.read_text())
    for n in ("16", "40"):
        runs = res["lens"][n]["runs"]
        assert len(runs["graphs"]) == len(runs["eager"]) == 3
        assert all(r["graph"] == 1.0 for r in runs["graphs"])  # through the mixed step function
        assert all(r["graph"] == 0.0 for r in runs["eager"])
        assert res["lens"][n]["flop_bound_ms"] is None  # no GEMM rate without CUDA
    assert "through mixed graphs" in capsys.readouterr().out
    suite = _load("gpu_suite")
    table = suite.section_prefill({"phases": [{"kind": "prefill", "model": "m", "result": res}]})
    assert any(line.startswith("| 16 |") for line in table)
    args = suite.parse_args(["--only", "prefill", *NO_WHEELS])
    phases = suite.plan(args, Path("/tmp/w"), Path("/tmp/o"))
    assert [p.name for p in phases] == ["prefill:llama-3.2-1b", "prefill:llama-3.1-8b"]
    assert phases[0].argv[1] == "benchmarks/prefill_latency.py" and "1024" in phases[0].argv


def test_decode_roofline_runs_and_reports(llama, tmp_path) -> None:
    mod = _load("decode_roofline")
    out = tmp_path / "roofline.json"
    argv = ["--model", str(llama), "--load-format", "dummy", "--device", "cpu"]
    argv += ["--batch-sizes", "1", "3", "--context-len", "24", "--steps", "2"]
    argv += ["--warmup-steps", "1", "--json", str(out)]
    assert mod.main(argv) == 0
    d = json.loads(out.read_text())
    h = d["header"]
    assert h["weight_bytes"] > 0 and h["kv_bytes_per_token"] > 0 and h["repeats"] == 5
    assert [r["bs"] for r in d["rows"]] == [1, 3]
    for r in d["rows"]:
        assert _is_stat(r["engine"]["step_ms"]) and _is_stat(r["engine"]["tok_s"])
        assert 18 <= r["context_len"] <= 30
        # What a step reads: the weights less the tiny Llama's untied input embedding, + KV.
        assert h["step_weight_bytes"] < h["weight_bytes"]
        assert r["engine"]["bytes_per_step"] > h["step_weight_bytes"]
        # No CUDA: no bandwidth, graphs or MBU, and nothing made up in their place.
        assert r["engine"]["mbu"] is None and r["replay"] is None and r["roofline_ms"] is None


def test_suite_fp8_phase_runs_the_roofline_quantized_and_reports_it_beside_bf16(
    llama, tmp_path
) -> None:
    """The suite's opt-in FP8 phase (issue #21) is the roofline with ``--quantization fp8``; on
    CPU the quantized roofline runs, and the suite's table puts it beside the bf16 one."""
    mod, suite = _load("decode_roofline"), _load("gpu_suite")
    res = {}
    for q in ("fp8", None):
        out = tmp_path / f"roofline-{q}.json"
        argv = ["--model", str(llama), "--load-format", "dummy", "--device", "cpu"]
        argv += ["--batch-sizes", "1", "2", "--context-len", "24", "--steps", "2"]
        argv += ["--warmup-steps", "1", "--json", str(out)]
        assert mod.main([*argv, "--quantization", "fp8"] if q else argv) == 0
        res[q] = json.loads(out.read_text())
    assert res["fp8"]["header"]["weight_bytes"] < res[None]["header"]["weight_bytes"]
    phases = [
        {"kind": "fp8", "model": "m", "result": res["fp8"]},
        {"kind": "roofline", "model": "m", "result": res[None]},
    ]
    table = suite.section_fp8({"phases": phases})
    assert "in FP8 against" in table[0]
    rows = [line for line in table if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert len(rows) == 2 and all("×" in r for r in rows)
    plan = suite.plan(
        suite.parse_args(["--only", "fp8", *NO_WHEELS]), Path("/tmp/w"), Path("/tmp/o")
    )
    assert [p.name for p in plan] == ["fp8:llama-3.2-1b", "fp8:llama-3.1-8b"]
    argv = plan[1].argv
    assert argv[1] == "benchmarks/decode_roofline.py" and "--quantization" in argv
    sizes = argv[argv.index("--batch-sizes") + 1 : argv.index("--repeats")]
    assert sizes == ["1", "8", "64", "256"]  # the roofline phase's
    default = suite.plan(suite.parse_args([]), Path("/tmp/w"), Path("/tmp/o"))
    assert not any(p.kind == "fp8" for p in default)  # opt-in


# ---- API capacity (mock engine) -------------------------------------------------------------


def test_kernels_smoke_ops_gemv_and_argmax(tmp_path) -> None:
    """kernel_bench.py's fused-op, GEMV and argmax sections and their sweeps run end to end
    (interpreted, tiny shapes)."""
    import subprocess

    out = tmp_path / "k.json"
    cmd = [sys.executable, str(BENCH / "kernel_bench.py"), "--smoke", "--sweep", "--reps", "2"]
    cmd += ["--only", "ops", "gemv", "argmax", "--json", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())["results"]
    impls = {(x["name"].split()[0], x["impl"]) for x in rows}
    assert {("linear", "cublas"), ("linear", "triton"), ("linear", "triton-sweep")} <= impls
    assert {("silu+down", "silu+cublas"), ("silu+down", "triton-silu")} <= impls
    assert ("silu+down", "triton-sweep") in impls
    assert {("norm+down", "norm+triton"), ("norm+down", "triton-norm")} <= impls
    assert ("norm+down", "triton-sweep") in impls
    assert {("argmax", "torch"), ("argmax", "triton")} <= impls
    norm = [x for x in rows if x["name"] == "rmsnorm+residual b4 h256"]
    assert {x["impl"] for x in norm} >= {"triton", "torch", "triton-sweep", "copy"}
    copy = next(x for x in norm if x["impl"] == "copy")
    assert copy["bytes"] == 4 * 4 * 256 * 4  # the op's activations (fp32 here), not its weight
    configs = [x["extra"]["config"] for x in norm if x["impl"] == "triton-sweep"]
    assert {c["rows_per_program"] for c in configs} == {2, 8} and {c["evict"] for c in configs} == {
        False,
        True,
    }
    assert "benchmark section failed" not in r.stderr


def test_kernels_smoke_fp8() -> None:
    """kernel_bench.py's FP8 section (bf16 linear, FP8 GEMV past its row bound too, the fused
    down projection, the sweep) runs end to end, interpreted, and prints its summary table.
    The checkout root goes first on the path, so the script imports this tree's graphrt."""
    import os
    import subprocess

    cmd = [sys.executable, str(BENCH / "kernel_bench.py"), "--smoke", "--sweep", "--reps", "2"]
    cmd += ["--only", "fp8", "--gemv-rows", "1", "65"]
    env = {**os.environ, "PYTHONPATH": str(BENCH.parent)}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "benchmark section failed" not in r.stderr
    table = r.stdout.split("fp8 vs bf16", 1)[1].splitlines()
    shapes = [line.split()[:3] for line in table[2:] if line.startswith("  ") and "x" in line]
    assert shapes == [
        ["tiny", "down", "m1"],
        ["silu+down", "tiny", "m1"],
        ["tiny", "down", "m65"],
        ["silu+down", "tiny", "m65"],
    ]
    assert "past the row bound" in r.stdout  # m65: the GEMV timed beyond fp8_linear's bound
    assert "split_k=2" in r.stdout  # the sweep past the bound includes split-K configs
    assert "silu_mul GemvConfig" in r.stdout  # one row: the SiLU-fused load swept too


def test_kernels_decode_over_an_fp8_cache() -> None:
    """kernel_bench.py's decode section over an e4m3 cache (``--kv-cache-dtype fp8``): the
    Triton kernel (interpreted) and the torch reference read it with its scales, and the bytes
    count one a KV value."""
    import subprocess

    kb = _load("kernel_bench")
    case = kb.DecodeCase(2, 40, 4, 2, 32, 16, 256, fp8_kv=True)
    _, k, v, q, _, nbytes = kb._decode_setup(case, torch.device("cpu"), torch.float32)
    assert k.dtype == v.dtype == torch.float8_e4m3fn
    assert nbytes == 2 * 2 * 40 * 2 * 32 * 1 + 2 * q.numel() * 4
    rows = kb.bench_decode(kb.Timer(torch.device("cpu"), 2), torch.device("cpu"), case, False, True)
    assert {r.impl for r in rows} >= {"triton", "torch"}
    assert all(r.name.endswith("kv-fp8") for r in rows)
    r = subprocess.run(
        [sys.executable, str(BENCH / "kernel_bench.py"), "--help"], capture_output=True, text=True
    )
    assert "--decode-cases" in r.stdout and "--kv-cache-dtype" in r.stdout


def test_step_profile_without_cuda_says_so() -> None:
    sp = _load("step_profile")
    assert sp.main(["--model", "unused"]) == 0
    assert sp.short_name("void at::native::(anonymous namespace)::indexSelect<float>(x)") == (
        "at::indexSelect"
    )
    assert sp.short_name("_gemv_kernel_0d1d") == "_gemv_kernel"


def test_api_capacity_with_mock_engine(tmp_path) -> None:
    mod = _load("api_capacity")
    out = tmp_path / "capacity.json"
    argv = ["--streams", "3", "--step-ms", "5", "--output-len", "12", "--repeats", "2"]
    assert mod.main([*argv, "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    assert len(d["rounds"]) == 2
    for r in d["rounds"]:
        assert r["completed"] == 3 and r["failed"] == 0
        assert r["tokens"] == 36 and 1 <= r["chunks"] <= 36
        assert r["api_cpu_s"] >= 0 and r["engine_cpu_s"] >= 0
        assert r["itl_ms"]["median"] is not None
    s = d["summary"]["api_us_per_chunk"]
    assert s["min"] <= s["median"] <= s["max"]


# ---- the GPU suite ------------------------------------------------------------------------------


def _phase(suite, name: str, argv: list[str], **kw):
    return suite.Phase(name=name, kind=kw.pop("kind", "roofline"), argv=argv, budget_s=5, **kw)


def test_suite_runner_reports_missing_failed_timeout_and_ok(tmp_path) -> None:
    suite = _load("gpu_suite")
    env = suite.subprocess_env(str(tmp_path / "no-wheels"))
    py = sys.executable
    js = tmp_path / "ok.json"
    log = (tmp_path / "log.txt").open("w")
    missing = _phase(suite, "a", [py, "-c", "1"], requires="benchmarks/not_there.py")
    failed = _phase(suite, "b", [py, "-c", "print('boom'); raise SystemExit(3)"])
    slow = _phase(suite, "c", [py, "-c", "import time; print('hi', flush=True); time.sleep(60)"])
    write = f"import json; json.dump({{'rows': [1]}}, open({str(js)!r}, 'w'))"
    ok = _phase(suite, "d", [py, "-c", write], json_path=str(js))
    nojson = _phase(suite, "e", [py, "-c", "1"], json_path=str(tmp_path / "never.json"))
    assert suite.run_phase(missing, 5, env, log).status == "missing"
    r = suite.run_phase(failed, 20, env, log)
    assert (r.status, r.rc, r.log_tail) == ("failed", 3, ["boom"])
    t0 = time.perf_counter()
    r = suite.run_phase(slow, 1.5, env, log)
    assert r.status == "timeout" and r.log_tail == ["hi"] and time.perf_counter() - t0 < 20
    r = suite.run_phase(ok, 20, env, log)
    assert r.status == "ok" and r.result == {"rows": [1]}
    assert suite.run_phase(nojson, 20, env, log).status == "failed"
    log.close()
    assert "boom" in (tmp_path / "log.txt").read_text()


def test_suite_schedule_gives_slack_forward_and_skips_when_out_of_time() -> None:
    suite = _load("gpu_suite")
    # On schedule: a phase gets its budget plus the slack, later budgets stay reserved.
    assert suite.schedule_timeout(30, later=100, deadline=200, now=0) == 100
    # Behind schedule: still its own budget while the run has it (priority order).
    assert suite.schedule_timeout(30, later=100, deadline=50, now=0) == 30
    assert suite.schedule_timeout(30, later=0, deadline=20, now=0) == 20
    assert suite.schedule_timeout(30, later=0, deadline=5, now=0) is None


def test_suite_plan_only_models_and_dry_run(capsys, tmp_path) -> None:
    suite = _load("gpu_suite")
    only = ["--only", "roofline,tests", "--models", "llama-3.2-1b"]
    phases = suite.plan(suite.parse_args([*only, *NO_WHEELS]), Path("/tmp/w"), Path("/tmp/o"))
    assert [p.name for p in phases] == ["tests", "roofline:llama-3.2-1b"]
    # With wheels to install, the install phase runs first whatever --only names.
    (tmp_path / "x-1.0-py3-none-any.whl").write_bytes(b"")
    args = suite.parse_args([*only, "--wheels", str(tmp_path)])
    with_wheels = suite.plan(args, Path("/tmp/w"), Path("/tmp/o"))
    assert [p.name for p in with_wheels] == ["install", "tests", "roofline:llama-3.2-1b"]
    assert "not flashinfer" in phases[0].argv and "tests/test_benchmarks.py" not in phases[0].argv
    assert phases[1].argv[1] == "benchmarks/decode_roofline.py" and "--json" in phases[1].argv
    full = suite.plan(suite.parse_args([]), Path("/tmp/w"), Path("/tmp/o"))
    assert sum(p.budget_s for p in full) <= 540
    assert {p.kind for p in full} == set(suite.KINDS) - set(suite.OPT_IN)
    args = suite.parse_args(["--only", "prefix", *NO_WHEELS])
    prefix = suite.plan(args, Path("/tmp/w"), Path("/tmp/o"))
    assert [p.name for p in prefix] == ["prefix:llama-3.2-1b", "prefix:llama-3.1-8b"]
    assert prefix[0].argv[1] == "benchmarks/prefix_cache.py"
    with pytest.raises(SystemExit):
        suite.parse_args(["--only", "nonsense"])
    assert suite.main(["--dry-run", "--quick"]) == 0
    assert "offline:llama-3.1-8b" in capsys.readouterr().out


def _stat(m: float, lo: float, hi: float) -> dict:
    return {"median": m, "min": lo, "max": hi, "values": [lo, m, hi, m, m]}


def sample_suite() -> dict:
    """A suite JSON as the benchmarks write it (figures are made up for the test only)."""
    roof = {
        "header": {"hbm_bytes_per_s": 3.0e12, "weight_bytes": 16.06e9, "kv_bytes_per_token": 131072,
                   "attention_backend": "triton"},
        "rows": [
            {"bs": 1, "context_len": 256,
             "engine": {"step_ms": _stat(6.1, 6.0, 6.3), "tok_s": _stat(163.9, 158.7, 166.7),
                        "mbu": _stat(0.881, 0.85, 0.89), "bytes_per_step": 16.09e9},
             "replay": {"step_ms": _stat(6.0, 5.9, 6.1), "mbu": _stat(0.89, 0.88, 0.9)},
             "overhead_ratio": _stat(1.017, 1.0, 1.05), "roofline_ms": 5.36,
             "roofline_tok_s": 186.6},
            {"bs": 64, "context_len": 256, "engine": {"step_ms": _stat(8, 7.9, 8.2),
             "tok_s": _stat(8000, 7800, 8100), "mbu": None}, "replay": None,
             "overhead_ratio": None, "roofline_ms": None, "roofline_tok_s": None},
        ],
    }  # fmt: skip
    offline = {
        "header": {"workload": {"requests": 1000, "prompt_len": {"min": 64, "max": 1024},
                                "output_len": {"min": 64, "max": 512}},
                   "max_num_seqs": 256, "attention_backend": "triton"},
        "graphrt": {"requests_per_s": _stat(140, 138, 141),
                    "output_tok_s": _stat(41234, 40100, 41900),
                    "total_tok_s": _stat(120000, 119000, 121000)},
        "ceiling": {"output_tok_s": 80000.0},
        "peer": {"subsample": {"requests": 64}, "max_output_len": 128,
                 "graphrt_same_requests": {"requests_per_s": _stat(9, 8, 10),
                                           "output_tok_s": _stat(9000, 8000, 9500),
                                           "total_tok_s": _stat(40000, 39000, 41000)},
                 "generate": {"batch_size": 64, "requests_per_s": _stat(1, 0.9, 1.1),
                              "output_tok_s": _stat(1114, 1100, 1120),
                              "total_tok_s": _stat(5000, 4900, 5100)},
                 "cb": {"error": "RuntimeError: out of memory"}},
        "ratios": {"graphrt_vs_hf_generate": 37.01, "graphrt_vs_hf_generate_same_requests": 8.08},
        "profile": {"cuda": True, "wall_s": 7.5, "gpu_idle_s": 0.22, "steps": 1434,
                    "kinds": {"decode, graph": {"steps": 1311, "gpu_s": 4.61,
                                                "share_of_wall": 0.614, "gpu_ms_per_step": 3.52,
                                                "rows_per_step": 200.0,
                                                "prefill_tokens_per_step": 0.0,
                                                "launch_ms": 0.47}}},
    }  # fmt: skip
    overlap = {
        "rows": [{"bs": 8, "mode": "thread", "step_ms": _stat(2.0, 1.9, 2.1), "ceiling_ms": 1.95,
                  "overhead_ratio": _stat(1.02, 1.0, 1.03), "gpu_idle": _stat(0.02, 0.01, 0.03),
                  "tok_s": _stat(4000, 3900, 4100), "schedule_ms": _stat(0.1, 0.1, 0.1),
                  "process_ms": _stat(0.05, 0.05, 0.05), "launch_ms": _stat(0.03, 0.03, 0.03),
                  "handoff_ceiling_ms": 1.97, "late_steps": _stat(0.25, 0.0, 0.5),
                  "ratio_to_adjacent_replay": _stat(1.01, 1.0, 1.02)}],
        "seed_question": [{"bs": 8, "ratio": 1.004}],
    }  # fmt: skip
    capture = {
        "context_len": 256, "graph_memory_bytes": 123e6, "hbm_bytes_per_s": 3.0e12,
        "rows": [{"bs": 1, "capture_ms": 50.0, "graph_mb": 10.0, "eager_ms": 20.0,
                  "replay_ms": 6.0, "replay_issue_us": 25.0, "replay_issue_idle_us": 60.0,
                  "speedup": 3.3,
                  "roofline_ms": 5.36, "mbu": 0.893}],
    }  # fmt: skip
    kernels = {
        "meta": {"hbm_gbps": 3010.0},
        "results": [{"name": "decode b64 ctx2048", "impl": "triton", "median_us": 180.0,
                     "times_us": [179.0, 180.0, 181.0], "gbps": 2900.0, "pct_hbm": 96.3}],
    }  # fmt: skip

    def ph(name: str, kind: str, model: str | None, status: str, result=None, **kw) -> dict:
        tail = kw.pop("log_tail", [])
        return {"name": name, "kind": kind, "model": model, "status": status, "budget_s": 30,
                "wall_s": 12.0, "result": result, "log_tail": tail, **kw}  # fmt: skip

    return {
        "suite": {"date": "2026-11-27T10:00:00+00:00", "commit": "abc123", "dirty": False,
                  "profile": "full", "budget_s": 510, "wall_s": 480.0,
                  "command": "python benchmarks/gpu_suite.py"},
        "env": {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0+cu130", "python": "3.12.3"},
        "phases": [
            ph("tests", "tests", None, "ok", summary="40 passed, 3 deselected in 61.0s"),
            ph("roofline:llama-3.1-8b", "roofline", "llama-3.1-8b", "ok", roof),
            ph("offline:llama-3.2-1b", "offline", "llama-3.2-1b", "timeout", offline,
               note="partial JSON kept", log_tail=["", "Killed while running HF"]),
            ph("overlap:llama-3.2-1b", "overlap", "llama-3.2-1b", "ok", overlap),
            ph("capture:llama-3.2-1b", "capture", "llama-3.2-1b", "ok", capture),
            ph("kernels", "kernels", None, "missing", note="kernel_bench.py is not here"),
            ph("kernels2", "kernels", None, "ok", kernels),
            ph("capture:llama-3.1-8b", "capture", "llama-3.1-8b", "skipped", wall_s=None),
        ],
    }  # fmt: skip


def test_suite_table_from_sample_json() -> None:
    suite = _load("gpu_suite")
    md = suite.build_markdown(sample_suite())
    assert md.startswith("# graphrt GPU suite: NVIDIA H100 80GB HBM3, 2026-11-27")
    assert "commit abc123" in md
    for title, _ in suite.SECTIONS:
        assert f"## {title}" in md
    assert "could not render" not in md
    # Phases: every status is shown, with the last output line of a killed phase.
    assert "| tests | ok | 12 / 30 | 40 passed, 3 deselected in 61.0s |" in md
    assert "| offline:llama-3.2-1b | timeout |" in md and "Killed while running HF" in md
    assert "| kernels | missing |" in md and "| capture:llama-3.1-8b | skipped | - / 30 |" in md
    # Headline: graphrt with spread, the HF peer with the ratio, the ceiling.
    assert "41,234 [40,100–41,900]" in md and "HF generate 1,114 (37.0×; same requests 8.1×)" in md
    assert "HF CB: RuntimeError: out of memory" in md
    assert "80,000 decode-only HBM bound (graphrt at 51.5%)" in md
    assert "| llama-3.1-8b | decode bs 1, ctx 256, tok/s | 164 [159–167] (6.10 ms, MBU 88.1%)" in md
    assert "187 HBM roofline (5.36 ms)" in md
    # Detail tables.
    assert "| 1 | 256 | 6.100 [6.000–6.300] | 6.000 [5.900–6.100] | 5.360 | 1.017 |" in md
    assert "| 64 | 256 | 8.000 [7.900–8.200] | - | - | - |" in md
    assert "HF generate, first 64 requests, outputs ≤ 128, batch 64 | 1.00 [0.90–1.10]" in md
    assert ("| 8 | thread | 2.000 [1.900–2.100] | 1.950 | 1.020 [1.000–1.030] | "
            "1.010 [1.000–1.020] | 1.010 | "
            "2.0 [1.0–3.0] | 25 | 4,000") in md  # fmt: skip
    assert "bs 8: 1.004" in md
    assert "graphrt / HF generate: 37.0× per token, 8.1× on the same requests." in md
    assert "GPU idle between steps 0.22 s" in md
    assert "| decode, graph | 1311 | 4.61 (61%) | 3.52 | 200 | 0 | 0.47 |" in md
    assert "| 1 | 50.0 | 10.0 | 20.000 | 6.000 | 25.0 | 60.0 | 3.3 | 5.360 | 89.3% |" in md
    assert "| decode b64 ctx2048 | triton | 180.00 [179.00–181.00] | 2,900 | 96.3 |" in md


def test_suite_table_survives_a_changed_benchmark_json() -> None:
    suite = _load("gpu_suite")
    s = sample_suite()
    s["phases"][1]["result"] = {"rows": [{"bs": 1, "engine": "not a dict"}]}
    md = suite.build_markdown(s)
    assert "could not render this section" in md
    assert "## Offline throughput" in md and "41,234 [40,100–41,900]" in md
    assert suite.build_markdown({}).count("No ") >= 5  # an empty run still renders


# ---- CPU step cost ----------------------------------------------------------------------------


def test_cpu_step_cost_smoke(default_model_dir, tmp_path) -> None:
    mod = _load("cpu_step_cost")
    out = tmp_path / "cpu.json"
    rc = mod.main(["--smoke", "--tokenizer", str(default_model_dir), "--json", str(out)])
    assert rc == 0
    d = json.loads(out.read_text())
    assert d["batch_size"] == 4
    for w in mod.WORKLOADS:
        for key in ("schedule_ms", "core_ms", "text_ms", "core_total_ms", "total_ms"):
            assert d[w][key]["median"] > 0
        assert d[w]["total_ms"]["median"] >= d[w]["core_total_ms"]["median"]


def test_profiler_events_grouped_and_overlap_union() -> None:
    """step_profile's event reading (also the offline benchmark's kernel profile): CUDA events only,
    copies named by kind, per-step grouping; the busy time of overlapping (PDL) kernels is the
    union of their intervals, not the sum."""
    from types import SimpleNamespace

    sp = _load("step_profile")
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def ev(name, start, dur, dev=cuda):
        return SimpleNamespace(
            name=name, device_type=dev, device_time=dur, time_range=SimpleNamespace(start=start)
        )

    prof = SimpleNamespace(
        events=lambda: [
            ev("_gemv_kernel_0d1d2d", 0.0, 10.0),
            ev("_gemv_kernel_0d1d2d", 8.0, 10.0),  # overlaps the first by 2 us
            ev("Memcpy HtoD (Pinned -> Device)", 30.0, 2.0),
            ev("aten::mm", 0.0, 50.0, cpu),  # host events are not GPU time
            ev("_rms_norm_kernel", 40.0, 0.0),  # no device time recorded
        ]
    )
    events = sp.gpu_events(prof)
    assert [e[0] for e in events] == ["_gemv_kernel", "_gemv_kernel", "Memcpy HtoD"]
    table = sp.group_events(events, steps=2)
    assert table["kernel_us"] == 11.0 and table["launches"] == 1.5
    assert table["kernels"][0] == {"kernel": "_gemv_kernel", "calls": 1.0, "us": 10.0,
                                   "share": 20 / 22}  # fmt: skip
    assert sp.busy_us(events) == 18.0 + 2.0
    assert sp.span_us(events) == 32.0
    # One gap, 18 -> 30 us, between the second GEMV (which ends last) and the copy.
    gaps = sp.gap_table(events, steps=2)
    assert gaps["gap_us"] == 6.0
    assert gaps["pairs"] == [
        {"before": "_gemv_kernel", "after": "Memcpy HtoD", "count": 0.5, "us": 6.0}
    ]
    # An op that starts inside an earlier, longer one leaves no gap and does not become "last".
    nested = [("a", 0.0, 10.0), ("b", 2.0, 3.0), ("c", 12.0, 1.0)]
    assert sp.gap_table(nested, steps=1)["pairs"] == [
        {"before": "a", "after": "c", "count": 1.0, "us": 2.0}
    ]


def test_structured_outputs_benchmark_constrains_every_step(default_model_dir, tmp_path) -> None:
    pytest.importorskip("xgrammar")
    out = tmp_path / "so.json"
    args = ["--model", str(default_model_dir), "--batch-size", "3", "--prompt-len", "8"]
    args += ["--output-len", "6", "--repeats", "5", "--max-model-len", "64", "--json", str(out)]
    assert _load("structured_outputs").main([*args, "--profile"]) == 0
    res = json.loads(out.read_text())
    c, u = res["runs"]["constrained"], res["runs"]["unconstrained"]
    # --profile: one more run per mode, with the scheduler thread's time per decode step
    for m in ("constrained", "unconstrained"):
        prof = res["profile"][m]
        assert prof["output_tokens"] == 18 and prof["process_ms"] > 0 and prof["schedule_ms"] > 0
        assert 0 <= prof["late_steps"] <= 1
        assert prof["masks_late_steps"] is None  # CUDA events only: nothing made up on the CPU
    assert res["profile"]["constrained"]["mask_steps"] == 6
    # The suite's opt-in phase runs this benchmark and tables it.
    suite = _load("gpu_suite")
    table = suite.section_structured(
        {"phases": [{"kind": "structured", "model": "m", "result": res}]}
    )
    assert "constrained / unconstrained" in table[0]
    rows = [line.split(" |")[0] for line in table if line.startswith("| ")]
    assert rows[-2:] == ["| constrained", "| unconstrained"]
    wheels = tmp_path / "wheels"
    args = suite.parse_args(["--only", "structured:llama-3.2-1b", "--wheels", str(wheels)])
    (ph,) = suite.plan(args, Path("/tmp/w"), Path("/tmp/o"))
    assert ph.argv[1] == "benchmarks/structured_outputs.py"
    assert ph.argv[ph.argv.index("--tokenizer") + 1] == str(wheels / "smollm2-tokenizer")
    assert ph.requires == str(wheels / "smollm2-tokenizer" / "tokenizer.json")  # not there
    assert len(c) == len(u) == 5
    # Every step of every constrained run filled masks; no unconstrained one did.
    assert all(r["mask_steps"] == 6 and r["output_tokens"] == 18 for r in c)
    assert all(r["mask_steps"] == 0 and r["output_tokens"] == 18 for r in u)
    assert res["ratio"]["median"] > 0
    assert all(r["accept_ms_per_step"] > 0 for r in c)


def test_structured_outputs_benchmark_records_and_host_sweep(default_model_dir, tmp_path) -> None:
    """The records schema constrains every step too, and the host sweep times fill and accept
    at each thread count asked for."""
    pytest.importorskip("xgrammar")
    out = tmp_path / "so.json"
    args = ["--model", str(default_model_dir), "--batch-size", "4", "--prompt-len", "8"]
    args += ["--output-len", "6", "--repeats", "5", "--max-model-len", "64", "--json", str(out)]
    args += ["--schema", "records", "--host-sweep", "--grammar-threads-sweep", "1", "2"]
    assert _load("structured_outputs").main(args) == 0
    res = json.loads(out.read_text())
    assert all(r["mask_steps"] == 6 for r in res["runs"]["constrained"])
    assert set(res["host_sweep"]) == {"1", "2"}
    for r in res["host_sweep"].values():
        assert r["fill_ms"]["median"] > 0 and r["accept_ms"]["median"] > 0
    # --host-only: the sweep, then nothing else
    args = ["--model", str(default_model_dir), "--batch-size", "2", "--host-only"]
    args += ["--grammar-threads-sweep", "1", "--json-whitespace", "flexible", "--json", str(out)]
    assert _load("structured_outputs").main(args) == 0
    res = json.loads(out.read_text())
    assert set(res["host_sweep"]) == {"1"} and "runs" not in res
    assert res["settings"]["json_whitespace"] == "flexible"
