"""Resident memory of each server process, after one chat completion (CPU or GPU).

    python benchmarks/api_memory.py                                # default model, one API process
    python benchmarks/api_memory.py --api-server-count 2           # supervisor + 2 API processes

Prints RSS (MiB) and whether torch is mapped, per process: the process the command started (the
API process, or the supervisor with several), its API processes, and the engine core. Any other
argument is passed to ``python -m graphrt.serve``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from graphrt.serve.launcher import ServerProcess


def _children(pid: int) -> list[tuple[int, str]]:
    out = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit():
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if ppid == pid:
                    out.append((int(entry.name), (entry / "comm").read_text().strip()))
        except OSError:
            continue
    return out


def _row(pid: int, role: str) -> str:
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    rss_mib = int(status["VmRSS"].split()[0]) / 1024
    torch = "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    return f"{role:<16} pid {pid:>7}  RSS {rss_mib:8.1f} MiB  torch loaded: {torch}"


def main() -> None:
    with ServerProcess(sys.argv[1:]) as server:
        r = httpx.post(
            server.base_url + "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8},
            timeout=300,
        )
        r.raise_for_status()
        kids = _children(server.proc.pid)
        rows = [_row(server.proc.pid, "started process")]
        rows += [_row(pid, comm) for pid, comm in sorted(kids, key=lambda k: k[1])]
        print("\n".join(rows))


if __name__ == "__main__":
    main()
