"""How long a launcher thread waits for the GIL after the scheduler hands it a step.

The engine's ``overlap="thread"`` mode submits step n+1 to the launcher thread and goes straight
on to process step n in Python. Both threads share one GIL: if the scheduler keeps running
Python, the launcher cannot start until the scheduler blocks or the interpreter's switch interval
(``sys.getswitchinterval()``, 5 ms by default) forces a hand-over. ``two_events`` (and
``inline``) instead launch first. This measures the launcher's wake-up delay both ways, with
``--work-ms`` of scheduler Python work per step standing in for processing a large batch.

    python benchmarks/gil_handoff.py --work-ms 2
"""

from __future__ import annotations

import argparse
import queue
import statistics
import sys
import threading
import time


def _busy(ms: float) -> None:
    end = time.perf_counter() + ms / 1e3
    x = 0
    while time.perf_counter() < end:
        x += 1


def measure(work_ms: float, steps: int, wait_for_launch: bool) -> list[float]:
    """Launcher wake-up delays (s): from the hand-over to the launcher running."""
    handoff: queue.SimpleQueue[tuple[float, threading.Event] | None] = queue.SimpleQueue()
    delays: list[float] = []

    def launcher() -> None:
        while (item := handoff.get()) is not None:
            t0, launched = item
            delays.append(time.perf_counter() - t0)
            launched.set()

    th = threading.Thread(target=launcher)
    th.start()
    for _ in range(steps):
        launched = threading.Event()
        handoff.put((time.perf_counter(), launched))
        if wait_for_launch:
            launched.wait()  # the launch_done wait of two_events
        _busy(work_ms)  # processing the previous step's results
        launched.wait()
    handoff.put(None)
    th.join()
    return delays


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work-ms", type=float, default=2.0, help="scheduler Python work per step")
    p.add_argument("--steps", type=int, default=200)
    args = p.parse_args(argv)
    print(
        f"switch interval {sys.getswitchinterval() * 1e3:.1f} ms, scheduler work "
        f"{args.work_ms} ms/step, {args.steps} steps"
    )
    for name, wait in (("thread (process first)", False), ("two_events (launch first)", True)):
        d = sorted(measure(args.work_ms, args.steps, wait))
        print(
            f"{name:26s} launcher wake-up: median {statistics.median(d) * 1e3:.3f} ms, "
            f"p90 {d[int(0.9 * len(d))] * 1e3:.3f} ms, max {d[-1] * 1e3:.3f} ms"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
