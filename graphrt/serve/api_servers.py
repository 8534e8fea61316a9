"""Several API processes in front of one engine core: ``--api-server-count N`` with N > 1.

One API process (HTTP, JSON, SSE on one event loop) costs CPU for every stream chunk it sends,
and at a few tens of thousands of chunks per second it becomes the bottleneck: tokens then
arrive several to a chunk and the inter-token latency clients see exceeds the engine's step.
N processes share that work.

The process that ``python -m graphrt.serve`` started becomes a supervisor:

* it reserves the port (a socket bound with SO_REUSEPORT that never listens, so a taken port
  fails at once and ``--port 0`` resolves to one port for all);
* it starts the engine core through its own :class:`EngineClient` (pipe pair N of N + 1), and N
  API processes (pairs 0..N-1), which attach to that engine by its pid; each binds the port
  with SO_REUSEPORT and listens once all of them have started (a barrier: a process listening
  alone would keep every early keep-alive connection), and the kernel spreads new connections
  across the listening processes;
* the engine core routes every request's outputs to the process that submitted it;
* it points prometheus-client's multiprocess mode at a private directory, so that ``/metrics``
  on any process reports the whole server;
* SIGTERM or SIGINT: it forwards SIGTERM to the API processes, which stop accepting and drain
  their requests (``--drain-timeout``) as the single process does, then stops the engine core
  and exits. If an API process dies, the supervisor stops the others and exits with status 1.
  If the engine dies, the API processes fail their requests and report it on ``/health``, as a
  single process does; the supervisor stays up with them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
from typing import Any

from graphrt.config import EngineConfig
from graphrt.serve.config import ServerConfig
from graphrt.serve.engine_client import EngineClient, EngineDeadError, EnginePipes
from graphrt.serve.engine_core import set_process_name
from graphrt.serve.metrics import MULTIPROC_DIR_ENV

logger = logging.getLogger(__name__)

API_PROCESS_NAME = "graphrt-api-{}"  # /proc/PID/comm of API process i (at most 15 bytes)
_KILL_GRACE_S = 10.0  # after a drain, how long an API process may take to exit


def run_supervisor(server: ServerConfig, engine: EngineConfig) -> int:
    """Run N API processes and one engine core until SIGTERM/SIGINT. Returns the exit status."""
    from graphrt.serve.cli import bind_socket

    n = server.api_server_count
    placeholder = bind_socket(server.host, server.port, reuse_port=True)
    server = dataclasses.replace(server, port=placeholder.getsockname()[1])
    # prometheus-client reads this when first imported: set it before any API process starts.
    metrics_dir = tempfile.mkdtemp(prefix="graphrt-metrics-")
    os.environ[MULTIPROC_DIR_ENV] = metrics_dir
    pipes = EnginePipes.create(n + 1)
    try:
        return asyncio.run(_Supervisor(server, engine, pipes).run())
    finally:
        placeholder.close()
        pipes.remove()
        shutil.rmtree(metrics_dir, ignore_errors=True)


def api_server_main(
    server: ServerConfig,
    engine: EngineConfig,
    pipes: EnginePipes,
    rank: int,
    engine_pid: int,
    start_barrier: Any,
) -> None:
    """One API process (a ``multiprocessing`` "spawn" target): the same app and uvicorn as a
    single API process, attached to the supervisor's engine core."""
    set_process_name(API_PROCESS_NAME.format(rank))
    _exit_with_parent()
    logging.basicConfig(
        level=server.log_level.upper(),
        format=f"%(asctime)s %(levelname)s [api-{rank}] %(name)s: %(message)s",
    )
    import uvicorn

    from graphrt.serve.app import build_app
    from graphrt.serve.cli import bind_socket, keep_torch_out, uvicorn_config

    keep_torch_out()
    sock = bind_socket(server.host, server.port, reuse_port=True)
    app = build_app(
        server, engine, pipes=pipes, rank=rank, engine_pid=engine_pid, start_barrier=start_barrier
    )
    uv = uvicorn.Server(uvicorn_config(app, server))
    uv.run(sockets=[sock])
    if not uv.started:  # the lifespan failed (e.g. the engine did not load)
        sys.exit(1)


