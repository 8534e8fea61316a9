"""Helpers shared by the server tests: metrics parsing, polling, finding the engine process."""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import httpx

POLL_DEADLINE_S = 60.0


def metrics(base_url: str) -> dict[str, float]:
    """``/metrics`` as {"name{labels}": value}, plus each name without its labels."""
    text = httpx.get(base_url + "/metrics", timeout=30).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, value = line.rsplit(" ", 1)
        out[key] = float(value)
        name = key.split("{", 1)[0]
        if "reason=" in key:
            reason = key.split('reason="', 1)[1].split('"', 1)[0]
            out[f"{name}:{reason}"] = float(value)
        else:
            out[name] = float(value)
    return out


def wait_until(what: str, check: Callable[[], bool], deadline_s: float = POLL_DEADLINE_S) -> None:
    """Poll ``check`` until it holds. The deadline only bounds a failing test; passing never
    depends on how fast the machine is."""
    end = time.monotonic() + deadline_s
    while not check():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.1)


# The engine-state gauges: exported only while the engine is healthy.
ENGINE_STATE_GAUGES = (
    "graphrt_num_requests_running",
    "graphrt_num_requests_waiting",
    "graphrt_kv_cache_usage_perc",
    "graphrt_kv_cache_free_pages",
    "graphrt_kv_cache_usable_pages",
    "graphrt_free_slots",
    "graphrt_usable_slots",
    "graphrt_num_preemptions",
    "graphrt_engine_steps",
)


def engine_idle_and_kv_full(base_url: str) -> bool:
    """Nothing running, waiting or in flight, and every KV page and request slot free."""
    m = metrics(base_url)
    return (
        m["graphrt_num_requests_running"] == 0
        and m["graphrt_num_requests_waiting"] == 0
        and m["graphrt_kv_cache_free_pages"] == m["graphrt_kv_cache_usable_pages"]
        and m["graphrt_free_slots"] == m["graphrt_usable_slots"] > 0
        and m["graphrt_api_requests_in_flight"] == 0
    )


def load_test_module() -> ModuleType:
    """``benchmarks/load_test.py`` (not a package), imported once."""
    if "load_test" not in sys.modules:
        path = Path(__file__).resolve().parent.parent / "benchmarks" / "load_test.py"
        spec = importlib.util.spec_from_file_location("load_test", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["load_test"] = mod  # dataclasses look their module up while built
        spec.loader.exec_module(mod)
    return sys.modules["load_test"]


def children(pid: int) -> list[tuple[int, str, bytes]]:
    """(pid, comm, cmdline) of each child of ``pid``."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            comm = (entry / "comm").read_text().strip()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append((int(entry.name), comm, cmdline))
    return out


def engine_core_pid(server_pid: int) -> int:
    """The engine-core child of a server process (named ``graphrt-engine``; with several API
    processes the server process is their supervisor and the engine core's parent)."""
    for pid, comm, _ in children(server_pid):
        if comm == "graphrt-engine":
            return pid
    raise LookupError(f"no engine-core child of pid {server_pid}")


def api_server_pids(server_pid: int) -> list[int]:
    """The API processes under a supervisor (``--api-server-count`` > 1)."""
    return sorted(pid for pid, comm, _ in children(server_pid) if comm.startswith("graphrt-api-"))


def listens_on(pid: int, port: int) -> bool:
    """Whether process ``pid`` has a TCP socket listening on ``port`` (Linux /proc)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    inodes = set()
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            f = row.split()
            if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port and f[9] in inodes:
                return True
    return False


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def maps_torch(pid: int) -> bool:
    """Whether process ``pid`` has torch's shared library mapped (Linux /proc): it imported
    torch."""
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
