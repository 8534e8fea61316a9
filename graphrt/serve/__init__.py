"""OpenAI-compatible HTTP server: ``python -m graphrt.serve``.

Two processes. The API process (FastAPI on uvicorn) parses and validates requests, tokenizes
and applies chat templates, and writes JSON and SSE. The engine-core process runs the
:class:`~graphrt.engine.Engine` step loop and nothing else. They talk over two ZMQ PUSH/PULL
pipes on ``ipc://`` sockets with compact msgpack messages: adds and aborts in, per-step output
deltas, acks, stats and fatal errors out.

Modules:

* ``cli`` / ``__main__``: flags (server limits plus every engine setting), socket, uvicorn.
* ``config``: :class:`ServerConfig`, the server's settings and per-request limits.
* ``app``: :func:`build_app`, the FastAPI factory; lifespan starts and stops the engine.
* ``openai_api``: the endpoints: validation, limits, sampling parameters, JSON and SSE.
* ``protocol``: pydantic request schemas (strict; unknown fields refused).
* ``generation``: one HTTP request's engine requests, from admission to abort-or-finish.
* ``engine_client``: spawns and watches the engine process, routes its outputs.
* ``engine_core``: the engine process's loop.
* ``ipc``: the wire format.
* ``tokenization``: tokenizer calls on a dedicated thread.
* ``middleware``: API key and body-size limit, before any body is read.
* ``metrics``: Prometheus metrics in a per-app registry.
* ``errors``: OpenAI-style error bodies.
* ``launcher``: start a server as a subprocess and wait until it is healthy (tests, benchmarks).
"""

from __future__ import annotations

from typing import Any

__all__ = ["ServerConfig", "build_app"]


def __getattr__(name: str) -> Any:
    # Lazy, so the engine process (which imports graphrt.serve.engine_core) does not pay for
    # FastAPI and uvicorn.
    if name == "build_app":
        from graphrt.serve.app import build_app

        return build_app
    if name == "ServerConfig":
        from graphrt.serve.config import ServerConfig

        return ServerConfig
    raise AttributeError(name)