class _Supervisor:
    def __init__(self, server: ServerConfig, engine: EngineConfig, pipes: EnginePipes) -> None:
        self.server = server
        self.engine = engine
        self.pipes = pipes
        self.n = server.api_server_count
        self.procs: list[multiprocessing.process.BaseProcess] = []
        self._wake: asyncio.Event | None = None
        self._signalled = False
        self._stopping = False
        self._failed_api: multiprocessing.process.BaseProcess | None = None
        self._barrier: Any = None

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        server = self.server
        client = EngineClient(
            self.engine,
            heartbeat_timeout_s=server.engine_heartbeat_timeout,
            log_level=logging.getLevelName(server.log_level.upper()),
            mock_step_s=(
                server.mock_engine_step_ms / 1000
                if server.mock_engine_step_ms is not None
                else None
            ),
            pipes=self.pipes,
            index=self.n,
        )
        code = 1
        try:
            # The API processes start (imports, tokenizer) while the engine loads its model.
            engine_pid = client.launch()
            ctx = multiprocessing.get_context("spawn")
            # All API processes start listening together (see build_app).
            self._barrier = ctx.Barrier(self.n)
            for rank in range(self.n):
                proc = ctx.Process(
                    target=api_server_main,
                    args=(server, self.engine, self.pipes, rank, engine_pid, self._barrier),
                    name=API_PROCESS_NAME.format(rank),
                    daemon=True,
                )
                proc.start()
                loop.add_reader(proc.sentinel, self._on_api_exit, proc)
                self.procs.append(proc)
            ready = asyncio.ensure_future(client.wait_ready(server.engine_start_timeout))
            wake = asyncio.ensure_future(self._wake.wait())
            await asyncio.wait({ready, wake}, return_when=asyncio.FIRST_COMPLETED)
            wake.cancel()
            if not ready.done():
                ready.cancel()
            elif ready.exception() is not None:
                exc = ready.exception()
                why = str(exc) if isinstance(exc, EngineDeadError) else repr(exc)
                logger.error("the engine did not start: %s", why)
            else:
                url = f"http://{server.host}:{server.port}"
                logger.info("engine ready; %d API processes on %s", self.n, url)
                await self._wake.wait()
            code = 0 if self._signalled and self._failed_api is None else 1
            if self._failed_api is not None:
                logger.error(
                    "API process %s exited (exit code %s); stopping the server",
                    self._failed_api.name,
                    self._failed_api.exitcode,
                )
        finally:
            self._stopping = True
            await self._stop_api_servers(client)
            await client.shutdown()
        return code

    def _on_signal(self, sig: int) -> None:
        if not self._signalled:
            logger.info("%s: draining the API processes", signal.Signals(sig).name)
        self._signalled = True
        self._wake.set()

    def _on_api_exit(self, proc: multiprocessing.process.BaseProcess) -> None:
        asyncio.get_running_loop().remove_reader(proc.sentinel)
        proc.join(0.1)
        _mark_metrics_dead(proc.pid)
        if not self._stopping and self._failed_api is None:
            self._failed_api = proc
        self._wake.set()

    async def _stop_api_servers(self, client: EngineClient) -> None:
        """SIGTERM every API process (each drains, then exits) and wait for them; kill those
        that outlive the drain. Before the engine is ready they are still starting (waiting
        for it), so stop the engine first: they notice its exit and give up."""
        if self._barrier is not None:
            self._barrier.abort()  # release any still waiting for the others to start
        live = [p for p in self.procs if p.is_alive()]
        for p in live:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGTERM)
        if client.info is None:
            await client.shutdown(timeout_s=5.0)
        deadline = time.monotonic() + self.server.drain_timeout + _KILL_GRACE_S
        for p in live:
            await asyncio.to_thread(p.join, max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                logger.warning("API process %s did not stop; killing it", p.name)
                p.kill()
                await asyncio.to_thread(p.join, 5)


def _mark_metrics_dead(pid: int | None) -> None:
    """Drop a dead process's live gauges (requests in flight) from the merged metrics."""
    if pid is None or not os.environ.get(MULTIPROC_DIR_ENV):
        return
    from prometheus_client import multiprocess

    with contextlib.suppress(OSError):
        multiprocess.mark_process_dead(pid)


def _exit_with_parent() -> None:
    """SIGTERM this process when the supervisor dies (Linux ``PR_SET_PDEATHSIG``), so that a
    killed supervisor leaves no API process behind; it drains, then exits."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before the call
        os.kill(os.getpid(), signal.SIGTERM)
