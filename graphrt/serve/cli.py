"""``python -m graphrt.serve``: parse flags, bind the socket, run uvicorn (or, with several API
processes, the supervisor in :mod:`graphrt.serve.api_servers`)."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import logging
import socket
import sys
from typing import Any

from graphrt.config import EngineConfig
from graphrt.serve.config import ServerConfig

logger = logging.getLogger("graphrt.serve")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m graphrt.serve",
        description="OpenAI-compatible HTTP server for graphrt. Every engine setting is a flag; "
        "server limits are enforced per request with an error naming the limit.",
    )
    server = parser.add_argument_group("server")
    ServerConfig.add_cli_args(server)
    engine = parser.add_argument_group("engine")
    EngineConfig.add_cli_args(engine)
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[ServerConfig, EngineConfig]:
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        return ServerConfig.from_cli_args(args), EngineConfig.from_cli_args(args)
    except (TypeError, ValueError) as e:
        parser.error(str(e))
        raise  # unreachable: parser.error exits


def bind_socket(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """Bind before the model loads, so a taken port fails in a second, not after a minute.

    ``reuse_port``: SO_REUSEPORT, so that several API processes can each bind and listen on the
    same port and the kernel spreads new connections across them."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        if not hasattr(socket, "SO_REUSEPORT"):
            sock.close()
            raise SystemExit("--api-server-count > 1 needs SO_REUSEPORT (Linux)")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise SystemExit(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def uvicorn_config(app: Any, server: ServerConfig) -> Any:
    import uvicorn

    return uvicorn.Config(
        app,
        log_level=server.log_level,
        # uvicorn drains in-flight requests on SIGTERM for at most this long, then cancels them
        # (which aborts them in the engine), then runs the lifespan shutdown.
        timeout_graceful_shutdown=server.drain_timeout,
        timeout_keep_alive=5,
        access_log=False,
        lifespan="on",
        server_header=False,
    )


def warn_slow_paths() -> None:
    """uvicorn falls back to pure-Python HTTP and event loop when these are missing."""
    missing = [m for m in ("uvloop", "httptools") if importlib.util.find_spec(m) is None]
    if missing:
        logger.warning(
            "%s not installed: the API process spends more CPU on every streamed token "
            "(pip install %s)",
            " and ".join(missing),
            " ".join(missing),
        )


def keep_torch_out() -> None:
    """Mark torch absent in an API process, which never runs the model (the engine core runs in
    its own process). transformers imports torch whenever it is installed, even for a
    tokenizer and a chat template; ``sys.modules[name] = None`` makes ``import torch`` fail and
    ``importlib.util.find_spec`` report it missing, so transformers leaves it alone. An API
    process then holds a few hundred MiB less (benchmarks/RESULTS.md, "API process memory").
    A no-op once torch is loaded."""
    sys.modules.setdefault("torch", None)  # type: ignore[arg-type]
    # transformers would then advise, at import, that "PyTorch was not found".
    logging.getLogger("transformers").addFilter(
        lambda record: "PyTorch was not found" not in record.getMessage()
    )


def main(argv: list[str] | None = None) -> None:
    server, engine = parse_args(argv)
    logging.basicConfig(
        level=server.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if not server.is_loopback and not server.api_key:
        logger.warning(
            "listening on %s without an API key: anyone who can reach this address can use "
            "the model (set --api-key or GRAPHRT_API_KEY)",
            server.host,
        )
    warn_slow_paths()
    server = dataclasses.replace(server, api_server_count=server.num_api_servers)
    if server.api_server_count > 1:
        from graphrt.serve.api_servers import run_supervisor

        sys.exit(run_supervisor(server, engine))

    import uvicorn

    from graphrt.serve.app import build_app

    if server.engine_mode != "thread":
        keep_torch_out()
    sock = bind_socket(server.host, server.port)
    # --port 0 picks a free port; log and report the real one.
    server = dataclasses.replace(server, port=sock.getsockname()[1])
    app = build_app(server, engine)
    uv = uvicorn.Server(uvicorn_config(app, server))
    uv.run(sockets=[sock])
    if not uv.started:  # the lifespan failed (e.g. the model did not load)
        sys.exit(1)
