"""``python -m graphrt.serve``: parse flags, bind the socket, run uvicorn."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import socket
import sys

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


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind before the model loads, so a taken port fails in a second, not after a minute."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise SystemExit(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


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
    import uvicorn

    from graphrt.serve.app import build_app

    sock = bind_socket(server.host, server.port)
    # --port 0 picks a free port; log and report the real one.
    server = dataclasses.replace(server, port=sock.getsockname()[1])
    app = build_app(server, engine)
    config = uvicorn.Config(
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
    uv = uvicorn.Server(config)
    uv.run(sockets=[sock])
    if not uv.started:  # the lifespan failed (e.g. the model did not load)
        sys.exit(1)
