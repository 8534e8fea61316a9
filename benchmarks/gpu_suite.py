"""The one-run GPU suite: install the wheels, run the GPU tests and every benchmark, write one JSON
file and a markdown table, print the table last.

Made for a bare H100 machine with no network (GPU.md): Python 3.12, torch, triton and
transformers installed; flashinfer only as wheels carried in ``.wheels/``. graphrt is imported
from this checkout (``PYTHONPATH``), never pip-installed there.

    python benchmarks/gpu_suite.py                      # everything, under 9 minutes
    python benchmarks/gpu_suite.py --only roofline,offline --models llama-3.2-1b
    python benchmarks/gpu_suite.py --quick              # smaller sizes, for a first look
    python benchmarks/gpu_suite.py --dry-run            # the plan: phases, budgets, commands

Phases run in priority order, each in its own process with a timeout, so one slow or hung phase
cannot sink the others. The whole run has a budget (``--budget``, default 540 s). Each phase
gets its own budget plus whatever earlier phases left unused; a phase that does not finish in
time is killed and reported as ``timeout``, one that cannot start in time as ``skipped``, and a
benchmark script that is not in the checkout as ``missing``. What a killed phase had already
written (the benchmarks save JSON as they go) is kept.

Outputs, in ``--out`` (default ``$OUT``, else ``out/gpu_suite``): ``gpu_suite.json`` (everything,
each phase's own JSON included), ``gpu_suite.md`` (the tables), ``gpu_suite.log`` (every phase's
output) and the capture-profile plots. Both JSON and markdown are rewritten after every phase.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

REPO = Path(__file__).resolve().parents[1]
MODELS = {
    "llama-3.2-1b": "benchmarks/models/llama-3.2-1b",
    "llama-3.1-8b": "benchmarks/models/llama-3.1-8b",
}
KINDS = (
    "install", "tests", "roofline", "offline", "overlap", "capture", "profile", "kernels", "prefix",
    "prefill", "fp8", "structured",
)  # fmt: skip
# Kinds that run only when --only names them.
OPT_IN = ("prefix", "prefill", "fp8", "structured")
MIN_PHASE_S = 10.0  # a phase that would get less than this is skipped, not started

# What each phase needs on an H100 (model start-up included), from the wall times of runs L
# (ecfb117: on a slow host the tests and four 1B phases overran older budgets) and L2 (6f64dd9,
# every phase ok in 535 s; benchmarks/RESULTS.md) with the sizes below, moved to the 8B HF
# peer (run N: its load now takes 9 s) from the kernels phase (no flashinfer JIT) and the 1B
# HF load; the table reports every phase's wall time, so tune these from each real run. They
# sum to the default --budget.
BUDGETS: dict[str, float] = {
    "install": 5,
    "tests": 96,
    "roofline:llama-3.2-1b": 17,
    "roofline:llama-3.1-8b": 29,
    "offline:llama-3.2-1b": 143,
    "offline:llama-3.1-8b": 88,
    "overlap:llama-3.2-1b": 26,
    "overlap:llama-3.1-8b": 57,
    "capture:llama-3.2-1b": 11,
    "capture:llama-3.1-8b": 14,
    "profile:llama-3.2-1b": 21,
    "profile:llama-3.1-8b": 19,
    "kernels": 14,
    # Opt-in (OPT_IN): they need more than the default --budget leaves. `--only prefix` runs
    # them. Each workload runs on two engines, three times.
    "prefix:llama-3.2-1b": 150,
    "prefix:llama-3.1-8b": 330,
    # Two engines, mixed graphs on and off, 128- and 1,024-token prompts, 10 repetitions: ~50 s
    # on the 1B model (run U1), start-ups included; the 8B model's are estimated, not yet run.
    "prefill:llama-3.2-1b": 60,
    "prefill:llama-3.1-8b": 90,
    # The roofline with FP8 weights (1, 8, 16, 64 took 42 s on the 8B model, run s24d; 1 and
    # 64 ran past 45 s on a fresh machine in s27b, Triton compiling the one-pass norm kernels;
    # the phase runs the roofline phase's sizes); the bf16 figures beside them come from the
    # roofline phase, so run both.
    "fp8:llama-3.2-1b": 40,
    "fp8:llama-3.1-8b": 90,
    # Batch 64, every row JSON-constrained, against unconstrained, 5 pairs: about 30 s on the 1B
    # model (runs s24c-s24e), compiles and start-up included.
    "structured:llama-3.2-1b": 60,
    "structured:llama-3.1-8b": 120,
}
DEFAULT_BUDGET = {
    "roofline": 40, "offline": 90, "overlap": 40, "capture": 25, "profile": 30, "prefix": 150,
    "prefill": 60, "fp8": 60, "structured": 60,
}  # fmt: skip


@dataclass
class Phase:
    """One step of the suite: a command, its budget, where its JSON lands."""

    name: str
    kind: str
    argv: list[str]
    budget_s: float
    model: str | None = None
    requires: str | None = None  # a file of the checkout the phase needs ("missing" if absent)
    json_path: str | None = None
    note: str = ""


@dataclass
class PhaseResult:
    name: str
    kind: str
    model: str | None
    status: str  # ok | failed | timeout | missing | skipped
    budget_s: float
    timeout_s: float | None = None
    wall_s: float | None = None
    rc: int | None = None
    cmd: str = ""
    note: str = ""
    summary: str = ""
    log_tail: list[str] = field(default_factory=list)
    result: Any = None


# ---- the plan -----------------------------------------------------------------------------------


def _sizes(values: Iterable[int]) -> list[str]:
    return [str(v) for v in values]


def phase_args(kind: str, model: str, model_dir: str, profile: str) -> tuple[list[str], str]:
    """Benchmark arguments (after the script) for one model, and a note for the table."""
    big = "8b" in model
    m = ["--model", model_dir, "--load-format", "dummy"]
    if kind in ("roofline", "fp8"):
        # FP8 at the roofline's sizes, so the table sets each beside its bf16 figure.
        sizes = _sizes([1, 64, 256] if profile == "quick" else [1, 8, 64, 256])
        extra = ["--context-len", "256", "--steps", "8" if profile == "quick" else "16"]
        if kind == "fp8":
            extra += ["--quantization", "fp8"]
        return [*m, "--batch-sizes", *sizes, "--repeats", "5", *extra], f"bs {','.join(sizes)}"
    if kind == "offline":
        if profile == "quick":
            n, hf = ("64", None) if big else ("200", ("32", "32", "32"))
        else:
            # 8B: a smaller workload (its prefill alone is ~15 s per 1,000 requests), and a
            # smaller HF peer: HF's step costs ~65 ms whatever the batch (GPU.md), so 32 steps
            # of 32 requests give its rate in the time the suite has.
            n, hf = ("100", ("32", "32", "32")) if big else ("1000", ("64", "64", "128"))
        # Throughput settings (vLLM's offline LLM class likewise takes a larger token budget
        # than its server, 16384 against 8192 on an H100): prefill chunks of up to 8192 tokens,
        # admissions batched every 8 steps (an eager prefill step costs its whole CPU launch;
        # see RESULTS.md, offline throughput).
        args = ["--num-requests", n, "--repeats", "5", "--max-num-batched-tokens", "8192"]
        args += ["--admission-interval", "8"]
        if not big:
            args += ["--profile"]
        note = f"{n} requests, budget 8192, admission every 8 steps"
        if hf:
            req, bs, cap = hf
            args += ["--peer", "hf", "--hf-max-requests", req, "--hf-batch-size", bs]
            args += ["--hf-max-output-len", cap]
            if big:
                args += ["--hf-modes", "generate"]
            modes = "generate" if big else "generate + CB"
            note += f"; HF {modes}: first {req} requests, outputs <= {cap}, batch {bs}"
        return m + args, note
    if kind == "overlap":
        if profile == "quick":
            sizes = ["1", "64"]
        else:
            sizes = ["1", "64", "256"] if big else ["1", "8", "64", "256"]
        args = ["--batch-sizes", *sizes, "--repeats", "5", "--steps", "32", "--warmup-steps", "4"]
        if profile == "quick":
            args += ["--modes", "thread", "two_events"]
        return m + args, f"bs {','.join(sizes)}"
    if kind == "capture":
        sizes = ["1", "64"] if profile == "quick" else ["1", "8", "64", "256"]
        extra = ["--max-model-len", "2048", "--context-len", "256", "--iters", "20"]
        args = ["--max-num-seqs", sizes[-1], "--cuda-graph-batch-sizes", *sizes, *extra]
        return m + args, f"buckets {','.join(sizes)}"
    if kind == "profile":
        # The 8B model meets its targets: batch 1 only, to keep the suite inside 9 minutes.
        sizes = ["1"] if big else ["1", "256"]
        # Without PDL, so each kernel's duration is its own (PDL kernels overlap); the capture
        # and roofline phases give the step times with it.
        args = [*m, "--batch-sizes", *sizes, "--steps", "10", "--no-pdl"]
        return args, f"bs {','.join(sizes)}, without PDL"
    if kind == "prefix":
        # Two engines share the card: at the model's own limit (131,072 for Llama-3.1-8B) one
        # full-length sequence needs more pages than half the card holds; the longest
        # workload prompt is ~2,200 tokens.
        args = [*m, "--repeats", "3", "--max-model-len", "4096"]
        return args, "issue #18's workloads, cache on and off, 3 repeats"
    if kind == "prefill":
        args = [*m, "--prompt-lens", "128", "1024", "--repeats", "10"]
        return args, "one prompt of 128 and of 1,024 tokens, mixed graphs on and off, 10 repeats"
    if kind == "structured":
        # Temperature 0: the shorter unconstrained step, where the host's grammar work must
        # hide under the forward (issue #20).
        args = ["--batch-size", "64", "--output-len", "256", "--repeats", "5", "--temperature", "0"]
        args += ["--max-model-len", "1024", "--cuda-graph-max-bs", "64", "--profile"]
        return m + args, "batch 64, every row JSON-constrained, temperature 0, 5 pairs"
    raise ValueError(kind)


def gpu_test_files() -> list[str]:
    """Test files with GPU tests. Collecting only these keeps a missing server dependency on
    the bare machine (fastapi, openai, ...) from failing the collection."""
    files = sorted(
        str(p.relative_to(REPO))
        for p in (REPO / "tests").glob("test_*.py")
        if "mark.gpu" in p.read_text(errors="replace")
    )
    return files or ["tests"]


def plan(args: argparse.Namespace, work: Path, out: Path) -> list[Phase]:
    """Every phase of this run, in priority order (what issue 7 must show comes first)."""
    py = sys.executable
    models = parse_models(args.models)
    phases: list[Phase] = []
    wheel_dir = REPO / args.wheels if args.wheels else None  # an absolute path stays as is
    wheels = sorted(wheel_dir.glob("*.whl")) if wheel_dir else []
    phases.append(
        Phase(
            "install",
            "install",
            [py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
            + ["--no-cache-dir", "--upgrade", "--target", args.wheel_target]
            + [str(w) for w in wheels],
            BUDGETS["install"],
            note=f"{len(wheels)} wheels from {args.wheels}" if wheels else "",
        )
    )
    test_cmd = [py, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"]
    test_cmd += ["--continue-on-collection-errors", "--durations=10"]
    note = "all GPU tests"
    if not args.flashinfer_tests:
        # flashinfer JIT-compiles its prefill (~87 s) and decode (~23 s) kernels on first use.
        test_cmd += ["-k", "not flashinfer"]
        note = "flashinfer tests deselected (--flashinfer-tests runs them)"
    if importlib.util.find_spec("pytest_timeout") is not None:
        test_cmd += ["--timeout", "300" if args.flashinfer_tests else "120"]
    phases.append(Phase("tests", "tests", test_cmd + gpu_test_files(), BUDGETS["tests"], note=note))
    have_plot = importlib.util.find_spec("matplotlib") is not None
    scripts = {
        "roofline": "benchmarks/decode_roofline.py",
        "offline": "benchmarks/offline_throughput.py",
        "overlap": "benchmarks/overlap_ablation.py",
        "capture": "graphrt/capture_profile.py",
        "profile": "benchmarks/step_profile.py",
        "prefix": "benchmarks/prefix_cache.py",
        "prefill": "benchmarks/prefill_latency.py",
        "fp8": "benchmarks/decode_roofline.py",
        "structured": "benchmarks/structured_outputs.py",
    }
    for kind in ("roofline", "offline", "overlap", "capture", "profile"):
        for model, model_dir in models.items():
            name = f"{kind}:{model}"
            rest, note = phase_args(kind, model, model_dir, args.profile)
            if args.attention_backend:
                rest += ["--attention-backend", args.attention_backend]
            js = str(work / f"{kind}-{model}.json")
            if kind == "capture":
                cmd = [py, "-m", "graphrt.capture_profile", *rest, "--json", js]
                if have_plot:
                    cmd += ["--plot", str(out / f"capture-{model}.png")]
            else:
                cmd = [py, scripts[kind], *rest, "--json", js]
            budget = BUDGETS.get(name, DEFAULT_BUDGET[kind])
            phases.append(Phase(name, kind, cmd, budget, model, scripts[kind], js, note))
    kernels_json = str(work / "kernels.json")
    k_cmd = [py, "benchmarks/kernel_bench.py", "--json", kernels_json, "--reps", "5"]
    # The extend section (the backend choice's prefill rows) and flashinfer's decode rows (its
    # JIT alone is ~23 s; runs B and J have them) are left to standalone runs.
    k_cmd += ["--only", "decode", "ops", "gemv", "argmax", "--no-flashinfer"]
    phases.append(
        Phase(
            "kernels",
            "kernels",
            k_cmd,
            BUDGETS["kernels"],
            requires="benchmarks/kernel_bench.py",
            json_path=kernels_json,
            note="Triton and torch rows (flashinfer's: standalone `benchmarks/kernel_bench.py`)",
        )
    )
    for kind in OPT_IN:
        for model, model_dir in models.items():
            rest, note = phase_args(kind, model, model_dir, args.profile)
            requires = scripts[kind]
            if kind == "structured":
                # Grammars need a tokenizer and the benchmark shapes have none: SmolLM2's,
                # carried with the wheels (GPU.md); without it the phase is "missing".
                tok = (wheel_dir or REPO / ".wheels") / "smollm2-tokenizer"
                rest += ["--tokenizer", str(tok)]
                if not (tok / "tokenizer.json").is_file():
                    requires = str(tok / "tokenizer.json")  # absolute: REPO / it is itself
            js = str(work / f"{kind}-{model}.json")
            cmd = [py, scripts[kind], *rest, "--json", js]
            budget = BUDGETS.get(f"{kind}:{model}", DEFAULT_BUDGET[kind])
            name = f"{kind}:{model}"
            phases.append(Phase(name, kind, cmd, budget, model, requires, js, note))
    # Quick runs smaller benchmarks; installing and testing cost the same.
    scale = {"full": 1.0, "quick": 0.6}[args.profile]
    for ph in phases:
        if ph.kind not in ("install", "tests"):
            ph.budget_s *= scale
        ph.budget_s = args.phase_budget.get(ph.name, ph.budget_s)
    # The install phase runs whenever there are wheels, whatever --only names: the other phases
    # import what it installs (xgrammar, fastapi, ...).
    return [ph for ph in phases if selected(ph, args.only) or (ph.kind == "install" and wheels)]


def parse_models(spec: str) -> dict[str, str]:
    """``name`` (a known shape) or ``name=dir``, comma separated."""
    out = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, path = item.partition("=")
        if not path:
            if name not in MODELS:
                raise SystemExit(f"unknown model {name!r}: known {list(MODELS)}, or name=dir")
            path = MODELS[name]
        out[name] = path
    return out


def selected(ph: Phase, only: list[str] | None) -> bool:
    if only is None:
        return ph.kind not in OPT_IN
    return ph.kind in only or ph.name in only


# ---- running ------------------------------------------------------------------------------------


def subprocess_env(wheel_target: str) -> dict[str, str]:
    """The checkout and the installed wheels on PYTHONPATH; nothing may reach for a network."""
    env = dict(os.environ)
    paths = [str(REPO)]
    if Path(wheel_target).is_dir():
        paths.append(wheel_target)
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env.update(
        PYTHONPATH=os.pathsep.join(paths),
        PYTHONUNBUFFERED="1",
        PIP_NO_INDEX="1",
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def run_command(
    argv: list[str], timeout: float, env: dict[str, str], log: TextIO, prefix: str
) -> tuple[int | None, float, list[str]]:
    """Run ``argv`` in the checkout; stream its output to ``log`` and stdout. Returns (exit
    code or None on timeout, wall seconds, the last output lines)."""
    t0 = time.perf_counter()
    # Its own process group, so a timeout ends the command and every process it started.
    proc = subprocess.Popen(
        argv,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    tail: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            print(f"{prefix}{line}", end="", flush=True)
            tail.append(line.rstrip("\n"))
            del tail[:-60]
        log.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc: int | None = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        rc = None
        _kill_group(proc)
    reader.join(timeout=10)
    return rc, time.perf_counter() - t0, list(tail)


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_phase(ph: Phase, timeout: float, env: dict[str, str], log: TextIO) -> PhaseResult:
    res = PhaseResult(ph.name, ph.kind, ph.model, "ok", ph.budget_s, note=ph.note)
    res.cmd = shlex.join(_rel(a) for a in ph.argv)
    if ph.requires and not (REPO / ph.requires).is_file():
        res.status = "missing"
        res.note = f"{ph.requires} is not in this checkout"
        return res
    if ph.kind == "install" and not any(a.endswith(".whl") for a in ph.argv):
        res.status = "skipped"
        res.note = "no wheels given"
        return res
    log.write(f"\n===== {ph.name}: {res.cmd} (timeout {timeout:.0f} s)\n")
    log.flush()
    print(f"\n===== {ph.name} (budget {ph.budget_s:.0f} s, timeout {timeout:.0f} s)", flush=True)
    rc, wall, tail = run_command(ph.argv, timeout, env, log, prefix=f"[{ph.name}] ")
    res.timeout_s, res.wall_s, res.rc, res.log_tail = timeout, wall, rc, tail[-25:]
    if rc is None:
        res.status = "timeout"
    elif rc != 0:
        res.status = "failed"
    if ph.json_path and Path(ph.json_path).is_file():
        try:
            res.result = json.loads(Path(ph.json_path).read_text())
            if res.status != "ok":
                res.note = (res.note + "; " if res.note else "") + "partial JSON kept"
        except ValueError as e:
            res.note = (res.note + "; " if res.note else "") + f"unreadable JSON: {e}"
    elif ph.json_path and res.status == "ok":
        res.status = "failed"
        res.note = (res.note + "; " if res.note else "") + "exited 0 but wrote no JSON"
    if ph.kind == "tests":
        res.summary = pytest_summary(tail)
    return res


def _rel(arg: str) -> str:
    """Shorter commands in the table: paths inside the checkout relative to it."""
    prefix = str(REPO) + os.sep
    return arg.replace(prefix, "") if arg.startswith(prefix) else arg


def pytest_summary(lines: list[str]) -> str:
    """pytest's closing line ("12 passed, 3 skipped in 40.1s"), or ""."""
    pat = re.compile(r"\d+ (passed|failed|skipped|error|errors|deselected|xfailed|xpassed)\b")
    for line in reversed(lines):
        if pat.search(line) and re.search(r" in [\d.]+s", line):
            return line.strip("= ").strip()
    return ""


