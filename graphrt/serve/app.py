"""``build_app``: the FastAPI application factory. Everything the app needs lives on objects made
here (no module-level state), so tests can build several apps in one process."""

from __future__ import annotations

import asyncio
import gc
import importlib
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from graphrt.config import EngineConfig
from graphrt.serve.config import ServerConfig
from graphrt.serve.engine_client import EngineClient, EngineInfo, EnginePipes
from graphrt.serve.errors import APIError, error_body, failure_reason
from graphrt.serve.metrics import ServerMetrics
from graphrt.serve.middleware import APIKeyMiddleware, BodyLimitMiddleware
from graphrt.serve.openai_api import OpenAIServing
from graphrt.serve.tokenization import TokenizerService

logger = logging.getLogger(__name__)


def served_model_name(server: ServerConfig, engine: EngineConfig) -> str:
    """The name clients must send as ``model``."""
    if server.served_model_name:
        return server.served_model_name
    if engine.model:
        return Path(engine.model).expanduser().resolve().name
    from graphrt.models.default_model import DEFAULT_MODEL_NAME

    return DEFAULT_MODEL_NAME


def build_app(
    server: ServerConfig,
    engine: EngineConfig,
    *,
    pipes: EnginePipes | None = None,
    rank: int = 0,
    engine_pid: int | None = None,
    start_barrier: Any = None,
) -> FastAPI:
    """The OpenAI-compatible app. Its lifespan starts the engine process and stops it (after
    uvicorn has drained the in-flight requests).

    One of several API processes (``server.api_server_count`` > 1) is given the shared
    ``pipes``, its ``rank`` (its pipe pair) and the pid of the engine core the supervisor
    started: its lifespan then attaches to that engine instead, and waits at ``start_barrier``
    (a ``multiprocessing`` barrier) until every API process is ready, so that none listens
    before the others: connections made then would all stay with the first one."""
    name = served_model_name(server, engine)
    num_servers = server.api_server_count or 1
    metrics = ServerMetrics(name, api_server=rank, multiprocess=num_servers > 1)
    serving = OpenAIServing(server, name, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = EngineClient(
            engine,
            heartbeat_timeout_s=server.engine_heartbeat_timeout,
            log_level=logging.getLevelName(server.log_level.upper()),
            in_thread=server.engine_mode == "thread",
            mock_step_s=(
                server.mock_engine_step_ms / 1000
                if server.mock_engine_step_ms is not None
                else None
            ),
            pipes=pipes,
            index=rank,
            engine_pid=engine_pid,
        )
        # Import transformers while the engine process loads the model.
        warm = asyncio.create_task(asyncio.to_thread(importlib.import_module, "transformers"))
        tok: TokenizerService | None = None
        flusher: asyncio.Task | None = None
        try:
            info = await client.start(server.engine_start_timeout)
            await warm
            tok = TokenizerService(await asyncio.to_thread(_load_tokenizer, engine, info))
            client.set_tokenizer(tok.tokenizer)
            serving.attach(client, info, tok)
            # Everything allocated so far lives as long as the server: keep the cyclic GC from
            # rescanning it on every collection, which the per-token path triggers often.
            gc.collect()
            gc.freeze()
            flusher = asyncio.create_task(_flush_periodically(metrics))
            if start_barrier is not None:
                try:
                    await asyncio.to_thread(start_barrier.wait, server.engine_start_timeout)
                except threading.BrokenBarrierError:
                    raise RuntimeError("another API process failed to start") from None
            which = f" (API process {rank + 1} of {num_servers})" if num_servers > 1 else ""
            logger.info("serving %r on http://%s:%d%s", name, server.host, server.port, which)
            yield
        finally:
            if flusher is not None:
                flusher.cancel()
            await client.shutdown()
            if tok is not None:
                tok.close()

    app = FastAPI(
        title="graphrt",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )

    async def on_api_error(request: Request, exc: APIError) -> JSONResponse:
        metrics.fail(exc.reason)
        return exc.response()

    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        metrics.fail(failure_reason(exc.status_code))
        return JSONResponse(
            error_body(exc.status_code, str(exc.detail)),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        metrics.fail("internal_error")
        return JSONResponse(
            error_body(500, f"internal server error: {type(exc).__name__}"), status_code=500
        )

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)

    def on_reject(status: int) -> None:
        metrics.fail(failure_reason(status))

    # Last added runs first: the key is checked before any byte of the body is read.
    app.add_middleware(BodyLimitMiddleware, max_bytes=server.max_request_body_bytes,
                       on_reject=on_reject)  # fmt: skip
    if server.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=server.api_key, on_reject=on_reject)

    app.add_api_route("/v1/completions", serving.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", serving.chat, methods=["POST"])
    app.add_api_route("/v1/models", serving.models, methods=["GET"])
    app.add_api_route("/tokenize", serving.tokenize, methods=["POST"])
    app.add_api_route("/detokenize", serving.detokenize, methods=["POST"])
    app.add_api_route("/health", serving.health, methods=["GET"])
    app.add_api_route("/metrics", serving.metrics_endpoint, methods=["GET"])
    return app


async def _flush_periodically(metrics: ServerMetrics, period_s: float = 1.0) -> None:
    """Per-chunk metrics are buffered; publish them at least this often (with several API
    processes, another process may answer the next scrape)."""
    while True:
        await asyncio.sleep(period_s)
        metrics.flush()


def _load_tokenizer(engine: EngineConfig, info: EngineInfo):
    """The same tokenizer the engine loaded, or None when the model has none."""
    if not info.has_tokenizer:
        return None
    from graphrt.tokenizer import Tokenizer

    return Tokenizer.from_pretrained(engine.tokenizer or info.model_dir)
