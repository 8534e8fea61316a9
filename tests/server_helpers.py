"""Helpers shared by the server tests: metrics parsing, polling, finding the engine process."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

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


def engine_idle_and_kv_full(base_url: str) -> bool:
    m = metrics(base_url)
    return (
        m["graphrt_num_requests_running"] == 0
        and m["graphrt_num_requests_waiting"] == 0
        and m["graphrt_kv_cache_free_pages"] == m["graphrt_kv_cache_usable_pages"]
        and m["graphrt_api_requests_in_flight"] == 0
    )


def engine_core_pid(server_pid: int) -> int:
    """The engine-core child of a server process (a multiprocessing "spawn" child)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == server_pid and b"spawn_main" in cmdline:
            return int(entry.name)
    raise LookupError(f"no engine-core child of pid {server_pid}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