def schedule_timeout(budget: float, later: float, deadline: float, now: float) -> float | None:
    """A phase's timeout: its budget plus the slack earlier phases left, keeping later phases'
    budgets in reserve; at least its budget while the run has that much left (phases are in
    priority order). None: too little time is left to start it."""
    remaining = deadline - now
    if remaining < MIN_PHASE_S:
        return None
    return min(remaining, max(budget, remaining - later))


PROBE = r"""
import json, os, platform, subprocess
info = {"python": platform.python_version(), "cpus": os.cpu_count()}
for mod in ("torch", "triton", "transformers", "flashinfer", "numpy"):
    try:
        info[mod] = getattr(__import__(mod), "__version__", "?")
    except Exception as e:
        info[mod] = f"not importable ({type(e).__name__})"
try:
    import torch
    info["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, sms=p.multi_processor_count, cuda=torch.version.cuda,
                    device_count=torch.cuda.device_count())
        info["memory_gb"] = round(p.total_memory / 1e9, 1)
    else:
        info["device"] = "cpu"
except Exception as e:
    info["device"] = f"unknown ({type(e).__name__}: {e})"
try:
    q = "name,driver_version,power.limit,clocks.max.sm,clocks.max.mem,memory.total"
    r = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"],
                       capture_output=True, text=True, timeout=20)
    info["nvidia_smi"] = (r.stdout or r.stderr).strip()
except Exception as e:
    info["nvidia_smi"] = f"unavailable ({type(e).__name__})"
print("PROBE " + json.dumps(info))
"""


