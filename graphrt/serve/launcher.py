"""``ServerProcess``: run ``python -m graphrt.serve`` as a subprocess on a loopback port and wait
until it is healthy. Used by the tests and by ``benchmarks/serving.py --launch-server``."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class ServerProcess:
    """A graphrt server subprocess. ``args`` are extra server/engine flags.

    Use as a context manager, or call :meth:`start` and :meth:`stop`. The server's output goes
    to ``log_path`` (a temporary file by default; see :meth:`log_tail`).
    """

    def __init__(
        self,
        args: Sequence[str] = (),
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        env: Mapping[str, str] | None = None,
        log_path: str | Path | None = None,
    ) -> None:
        if not is_loopback(host):
            raise ValueError(f"ServerProcess only binds loopback addresses, not {host!r}")
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.args = list(args)
        self.env = {**os.environ, **(env or {})}
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix="graphrt-server-", suffix=".log")
            os.close(fd)
            log_path = name
        self.log_path = Path(log_path)
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 600.0, wait: bool = True) -> ServerProcess:
        """Start the server and (unless ``wait`` is False) wait until ``/health`` answers 200."""
        cmd = [
            sys.executable, "-m", "graphrt.serve",
            "--host", self.host, "--port", str(self.port), *self.args,
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
        if wait:
            self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with code {self.proc.returncode} while starting:\n"
                    + self.log_tail()
                )
            try:
                with urllib.request.urlopen(self.base_url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.25)
        raise TimeoutError(f"server not healthy after {timeout:.0f} s:\n" + self.log_tail())

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM (the server drains, then exits); SIGKILL the group if it takes too long."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return proc.returncode if proc else None
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            return proc.wait(10)

    def log_tail(self, max_chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-max_chars:]
        except OSError:
            return ""

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