def probe_env(env: dict[str, str], timeout: float) -> dict[str, Any]:
    """Versions, the card and its limits, from a child process (this one never imports torch)."""
    try:
        r = subprocess.run(
            [sys.executable, "-c", PROBE],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"environment probe timed out after {timeout:.0f} s"}
    for line in r.stdout.splitlines():
        if line.startswith("PROBE "):
            return json.loads(line[6:])
    return {"error": f"environment probe failed: {r.stderr.strip()[-300:]}"}


def git_info(given: str | None) -> dict[str, Any]:
    """The commit this run measured. The device machine's copy may have no .git: pass
    ``--commit`` then."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return {"commit": given or head, "dirty": bool(dirty) if not given else None}
    except (OSError, subprocess.SubprocessError):
        return {"commit": given or "unknown (pass --commit)", "dirty": None}


# ---- the table ----------------------------------------------------------------------------------


def _num(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _stat(s: Any, spec: str = ".3f", scale: float = 1.0, spread: bool = True) -> str:
    """``median [min–max]`` from a {median, min, max} dict, or ``-``."""
    if not isinstance(s, dict) or s.get("median") is None:
        return "-"
    med = format(s["median"] * scale, spec)
    if not spread or s.get("min") is None or s.get("max") is None:
        return med
    return f"{med} [{format(s['min'] * scale, spec)}–{format(s['max'] * scale, spec)}]"


def _pct(s: Any) -> str:
    if isinstance(s, dict):
        s = s.get("median")
    return "-" if s is None else f"{s:.1%}"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    def cell(x: str) -> str:
        # A '|' or newline from a log line or an error message would break the table.
        return str(x).replace("|", "\\|").replace("\n", " ")

    out = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
    out += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return out


def _phases_of(suite: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [p for p in suite.get("phases", []) if p.get("kind") == kind and p.get("result")]


def section_phases(suite: dict[str, Any]) -> list[str]:
    rows = []
    for p in suite.get("phases", []):
        note = p.get("summary") or p.get("note") or ""
        if p.get("status") in ("failed", "timeout") and p.get("log_tail"):
            last = next((x for x in reversed(p["log_tail"]) if x.strip()), "")
            note = (note + "; " if note else "") + f"last output: `{last.strip()[:140]}`"
        wall = _num(p.get("wall_s"), ".0f")
        rows.append([p["name"], p["status"], f"{wall} / {p.get('budget_s', 0):.0f}", note])
    return _table(["phase", "status", "wall / budget s", "note"], rows)


def section_headline(suite: dict[str, Any]) -> list[str]:
    rows = []
    for p in _phases_of(suite, "offline"):
        r = p["result"]
        g, peer, ceil = r.get("graphrt"), r.get("peer") or {}, r.get("ceiling")
        wl = r.get("header", {}).get("workload", {})
        ratios = r.get("ratios", {})
        hf = []
        for key, label in (("generate", "HF generate"), ("cb", "HF CB")):
            x = peer.get(key)
            if isinstance(x, dict) and "output_tok_s" in x:
                ratio = ratios.get(f"graphrt_vs_hf_{key}")
                same = ratios.get(f"graphrt_vs_hf_{key}_same_requests")
                r_txt = [f"{ratio:.1f}×"] if ratio else []
                r_txt += [f"same requests {same:.1f}×"] if same else []
                hf.append(
                    f"{label} {_stat(x['output_tok_s'], ',.0f', spread=False)}"
                    + (f" ({'; '.join(r_txt)})" if r_txt else "")
                )
            elif isinstance(x, dict):
                hf.append(f"{label}: {x.get('error') or x.get('unavailable')}")
        c = "-"
        if ceil and g:
            share = _pct(g["output_tok_s"]["median"] / ceil["output_tok_s"])
            c = f"{ceil['output_tok_s']:,.0f} decode-only HBM bound (graphrt at {share})"
            both = r.get("ceiling_roofline")
            if both:
                share = _pct(g["output_tok_s"]["median"] / both["output_tok_s"])
                c += f"; {both['output_tok_s']:,.0f} roofline with the prompts ({share})"
        rows.append(
            [
                p["model"],
                f"offline, {wl.get('requests', '?')} requests, out tok/s",
                _stat(g and g.get("output_tok_s"), ",.0f"),
                "; ".join(hf) or "-",
                c,
            ]
        )
    for p in _phases_of(suite, "roofline"):
        for row in p["result"].get("rows", []):
            if row.get("bs") not in (1, 64, 256):
                continue
            e = row.get("engine") or {}
            mbu = f", MBU {_pct(e.get('mbu'))}" if e.get("mbu") else ""
            step = _stat(e.get("step_ms"), ".2f", spread=False)
            roof_tok, roof_ms = (
                _num(row.get("roofline_tok_s"), ",.0f"),
                _num(row.get("roofline_ms"), ".2f"),
            )
            rows.append(
                [
                    p["model"],
                    f"decode bs {row['bs']}, ctx {row.get('context_len')}, tok/s",
                    f"{_stat(e.get('tok_s'), ',.0f')} ({step} ms{mbu})",
                    "-",
                    f"{roof_tok} HBM roofline ({roof_ms} ms)" if row.get("roofline_ms") else "-",
                ]
            )
    if not rows:
        return ["No offline or roofline results in this run."]
    head = ["model", "figure", "graphrt: median [min–max]", "HF peer, same run", "ceiling"]
    return _table(head, rows)


def section_roofline(suite: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for p in _phases_of(suite, "roofline"):
        h = p["result"].get("header", {})
        bw = h.get("hbm_bytes_per_s")
        out.append(
            f"**{p['model']}**: weights {h.get('weight_bytes', 0) / 1e9:.2f} GB, KV "
            f"{h.get('kv_bytes_per_token')} B/token, attention {h.get('attention_backend')}, "
            f"HBM {bw / 1e12:.2f} TB/s (this run)"
            if bw
            else f"**{p['model']}** (no bandwidth measured)"
        )
        out.append("")
        rows = []
        for r in p["result"].get("rows", []):
            e, rp = r.get("engine") or {}, r.get("replay") or {}
            rows.append(
                [
                    str(r.get("bs")),
                    str(r.get("context_len")),
                    _stat(e.get("step_ms")),
                    _stat(rp.get("step_ms")),
                    _num(r.get("roofline_ms"), ".3f"),
                    _stat(r.get("overhead_ratio"), ".3f", spread=False),
                    _stat(e.get("tok_s"), ",.0f", spread=False),
                    _pct(e.get("mbu")),
                    _pct(rp.get("mbu")),
                ]
            )
        head = ["bs", "ctx", "engine ms", "replay ms", "roofline ms", "overhead", "tok/s"]
        out += [*_table([*head, "MBU engine", "MBU replay"], rows), ""]
    return out or ["No roofline results in this run."]


def _offline_row(rows: list[list[str]], label: str, x: Any, ceiling: str = "-") -> None:
    if not isinstance(x, dict):
        return
    if "output_tok_s" not in x:
        rows.append([label, "-", "-", "-", str(x.get("error") or x.get("unavailable"))])
        return
    rows.append(
        [
            label,
            _stat(x.get("requests_per_s"), ".2f"),
            _stat(x.get("output_tok_s"), ",.0f"),
            _stat(x.get("total_tok_s"), ",.0f"),
            ceiling,
        ]
    )


def section_offline(suite: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for p in _phases_of(suite, "offline"):
        r = p["result"]
        h = r.get("header", {})
        wl = h.get("workload", {})
        pl, ol = wl.get("prompt_len", {}), wl.get("output_len", {})
        out.append(
            f"**{p['model']}**: {wl.get('requests')} requests, prompt {pl.get('min')}–"
            f"{pl.get('max')}, output {ol.get('min')}–{ol.get('max')} tokens, max_num_seqs "
            f"{h.get('max_num_seqs')}, max_num_batched_tokens {h.get('max_num_batched_tokens')}, "
            f"admission_interval {h.get('admission_interval', 1)}, attention "
            f"{h.get('attention_backend')}"
        )
        out.append("")
        rows: list[list[str]] = []
        ceil, both = r.get("ceiling"), r.get("ceiling_roofline")
        ceiling = f"{ceil['output_tok_s']:,.0f} out tok/s decode-only" if ceil else "-"
        if both:
            ceiling += f"; {both['output_tok_s']:,.0f} roofline with the prompts"
        _offline_row(rows, "graphrt", r.get("graphrt"), ceiling)
        peer = r.get("peer") or {}
        if peer:
            s = peer.get("subsample", {})
            cap = peer.get("max_output_len")
            sub = f"first {s.get('requests')} requests" + (f", outputs ≤ {cap}" if cap else "")
            _offline_row(rows, f"graphrt, {sub}", peer.get("graphrt_same_requests"))
            g = peer.get("generate")
            if isinstance(g, dict) and "batch_size" in g:
                label = f"HF generate, {sub}, batch {g['batch_size']}"
            else:
                label = f"HF generate, {sub}"
            _offline_row(rows, label, g)
            _offline_row(rows, f"HF continuous batching, {sub}", peer.get("cb"))
        out += _table(["engine", "req/s", "output tok/s", "total tok/s", "ceiling"], rows)
        ratios = r.get("ratios") or {}
        for key, label in (("generate", "HF generate"), ("cb", "HF continuous batching")):
            per_token = ratios.get(f"graphrt_vs_hf_{key}")
            same = ratios.get(f"graphrt_vs_hf_{key}_same_requests")
            if per_token or same:
                out.append("")
                out.append(
                    f"Output tok/s, graphrt / {label}: {_num(per_token, '.1f')}× per token, "
                    f"{_num(same, '.1f')}× on the same requests."
                )
        prof = r.get("profile") or {}
        if prof.get("cuda"):
            out.append("")
            out.append(
                f"Where the time goes (one more run with per-step CUDA events: wall "
                f"{prof['wall_s']:.2f} s, GPU idle between steps {prof['gpu_idle_s']:.2f} s):"
            )
            out.append("")
            prow = [
                [
                    kind,
                    str(k["steps"]),
                    f"{k['gpu_s']:.2f} ({k['share_of_wall']:.0%})",
                    f"{k['gpu_ms_per_step']:.2f}",
                    f"{k['rows_per_step']:.0f}",
                    f"{k['prefill_tokens_per_step']:.0f}",
                    f"{k['launch_ms']:.2f}",
                ]
                for kind, k in sorted(prof["kinds"].items(), key=lambda x: -x[1]["gpu_s"])
            ]
            out += _table(
                ["step kind", "steps", "GPU s (of wall)", "ms/step", "rows", "prefill tok",
                 "launch ms"],
                prow,
            )  # fmt: skip
        out.append("")
    return out or ["No offline results in this run."]


def section_overlap(suite: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for p in _phases_of(suite, "overlap"):
        r = p["result"]
        out.append(f"**{p['model']}**")
        out.append("")
        rows = []
        for x in r.get("rows", []):
            rows.append(
                [
                    str(x.get("bs")),
                    str(x.get("mode")),
                    _stat(x.get("step_ms")),
                    _num(x.get("ceiling_ms"), ".3f"),
                    _stat(x.get("overhead_ratio")),
                    _stat(x.get("ratio_to_adjacent_replay")),
                    _num(
                        x["handoff_ceiling_ms"] / x["ceiling_ms"]
                        if x.get("handoff_ceiling_ms") and x.get("ceiling_ms")
                        else None,
                        ".3f",
                    ),
                    _stat(x.get("gpu_idle"), ".1f", 100),
                    _stat(x.get("late_steps"), ".0f", 100, spread=False),
                    _stat(x.get("tok_s"), ",.0f"),
                    _stat(x.get("schedule_ms"), ".3f", spread=False)
                    + " + "
                    + _stat(x.get("process_ms"), ".3f", spread=False),
                    _stat(x.get("text_ms"), ".3f", spread=False),
                    _stat(x.get("launch_ms"), ".3f", spread=False),
                    _stat(x.get("gc_max_ms"), ".1f"),
                ]
            )
        head = ["bs", "mode", "step ms", "replay ms", "overhead ratio", "ratio, adjacent replay"]
        head += ["copies far ahead / replay"]
        head += ["GPU idle %", "late launches %", "tok/s", "sched + proc ms", "text ms"]
        head += ["launch ms", "longest GC pause ms"]
        out += _table(head, rows)
        out.append("")
        out.append(
            "*Adjacent replay*: each repetition against a replay timed right before it (the "
            "GPU's speed drifts during a run). *Copies far ahead*: the graph with the step's "
            "input and id copies, enqueued ahead of "
            "the GPU (what the hand-offs cost without the host in the loop). *Late launches*: "
            "steps whose launch finished after the step before had ended (host clock), so the "
            "GPU waited; *GPU idle* counts only gaps before a step's first event. *sched + proc*: "
            "the step thread's CPU per step; *text*: the text side's, on its own thread unless "
            "`--no-text-thread`. *Longest GC pause*: of the cyclic collector, per repetition."
        )
        seed = r.get("seed_question") or []
        if seed:
            out.append("")
            out.append(
                "One copy_done (thread) vs two events, tok/s ratio: "
                + ", ".join(f"bs {s['bs']}: {s['ratio']:.3f}" for s in seed if "ratio" in s)
            )
        out.append("")
    return out or ["No overlap results in this run."]


def section_capture(suite: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for p in _phases_of(suite, "capture"):
        r = p["result"]
        bw = r.get("hbm_bytes_per_s")
        out.append(
            f"**{p['model']}**: context {r.get('context_len')} tokens/row, graph memory "
            f"{(r.get('graph_memory_bytes') or 0) / 1e6:.0f} MB"
            + (f", HBM {bw / 1e12:.2f} TB/s (this run)" if bw else "")
        )
        out.append("")
        rows = [
            [
                str(x.get("bs")),
                _num(x.get("capture_ms"), ".1f"),
                _num(x.get("graph_mb"), ".1f"),
                _num(x.get("eager_ms"), ".3f"),
                _num(x.get("replay_ms"), ".3f"),
                _num(x.get("replay_issue_us"), ".1f"),
                _num(x.get("replay_issue_idle_us"), ".1f"),
                _num(x.get("speedup"), ".1f"),
                _num(x.get("roofline_ms"), ".3f"),
                _pct(x.get("mbu")),
            ]
            for x in r.get("rows", [])
        ]
        head = ["bs", "capture ms", "graph MB", "eager ms", "replay ms", "issue µs"]
        head += ["issue µs, idle GPU", "speedup"]
        out += [*_table([*head, "roofline ms", "MBU"], rows), ""]
    return out or ["No capture-profile results in this run."]


def section_profile(suite: dict[str, Any]) -> list[str]:
    """Where each step's GPU time goes: wall vs summed kernels vs the HBM ideal, top kernels."""
    out: list[str] = []
    for p in _phases_of(suite, "profile"):
        r = p["result"]
        out.append(
            f"**{p['model']}**: context {r.get('context_len')}, {r.get('attention_backend')}"
        )
        out.append("")
        rows = []
        for x in r.get("results", []):
            g = x.get("graph") or x.get("eager") or {}
            wall = x.get("replay_ms", x.get("eager_ms"))
            top = ", ".join(
                f"{k['kernel'][:28]} {k['us']:.0f}" for k in (g.get("kernels") or [])[:4]
            )
            ideal = x.get("ideal_ms")
            rows.append(
                [
                    str(x.get("batch_size")),
                    _num(wall * 1e3 if wall else None, ".0f"),
                    _num(g.get("kernel_us"), ".0f"),
                    _num(g.get("launches"), ".0f"),
                    _num(ideal * 1e3 if ideal else None, ".0f"),
                    _pct(ideal / wall if ideal and wall else None),
                    top,
                ]
            )
        head = ["bs", "wall µs", "kernel sum µs", "launches", "ideal µs", "MBU"]
        out += [*_table([*head, "top kernels (µs/step)"], rows), ""]
    return out or ["No step profiles in this run."]


def section_kernels(suite: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for p in _phases_of(suite, "kernels"):
        r = p["result"]
        meta = r.get("meta", {})
        out.append(f"HBM (kernels' own copy test): {_num(meta.get('hbm_gbps'), ',.0f')} GB/s")
        out.append("")
        rows = []
        for x in r.get("results", []):
            if x.get("impl") == "triton-sweep":
                continue
            t = x.get("times_us") or []
            spread = f" [{min(t):.2f}–{max(t):.2f}]" if t else ""
            rows.append(
                [
                    str(x.get("name")),
                    str(x.get("impl")),
                    _num(x.get("median_us"), ".2f") + spread,
                    _num(x.get("gbps"), ",.0f"),
                    _num(x.get("pct_hbm"), ".1f"),
                ]
            )
        out += _table(["kernel", "impl", "median µs [min–max]", "GB/s", "% HBM"], rows)
    return out or ["No kernel results in this run."]


def section_prefix(suite: dict[str, Any]) -> list[str]:
    """The prefix cache on and off, per workload: throughput, TTFT and hit rate."""
    out: list[str] = []
    for p in _phases_of(suite, "prefix"):
        r = p["result"]
        rows = []
        for wl, w in r.get("workloads", {}).items():
            on, off = w["stats"]["on"], w["stats"]["off"]
            rows.append(
                [
                    wl,
                    _stat(on["output_tok_s"], ",.0f"),
                    _stat(off["output_tok_s"], ",.0f"),
                    _stat(w["throughput_ratio"], ".2f"),
                    _stat(on["ttft_p50_ms"], ",.1f"),
                    _stat(off["ttft_p50_ms"], ",.1f"),
                    _stat(w["ttft_p50_speedup"], ".2f"),
                    _stat(on["ttft_p99_ms"], ",.0f", spread=False),
                    _stat(off["ttft_p99_ms"], ",.0f", spread=False),
                    _pct(on["hit_rate"]),
                    _num(w.get("decode_bound_tok_s"), ",.0f"),
                ]
            )
        head = ["workload", "on tok/s", "off tok/s", "on/off", "on TTFT p50 ms"]
        head += ["off TTFT p50 ms", "TTFT speed-up", "on p99 ms", "off p99 ms", "hit rate"]
        out += [f"**{p['model']}**", "", *_table([*head, "decode-only bound tok/s"], rows), ""]
    return out or ["No prefix-cache results in this run."]


def section_prefill(suite: dict[str, Any]) -> list[str]:
    """One prompt's TTFT, launch CPU and GPU span, mixed graphs on and off, beside its bound:
    the larger of its FLOPs at the measured GEMM rate and one read of the weights."""
    out: list[str] = []
    for p in _phases_of(suite, "prefill"):
        r = p["result"]
        rows = []
        for n, x in r.get("lens", {}).items():
            g, e = x["stats"]["graphs"], x["stats"]["eager"]
            ratio = None
            if g["ttft_ms"]["median"] and e["ttft_ms"]["median"]:
                ratio = e["ttft_ms"]["median"] / g["ttft_ms"]["median"]
            rows.append(
                [
                    str(n),
                    _stat(g["ttft_ms"], ".2f"),
                    _stat(e["ttft_ms"], ".2f"),
                    _num(ratio, ".2f"),
                    _stat(g["launch_ms"], ".2f"),
                    _stat(e["launch_ms"], ".2f"),
                    _stat(g["gpu_ms"], ".2f"),
                    _stat(e["gpu_ms"], ".2f"),
                    _num(x.get("flop_bound_ms"), ".2f"),
                    _num(x.get("bound_ms"), ".2f"),
                ]
            )
        head = ["prompt tokens", "TTFT ms, graphs", "TTFT ms, eager", "eager / graphs"]
        head += ["launch CPU ms, graphs", "eager", "GPU ms, graphs", "eager"]
        head += ["FLOP bound ms", "bound ms"]
        out += [f"**{p['model']}**", "", *_table(head, rows), ""]
    return out or ["No prefill-latency results in this run."]


def section_structured(suite: dict[str, Any]) -> list[str]:
    """Constrained against unconstrained output tok/s at one batch (issue #20), with the host's
    grammar work per step and how often the GPU waited for a launch (``--profile``)."""
    out: list[str] = []
    for p in _phases_of(suite, "structured"):
        r = p["result"]
        st, prof = r.get("stats", {}), r.get("profile") or {}
        rows = []
        for mode in ("constrained", "unconstrained"):
            x, pr = st.get(mode, {}), prof.get(mode, {})
            late = pr.get("late_steps")
            rows.append(
                [
                    mode,
                    _stat(x.get("output_tok_s"), ",.0f"),
                    _stat(x.get("accept_ms_per_step")),
                    _stat(x.get("mask_ms_per_step")),
                    _num(pr.get("step_p50_ms"), ".3f"),
                    "-" if late is None else f"{late:.0%}",
                ]
            )
        s = r.get("settings", {})
        out += [
            f"**{p['model']}**, batch {s.get('batch_size')}, temperature "
            f"{s.get('temperature')}: constrained / unconstrained "
            f"**{_stat(r.get('ratio'), '.3f')}**",
            "",
        ]
        head = ["rows", "output tok/s", "accept ms/step", "mask fill ms/step", "GPU ms/step"]
        out += [*_table([*head, "GPU waited"], rows), ""]
    return out or ["No structured-output results in this run."]


def section_fp8(suite: dict[str, Any]) -> list[str]:
    """The roofline with FP8 weights beside the bf16 one of the same run (issue #21): step time,
    tok/s ratio and MBU by batch size."""
    out: list[str] = []
    bf16 = {p["model"]: p["result"] for p in _phases_of(suite, "roofline")}
    for p in _phases_of(suite, "fp8"):
        r, base = p["result"], bf16.get(p["model"], {})
        by_bs = {row.get("bs"): row for row in base.get("rows", [])}
        gb = [x.get("header", {}).get("weight_bytes", 0) / 1e9 for x in (r, base)]
        out += [
            f"**{p['model']}**: weights {gb[0]:.2f} GB in FP8"
            + (f" against {gb[1]:.2f} GB in bf16" if base else " (no bf16 roofline in this run)"),
            "",
        ]
        rows = []
        for row in r.get("rows", []):
            e = row.get("engine") or {}
            b = (by_bs.get(row.get("bs")) or {}).get("engine") or {}
            ratio = None
            if (e.get("tok_s") or {}).get("median") and (b.get("tok_s") or {}).get("median"):
                ratio = e["tok_s"]["median"] / b["tok_s"]["median"]
            rows.append(
                [
                    str(row.get("bs")),
                    _stat(e.get("step_ms")),
                    _stat(b.get("step_ms")) if b else "-",
                    _num(ratio, ".2f") + ("×" if ratio else ""),
                    _pct(e.get("mbu")),
                    _num(row.get("roofline_ms"), ".3f"),
                ]
            )
        head = ["bs", "FP8 engine ms", "bf16 engine ms", "FP8 / bf16 tok/s", "FP8 MBU"]
        out += [*_table([*head, "FP8 roofline ms"], rows), ""]
    return out or ["No FP8 results in this run."]


SECTIONS: list[tuple[str, Callable[[dict[str, Any]], list[str]]]] = [
    ("Phases", section_phases),
    ("Headline", section_headline),
    ("Decode roofline", section_roofline),
    ("Offline throughput", section_offline),
    ("Overlap ablation", section_overlap),
    ("Capture profile", section_capture),
    ("Step profile", section_profile),
    ("Kernels", section_kernels),
    ("Prefix cache", section_prefix),
    ("Prefill latency", section_prefill),
    ("FP8 weights", section_fp8),
    ("Structured outputs", section_structured),
]


def build_markdown(suite: dict[str, Any]) -> str:
    """The suite's markdown report, from its JSON alone. A section that cannot be rendered
    (a benchmark changed its JSON) says so; the others still render."""
    s, env = suite.get("suite", {}), suite.get("env", {})
    card = env.get("device", "?")
    lines = [
        f"# graphrt GPU suite: {card}, {s.get('date', '?')}, commit {s.get('commit', '?')}"
        + (" (uncommitted changes)" if s.get("dirty") else ""),
        "",
        f"nvidia-smi: {env.get('nvidia_smi', '-')}",
        f"torch {env.get('torch')}, triton {env.get('triton')}, transformers "
        f"{env.get('transformers')}, flashinfer {env.get('flashinfer')}, Python "
        f"{env.get('python')}, {env.get('cpus')} CPUs. Profile {s.get('profile')}, "
        f"{_num(s.get('wall_s'), '.0f')} s of a {_num(s.get('budget_s'), '.0f')} s budget.",
        "",
        f"Command: `{s.get('command', '')}`",
        "",
    ]
    for title, fn in SECTIONS:
        lines.append(f"## {title}")
        lines.append("")
        try:
            lines += fn(suite)
        except Exception as e:  # one bad section must not hide the rest
            lines.append(f"(could not render this section: {type(e).__name__}: {e})")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


# ---- driver -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, default=None, help="output folder (default: $OUT)")
    p.add_argument("--only", default=None, help=f"comma list of phases or kinds: {KINDS}")
    p.add_argument("--models", default=",".join(MODELS), help="names, or name=dir, comma list")
    p.add_argument("--quick", action="store_true", help="smaller sizes everywhere")
    p.add_argument("--budget", type=float, default=540.0, help="seconds for the whole run")
    p.add_argument("--phase-budget", action="append", default=[], metavar="PHASE=SECONDS")
    p.add_argument("--wheels", default=".wheels", help="folder of wheels to install")
    p.add_argument("--wheel-target", default="/tmp/graphrt-site", help="pip --target folder")
    p.add_argument("--flashinfer-tests", action="store_true", help="also run flashinfer tests")
    p.add_argument("--attention-backend", default=None, help="for every engine benchmark")
    p.add_argument("--commit", default=None, help="commit to record, if the copy has no .git")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    args = p.parse_args(argv)
    args.profile = "quick" if args.quick else "full"
    if args.only is not None:
        args.only = [x.strip() for x in args.only.split(",") if x.strip()]
        known = set(KINDS) | set(BUDGETS) | {f"{k}:{m}" for k in KINDS for m in parse_models(
            args.models)}  # fmt: skip
        bad = [x for x in args.only if x not in known]
        if bad:
            p.error(f"unknown phase(s) {bad}; phases and kinds: {sorted(known)}")
    budgets = {}
    for item in args.phase_budget:
        name, _, sec = item.partition("=")
        try:
            budgets[name] = float(sec)
        except ValueError:
            p.error(f"--phase-budget wants PHASE=SECONDS, got {item!r}")
    args.phase_budget = budgets
    if args.out is None:
        args.out = Path(os.environ["OUT"]) if os.environ.get("OUT") else REPO / "out" / "gpu_suite"
    return args


def main(argv: list[str] | None = None) -> int:
    t_start = time.perf_counter()
    args = parse_args(argv)
    deadline = t_start + args.budget
    out: Path = args.out
    # Per-phase JSON goes here, not to --out: the device tool brings back at most 8 files.
    work = (
        Path(tempfile.gettempdir())
        if args.dry_run
        else Path(tempfile.mkdtemp(prefix="graphrt-suite-"))
    )
    phases = plan(args, work, out)
    if args.dry_run:
        total = sum(ph.budget_s for ph in phases)
        print(f"plan ({args.profile}): {len(phases)} phases, budgets sum {total:.0f} s of "
              f"{args.budget:.0f} s")  # fmt: skip
        for ph in phases:
            print(f"  {ph.name:<24} {ph.budget_s:>5.0f} s  {shlex.join(_rel(a) for a in ph.argv)}")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    env = subprocess_env(args.wheel_target)
    suite: dict[str, Any] = {
        "suite": {
            "version": 1,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            **git_info(args.commit),
            "profile": args.profile,
            "budget_s": args.budget,
            "command": shlex.join(["python", "benchmarks/gpu_suite.py", *(argv or sys.argv[1:])]),
            "out": str(out),
        },
        "env": {},
        "phases": [],
    }
    json_path, md_path = out / "gpu_suite.json", out / "gpu_suite.md"

    def save() -> None:
        suite["suite"]["wall_s"] = time.perf_counter() - t_start
        json_path.write_text(json.dumps(suite, indent=1, default=str))
        md_path.write_text(build_markdown(suite))

    with open(out / "gpu_suite.log", "w") as log:
        for i, ph in enumerate(phases):
            if ph.kind != "install" and not suite["env"]:
                # After the wheels are in, so the probe sees flashinfer as the phases will.
                env = subprocess_env(args.wheel_target)
                suite["env"] = probe_env(env, timeout=60)
                log.write(f"environment: {json.dumps(suite['env'])}\n")
            later = sum(p.budget_s for p in phases[i + 1 :])
            timeout = schedule_timeout(ph.budget_s, later, deadline, time.perf_counter())
            if timeout is None:
                res = PhaseResult(ph.name, ph.kind, ph.model, "skipped", ph.budget_s)
                res.note = "no time left in the suite budget"
                res.cmd = shlex.join(_rel(a) for a in ph.argv)
            else:
                res = run_phase(ph, timeout, env, log)
            suite["phases"].append(asdict(res))
            save()
        if not suite["env"]:
            suite["env"] = probe_env(env, timeout=60)
        save()
    print(f"\nresults: {json_path}, {md_path}, {out / 'gpu_suite.log'}\n", flush=True)
    print(md_path.read_text(), flush=True)
    bad = [p["name"] for p in suite["phases"] if p["status"] in ("failed", "timeout")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
