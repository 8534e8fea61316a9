"""The OpenAI-compatible endpoints: request validation, sampling parameters, limits, and the
JSON and SSE responses of completions and chat completions.

Validation happens here, before anything reaches the engine, wherever the API process knows
enough (types, server limits, the context length reported by the engine); the engine's own
checks stay authoritative and their rejections come back as 400s too.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from json.encoder import encode_basestring as _json_str  # json.dumps(str, ensure_ascii=False)
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from graphrt.errors import RequestRejected
from graphrt.request import TokenLogprob
from graphrt.sampling_params import SamplingParams
from graphrt.serve.config import ServerConfig
from graphrt.serve.engine_client import EngineClient, EngineInfo
from graphrt.serve.errors import APIError, error_body
from graphrt.serve.generation import Generation, GenerationFailed, wait_for_disconnect
from graphrt.serve.ipc import ChoiceDelta, OutputDelta
from graphrt.serve.metrics import ServerMetrics
from graphrt.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    _SamplingFields,
    describe_validation_error,
    parse,
)
from graphrt.serve.tokenization import TokenizerService
from graphrt.serve.tool_calls import (
    ParsedOutput,
    ToolCall,
    ToolCallParser,
    detect_parser,
    function_parameters,
    make_parser,
    parse_required,
    required_schema,
)
from graphrt.validation import (
    RequestLimits,
    check_logprobs,
    check_max_tokens,
    check_n,
    check_prompt,
    check_token_ids,
)

logger = logging.getLogger(__name__)

# JSON has no -inf; a token the model rules out completely reports this instead.
_MIN_LOGPROB = -9999.0
_PASSTHROUGH = (
    "temperature",
    "top_p",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "top_k",
    "min_p",
    "repetition_penalty",
    "min_tokens",
    "ignore_eos",
    "include_stop_str_in_output",
    "skip_special_tokens",
)
_SAMPLING_FIELDS = frozenset(SamplingParams.__dataclass_fields__)
_JSON_TYPES = frozenset({"string", "number", "integer", "boolean", "object", "array", "null"})
# Schema keywords whose values are data, not schemas: a "type" key inside is no type keyword.
_SCHEMA_DATA_KEYWORDS = frozenset({"enum", "const", "default", "examples"})


@dataclass(slots=True)
class _Choice:
    """What one completion has produced so far."""

    text: list[str] = field(default_factory=list)
    num_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    text_offset: int = 0  # completions logprobs: where the next token's text starts
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    sent_role: bool = False

    def add(self, c: ChoiceDelta) -> None:
        if c.text:
            self.text.append(c.text)
        self.num_tokens += len(c.token_ids)
        if c.logprobs:
            self.logprobs.extend(c.logprobs)
        if c.finish_reason is not None:
            self.finish_reason = c.finish_reason
            self.stop_reason = c.stop_reason


@dataclass(frozen=True, slots=True)
class _ToolPlan:
    """How a chat request's tools shape its output (none when ``tool_choice`` is "none")."""

    mode: str  # "auto": parse free output; "required"/"named": a schema forces the call
    parser: ToolCallParser | None  # auto's
    function: str | None  # named's
    parallel: bool  # parallel_tool_calls

    def parse(self, text: str) -> ParsedOutput:
        """The calls in a finished output (with text that was not a call)."""
        if self.mode == "named":
            return ParsedOutput(None, (ToolCall(self.function, text),))
        if self.mode == "required":
            out = parse_required(text)
        else:
            out = self.parser.parse(text)
        if not self.parallel and len(out.calls) > 1:
            out = ParsedOutput(out.content, out.calls[:1])
        return out


@dataclass(slots=True)
class _ToolStream:
    """One streamed choice's progress through a tool plan."""

    text: str = ""  # the output so far
    sent: int = 0  # characters of ``text`` sent as content
    logprobs: list[TokenLogprob] = field(default_factory=list)  # held back with the text
    num_calls: int = 0  # calls sent


@dataclass
class _Job:
    """A validated generation request, ready for the engine."""

    kind: str  # "completion" or "chat"
    request_id: str
    created: int
    prompts: list[list[int]]
    params: dict[str, Any]
    n: int
    stream: bool
    include_usage: bool
    continuous_usage: bool
    logprobs: int | None  # None: not requested
    arrival: float
    cache_salt: str | None
    tools: _ToolPlan | None = None
    structured_param: str | None = None  # the request field an engine's grammar error names


class OpenAIServing:
    """Request handlers. ``attach`` wires in the engine once it is ready."""

    def __init__(self, config: ServerConfig, model_name: str, metrics: ServerMetrics) -> None:
        self.config = config
        self.model_name = model_name
        self.metrics = metrics
        self.created = int(time.time())
        self.client: EngineClient | None = None
        self.info: EngineInfo | None = None
        self.tok: TokenizerService | None = None
        self.limits: RequestLimits | None = None  # the engine's limits with this server's caps
        self.tool_parser: ToolCallParser | None = None
        self.in_flight = 0
        # With several API processes each admits its share of the limit (connections are
        # spread across them by the kernel, evenly on average).
        self.max_in_flight = -(-config.max_concurrent_requests // (config.api_server_count or 1))

    def attach(self, client: EngineClient, info: EngineInfo, tok: TokenizerService) -> None:
        self.client, self.info, self.tok = client, info, tok
        cfg = self.config
        self.limits = RequestLimits(
            vocab_size=info.vocab_size,
            max_model_len=info.max_model_len,
            max_logprobs=info.max_logprobs,
            max_n=cfg.max_n,
            max_prompt_tokens=cfg.max_prompt_tokens,
            max_output_tokens=cfg.max_output_tokens,
            max_n_setting="the server limit max_n",
        )
        name = cfg.tool_call_parser or detect_parser(tok.chat_template_text(), _model_type(info))
        self.tool_parser = make_parser(name)

    # ---- plain endpoints --------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        problem = self.client.health_problem() if self.client else "engine is starting"
        if problem is not None:
            return JSONResponse(
                error_body(503, problem, code="engine_unavailable"), status_code=503
            )
        return JSONResponse({"status": "ok"})

    async def models(self, request: Request) -> Response:
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {
                        "id": self.model_name,
                        "object": "model",
                        "created": self.created,
                        "owned_by": "graphrt",
                        "root": self.info.model_dir if self.info else None,
                        "max_model_len": self.info.max_model_len if self.info else None,
                    }
                ],
            }
        )

    async def metrics_endpoint(self, request: Request) -> Response:
        stats = await self.client.fetch_stats() if self.client else {}
        healthy = self.client is not None and self.client.health_problem() is None
        self.metrics.update_engine(stats, healthy)
        body, content_type = self.metrics.render()
        return Response(body, media_type=content_type)

    async def tokenize(self, request: Request) -> Response:
        req = await self._parse(request, TokenizeRequest)
        self._check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of 'prompt' and 'messages'")
        if req.messages is not None:
            ids = await self.tok.apply_chat_template(
                req.messages, add_generation_prompt=req.add_generation_prompt is not False
            )
        else:
            ids = await self.tok.encode(req.prompt, req.add_special_tokens is not False)
        return JSONResponse(
            {"count": len(ids), "max_model_len": self.info.max_model_len, "tokens": ids}
        )

    async def detokenize(self, request: Request) -> Response:
        req = await self._parse(request, DetokenizeRequest)
        self._check_model(req.model)
        self._check_token_ids(req.tokens, "tokens")
        return JSONResponse({"prompt": await self.tok.decode(req.tokens)})

    # ---- generation -------------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        arrival = time.monotonic()
        req = await self._parse(request, CompletionRequest)
        self._check_model(req.model)
        self._refuse_unsupported(req)
        structured = self._structured_outputs(req)
        prompts = await self._completion_prompts(req.prompt)
        max_tokens = 16 if req.max_tokens is None else req.max_tokens
        job = self._job(
            "completion", req, prompts, max_tokens, req.logprobs, "logprobs", arrival, structured
        )
        return await self._serve(request, job)

    async def chat(self, request: Request) -> Response:
        arrival = time.monotonic()
        req = await self._parse(request, ChatCompletionRequest)
        self._check_model(req.model)
        self._refuse_unsupported(req)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs requires logprobs=true", param="top_logprobs")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        if not req.messages:
            raise APIError(400, "messages must not be empty", param="messages")
        structured = self._structured_outputs(req)
        tools, plan, forced = self._tool_plan(req)
        if forced is not None:
            if structured[0] is not None:
                what = "'required'" if plan.mode == "required" else "naming a function"
                raise APIError(
                    400,
                    f"tool_choice {what} constrains the output itself; it cannot be combined "
                    f"with {structured[1]}",
                    param="tool_choice",
                )
            structured = forced
        ids = await self.tok.apply_chat_template(
            req.messages,
            add_generation_prompt=req.add_generation_prompt is not False,
            tools=tools,
        )
        max_tokens = req.max_completion_tokens
        if max_tokens is None:
            max_tokens = req.max_tokens
        job = self._job(
            "chat", req, [ids], max_tokens, logprobs, "top_logprobs", arrival, structured, plan
        )
        return await self._serve(request, job)

    async def _serve(self, request: Request, job: _Job) -> Response:
        gen = self._open_generation(job)
        try:
            try:
                await gen.start(job.prompts, job.params, job.cache_salt)
            except APIError as e:
                # The engine's grammar compiler names its own field; the client sent another.
                if e.status == 400 and job.structured_param and "structured_outputs" in e.message:
                    raise APIError(400, e.message, param=job.structured_param) from None
                raise
            if job.stream:
                owned = gen

                def cleanup() -> None:
                    if not owned.finished and not owned.failed:
                        self.metrics.fail("client_disconnect")
                    owned.close()

                response = _CleanupStreamingResponse(
                    self._stream(gen, job), cleanup, media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                )  # fmt: skip
                gen = None  # the response owns it now
                return response
            return await self._respond(request, gen, job)
        finally:
            if gen is not None:
                gen.close()

    def _open_generation(self, job: _Job) -> Generation:
        if self.in_flight >= self.max_in_flight:
            limit = self.config.max_concurrent_requests
            n = self.config.api_server_count or 1
            share = "" if n == 1 else f" (this API process's share of it, with {n} processes)"
            raise APIError(
                503,
                f"the server is at its limit of max_concurrent_requests={limit} requests in "
                f"flight{share}; retry later",
                code="server_overloaded",
            )
        self.in_flight += 1
        self.metrics.in_flight.set(self.in_flight)
        self.metrics.api_server_requests.inc()

        def release() -> None:
            self.in_flight -= 1
            self.metrics.in_flight.set(self.in_flight)

        return Generation(
            self.client, self.metrics, job.request_id, len(job.prompts), job.arrival, release
        )

    async def _respond(self, request: Request, gen: Generation, job: _Job) -> Response:
        """Collect the whole generation, unless the client leaves first (then abort it)."""
        collect = asyncio.ensure_future(self._collect(gen, job))
        gone = asyncio.ensure_future(wait_for_disconnect(request.receive))
        try:
            await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (collect, gone):
                if not task.done():
                    task.cancel()
        if not collect.done() or collect.cancelled():
            raise APIError(499, "client disconnected", reason="client_disconnect")
        try:
            body = collect.result()
        except GenerationFailed as e:
            raise APIError(500, f"generation failed: {e}", reason="engine_error") from e
        return JSONResponse(body)

    async def _collect(self, gen: Generation, job: _Job) -> dict[str, Any]:
        choices = [_Choice() for _ in range(len(job.prompts) * job.n)]
        cached = [0] * len(job.prompts)
        async for batch in gen.outputs():
            for tag, out in batch:
                if out.num_cached_tokens is not None:
                    cached[tag] = out.num_cached_tokens
                for c in out.choices:
                    choices[tag * job.n + c.index].add(c)
        self._count_success(choices)
        result = []
        for i, ch in enumerate(choices):
            text = "".join(ch.text)
            lp = (
                await self._format_logprobs(job, ch, ch.logprobs)
                if job.logprobs is not None
                else None
            )
            if job.kind == "chat":
                message: dict[str, Any] = {"role": "assistant", "content": text}
                finish = ch.finish_reason
                if job.tools is not None:
                    out = job.tools.parse(text)
                    message["content"] = out.content
                    if out.calls:
                        message["tool_calls"] = [c.to_openai() for c in out.calls]
                        finish = _tool_finish(finish)
                result.append(
                    {
                        "index": i,
                        "message": message,
                        "logprobs": lp,
                        "finish_reason": finish,
                        "stop_reason": ch.stop_reason,
                    }
                )
            else:
                result.append(
                    {
                        "index": i,
                        "text": text,
                        "logprobs": lp,
                        "finish_reason": ch.finish_reason,
                        "stop_reason": ch.stop_reason,
                    }
                )
        return {
            "id": job.request_id,
            "object": "chat.completion" if job.kind == "chat" else "text_completion",
            "created": job.created,
            "model": self.model_name,
            "choices": result,
            "usage": _usage(job, choices, cached),
        }

    async def _stream(self, gen: Generation, job: _Job) -> AsyncIterator[bytes]:
        choices = [_Choice() for _ in range(len(job.prompts) * job.n)]
        obj = "chat.completion.chunk" if job.kind == "chat" else "text_completion"
        head = {"id": job.request_id, "object": obj, "created": job.created}
        head["model"] = self.model_name
        # Every chunk of a stream shares its head; JSON-encode it once, not once per token.
        prefix = b"data: " + _dumps(head)[:-1].encode() + b',"choices":['
        suffix = b'],"usage":null}\n\n' if job.include_usage else b"]}\n\n"
        chat = job.kind == "chat"
        cached = [0] * len(job.prompts)
        tool_streams = [_ToolStream() for _ in choices] if job.tools is not None else None
        try:
            async for batch in gen.outputs():
                for tag, out in batch:
                    if out.num_cached_tokens is not None:
                        cached[tag] = out.num_cached_tokens
                for idx, c in _merge(batch, job.n).items():
                    ch = choices[idx]
                    if ch.finish_reason is not None:
                        continue
                    ch.add(c)
                    if tool_streams is not None:
                        for d in await self._tool_deltas(job, idx, ch, tool_streams[idx], c):
                            choice = _dumps(d)
                            if job.continuous_usage:
                                usage = _dumps(_usage(job, choices, cached)).encode()
                                yield prefix + choice.encode() + b'],"usage":' + usage + b"}\n\n"
                            else:
                                yield prefix + choice.encode() + suffix
                        continue
                    lp = "null"
                    if job.logprobs is not None and c.logprobs:
                        lp = _dumps(await self._format_logprobs(job, ch, c.logprobs))
                    choice = _chunk_choice(chat, idx, ch, c, lp)
                    if job.continuous_usage:
                        usage = _dumps(_usage(job, choices, cached)).encode()
                        yield prefix + choice.encode() + b'],"usage":' + usage + b"}\n\n"
                    else:
                        yield prefix + choice.encode() + suffix
        except GenerationFailed as e:
            self.metrics.fail("engine_error")
            yield _sse(error_body(500, f"generation failed: {e}"))
            yield b"data: [DONE]\n\n"
            return
        except APIError as e:  # e.g. logprob tokens that cannot be decoded
            self.metrics.fail(e.reason)
            yield _sse(e.body())
            yield b"data: [DONE]\n\n"
            return
        except Exception as e:
            # Headers are sent: the only way left to tell the client is an error event.
            logger.exception("stream %s failed", job.request_id)
            self.metrics.fail("internal_error")
            yield _sse(error_body(500, f"internal server error: {type(e).__name__}"))
            yield b"data: [DONE]\n\n"
            return
        self._count_success(choices)
        if job.include_usage:
            yield _sse({**head, "choices": [], "usage": _usage(job, choices, cached)})
        yield b"data: [DONE]\n\n"

    async def _tool_deltas(
        self, job: _Job, idx: int, ch: _Choice, st: _ToolStream, c: ChoiceDelta
    ) -> list[dict[str, Any]]:
        """The stream choices (OpenAI chunk format) one step of a tool-planned choice sends.

        A named call streams its arguments as they come. Otherwise text is held back while it
        may still be a call (the parser says from where) and sent as content once it cannot;
        the held text is parsed when the choice finishes and goes out as calls, or as content
        if it was none."""
        plan = job.tools
        st.text += c.text
        if c.logprobs:
            st.logprobs.extend(c.logprobs)
        deltas: list[dict[str, Any]] = []
        if plan.mode == "named":
            if st.num_calls == 0:
                deltas.append(_call_head(ToolCall(plan.function, ""), 0))
                st.num_calls = 1
            if c.text:
                deltas.append({"tool_calls": [{"index": 0, "function": {"arguments": c.text}}]})
        elif plan.mode == "auto":
            hold = plan.parser.hold_from(st.text)
            if hold > st.sent:
                deltas.append({"content": st.text[st.sent : hold]})
                st.sent = hold
        finish = c.finish_reason
        if finish is not None:
            tail = st.text[st.sent :]
            st.sent = len(st.text)
            if plan.mode != "named":
                parsed = plan.parse(tail)
                if parsed.calls:
                    if parsed.content:
                        deltas.append({"content": parsed.content})
                    for call in parsed.calls:
                        deltas.append(_call_head(call, st.num_calls))
                        args = {"arguments": call.arguments}
                        deltas.append({"tool_calls": [{"index": st.num_calls, "function": args}]})
                        st.num_calls += 1
                elif tail:
                    deltas.append({"content": tail})
            if st.num_calls:
                finish = _tool_finish(finish)
            if not deltas:
                deltas.append({})
        if not deltas:
            return []
        if not ch.sent_role:
            deltas[0] = {"role": "assistant", **deltas[0]}
            ch.sent_role = True
        lp = None
        if job.logprobs is not None and st.logprobs:
            lp = await self._format_logprobs(job, ch, st.logprobs)
            st.logprobs = []
        out = [
            {"index": idx, "delta": d, "logprobs": None, "finish_reason": None,
             "stop_reason": None}
            for d in deltas
        ]  # fmt: skip
        out[0]["logprobs"] = lp
        if c.finish_reason is not None:
            out[-1]["finish_reason"] = finish
            out[-1]["stop_reason"] = c.stop_reason
        return out

    async def _format_logprobs(
        self, job: _Job, ch: _Choice, lps: list[TokenLogprob]
    ) -> dict[str, Any]:
        ids = {t.token_id for t in lps}
        for t in lps:
            ids.update(i for i, _ in t.top)
        order = sorted(ids)
        strings = dict(zip(order, await self.tok.token_strings(order)))
        if job.kind == "chat":
            return {
                "content": [
                    {
                        **_chat_token(strings[t.token_id], t.logprob),
                        "top_logprobs": [_chat_token(strings[i], v) for i, v in t.top],
                    }
                    for t in lps
                ]
            }
        tokens = [strings[t.token_id] for t in lps]
        offsets = []
        for s in tokens:
            offsets.append(ch.text_offset)
            ch.text_offset += len(s)
        return {
            "tokens": tokens,
            "token_logprobs": [_finite(t.logprob) for t in lps],
            "top_logprobs": [{strings[i]: _finite(v) for i, v in t.top} for t in lps],
            "text_offset": offsets,
        }

    def _count_success(self, choices: list[_Choice]) -> None:
        reasons = {c.finish_reason for c in choices}
        self.metrics.succeed("length" if "length" in reasons else "stop")

    # ---- validation -------------------------------------------------------------------------
    async def _parse(self, request: Request, model: type) -> Any:
        body = await request.body()
        try:
            return parse(model, body)
        except ValidationError as e:
            message, param = describe_validation_error(e)
            raise APIError(400, message, param=param) from None

    def _check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(
                404,
                f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                param="model",
                code="model_not_found",
            )

    @staticmethod
    def _refuse_unsupported(req: _SamplingFields) -> None:
        if req.logit_bias:
            raise APIError(400, "logit_bias is not supported", param="logit_bias")
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "stream_options requires stream=true", param="stream_options")
        if isinstance(req, CompletionRequest):
            if req.echo:
                raise APIError(400, "echo is not supported", param="echo")
            if req.suffix:
                raise APIError(400, "suffix is not supported", param="suffix")
            if req.best_of is not None and req.best_of != (req.n or 1):
                raise APIError(400, "best_of other than n is not supported", param="best_of")

    async def _completion_prompts(self, prompt: Any) -> list[list[int]]:
        if isinstance(prompt, str):
            batch: list[Any] = [prompt]
        elif prompt and isinstance(prompt[0], (str, list)):
            batch = prompt
        else:
            batch = [prompt]  # one prompt of token ids (possibly empty)
        if not batch:
            raise APIError(400, "prompt must not be empty", param="prompt")
        out = []
        for p in batch:
            if isinstance(p, str):
                if not p:
                    raise APIError(400, "prompt must not be empty", param="prompt")
                p = await self.tok.encode(p)
            else:
                self._check_token_ids(p, "prompt")
            out.append(p)
        return out

    def _check_token_ids(self, ids: list[int], param: str) -> None:
        try:
            check_token_ids(ids, self.info.vocab_size, param)
        except RequestRejected as e:
            raise APIError(400, str(e), param=e.param) from None

    def _job(
        self,
        kind: str,
        req: CompletionRequest | ChatCompletionRequest,
        prompts: list[list[int]],
        max_tokens: int | None,
        logprobs: int | None,
        logprobs_param: str,
        arrival: float,
        structured: tuple[dict[str, Any] | None, str | None] = (None, None),
        tools: _ToolPlan | None = None,
    ) -> _Job:
        """``structured``: the ``structured_outputs`` for the engine and the request field they
        came from."""
        cfg, info = self.config, self.info
        n = 1 if req.n is None else req.n
        param = "messages" if kind == "chat" else "prompt"
        longest = max(len(p) for p in prompts)
        limits = self.limits
        try:
            check_n(n, limits, len(prompts))
            for p in prompts:
                check_prompt(p, limits, param)
            if max_tokens is None:
                # Chat's default: the rest of the context, capped by the server limit.
                max_tokens = info.max_model_len - longest
                if cfg.max_output_tokens is not None:
                    max_tokens = min(max_tokens, cfg.max_output_tokens)
            elif max_tokens >= 1:  # below 1: SamplingParams names it
                check_max_tokens(longest, max_tokens, limits)
            check_logprobs(logprobs, limits, logprobs_param)
        except RequestRejected as e:
            raise APIError(400, str(e), param=e.param, code=e.code) from None
        params = self._sampling_params(req, n, max_tokens, logprobs, logprobs_param, structured)
        stream = bool(req.stream)
        opts = req.stream_options
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        return _Job(
            kind=kind,
            request_id=f"{prefix}-{uuid.uuid4().hex}",
            created=int(time.time()),
            prompts=prompts,
            params=params,
            n=n,
            stream=stream,
            include_usage=bool(stream and opts is not None and opts.include_usage),
            continuous_usage=bool(stream and opts is not None and opts.continuous_usage_stats),
            logprobs=logprobs,
            arrival=arrival,
            cache_salt=req.cache_salt,
            tools=tools,
            structured_param=structured[1],
        )

    def _sampling_params(
        self,
        req: _SamplingFields,
        n: int,
        max_tokens: int,
        logprobs: int | None,
        logprobs_param: str,
        structured: tuple[dict[str, Any] | None, str | None] = (None, None),
    ) -> dict[str, Any]:
        cfg = self.config
        kw: dict[str, Any] = {"n": n, "max_tokens": max_tokens}
        for name in _PASSTHROUGH:
            value = getattr(req, name)
            if value is not None:
                kw[name] = value
        if logprobs is not None:
            kw["logprobs"] = logprobs
        stop = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
        if len(stop) > cfg.max_stop_strings:
            raise APIError(
                400,
                f"{len(stop)} stop strings exceed the server limit max_stop_strings="
                f"{cfg.max_stop_strings}",
                param="stop",
            )
        for s in stop:
            if len(s) > cfg.max_stop_string_length:
                raise APIError(
                    400,
                    f"a stop string of {len(s)} characters exceeds the server limit "
                    f"max_stop_string_length={cfg.max_stop_string_length}",
                    param="stop",
                )
        if stop:
            kw["stop"] = stop
        stop_ids = req.stop_token_ids or []
        if len(stop_ids) > cfg.max_stop_token_ids:
            raise APIError(
                400,
                f"{len(stop_ids)} stop_token_ids exceed the server limit max_stop_token_ids="
                f"{cfg.max_stop_token_ids}",
                param="stop_token_ids",
            )
        if stop_ids:
            self._check_token_ids(stop_ids, "stop_token_ids")
            kw["stop_token_ids"] = stop_ids
        if structured[0] is not None:
            kw["structured_outputs"] = structured[0]
        try:
            SamplingParams(**kw)
        except (ValueError, TypeError) as e:
            name = str(e).split(" ", 1)[0]
            param = name if name in _SAMPLING_FIELDS else None
            if param == "logprobs":
                param = logprobs_param
            if name.startswith("structured_outputs"):
                param = structured[1]
            raise APIError(400, str(e), param=param) from None
        return kw

    # ---- structured outputs and tools -------------------------------------------------------
    def _structured_outputs(
        self, req: CompletionRequest | ChatCompletionRequest
    ) -> tuple[dict[str, Any] | None, str | None]:
        """The engine's ``structured_outputs`` from ``response_format`` or vLLM's
        ``structured_outputs`` field, and which of the two it came from."""
        fmt, extra = req.response_format, req.structured_outputs
        if fmt is not None and fmt.type != "text":
            if extra is not None:
                raise APIError(
                    400,
                    "give response_format or structured_outputs, not both",
                    param="structured_outputs",
                )
            if fmt.type == "json_object":
                if fmt.json_schema is not None:
                    raise APIError(
                        400,
                        "response_format.json_schema is only for type 'json_schema'",
                        param="response_format",
                    )
                return {"json_object": True}, "response_format"
            if fmt.json_schema is None or fmt.json_schema.schema_ is None:
                raise APIError(
                    400,
                    "response_format of type 'json_schema' needs json_schema.schema, the JSON "
                    "schema the output must follow",
                    param="response_format",
                )
            schema = fmt.json_schema.schema_
            self._check_structured_size(schema, "response_format.json_schema.schema",
                                        "response_format")  # fmt: skip
            _check_schema_types(schema, "response_format.json_schema.schema", "response_format")
            return {"json": schema}, "response_format"
        if fmt is not None and fmt.json_schema is not None:
            raise APIError(
                400,
                "response_format.json_schema is only for type 'json_schema'",
                param="response_format",
            )
        if extra is None:
            return None, None
        given = extra.model_dump(by_alias=True, exclude_none=True)
        if given.get("json_object") is False:
            del given["json_object"]
        if len(given) != 1:
            raise APIError(
                400,
                "structured_outputs takes exactly one of json, json_object, regex, grammar, "
                f"choice; got {', '.join(given) or 'none'}",
                param="structured_outputs",
            )
        self._check_structured_size(given, "structured_outputs", "structured_outputs")
        if isinstance(given.get("json"), dict):
            _check_schema_types(given["json"], "structured_outputs.json", "structured_outputs")
        return given, "structured_outputs"

    def _tool_plan(
        self, req: ChatCompletionRequest
    ) -> tuple[list[dict[str, Any]] | None, _ToolPlan | None, tuple[dict[str, Any], str] | None]:
        """The tools for the chat template, how they shape the output, and the
        ``structured_outputs`` that force a call ("required" or a named function)."""
        choice = req.tool_choice
        if not req.tools:
            if choice is not None and choice != "none":
                raise APIError(400, "tool_choice requires tools", param="tool_choice")
            return None, None, None
        tools = [t.model_dump(exclude_none=True) for t in req.tools]
        self._check_structured_size(tools, "tools", "tools")
        functions = [t["function"] for t in tools]
        names = [f["name"] for f in functions]
        seen: set[str] = set()
        for i, f in enumerate(functions):
            if f["name"] in seen:
                raise APIError(
                    400, f"tools name the function {f['name']!r} twice", param=f"tools.{i}"
                )
            seen.add(f["name"])
            if "parameters" in f:
                _check_schema_types(f["parameters"], f"tools[{i}].function.parameters", "tools")
        parallel = req.parallel_tool_calls is not False
        if choice is None:
            choice = "auto"
        if choice == "none":
            # Tools are still rendered (vLLM's default): the model sees what it may not call.
            return tools, None, None
        if choice == "auto":
            return tools, _ToolPlan("auto", self.tool_parser, None, parallel), None
        if choice == "required":
            schema = required_schema(functions, parallel)
            return tools, _ToolPlan("required", None, None, parallel), ({"json": schema}, "tools")
        name = choice.function.name
        if name not in seen:
            raise APIError(
                400,
                f"tool_choice names the function {name!r}, which is not among the tools {names}",
                param="tool_choice",
            )
        params = function_parameters(functions[names.index(name)])
        return tools, _ToolPlan("named", None, name, parallel), ({"json": params}, "tools")

    def _check_structured_size(self, value: Any, what: str, param: str) -> None:
        limit = self.config.max_structured_output_bytes
        size = len(_dumps(value).encode())
        if size > limit:
            raise APIError(
                400,
                f"{what} is {size} bytes of JSON, over the server limit "
                f"max_structured_output_bytes={limit}",
                param=param,
            )


class _CleanupStreamingResponse(StreamingResponse):
    """A StreamingResponse that always runs ``cleanup`` once it is done, also when the client
    disconnects before the first chunk (when the body generator may never start)."""

    def __init__(self, content: AsyncIterator[bytes], cleanup: Callable[[], None], **kw: Any):
        super().__init__(content, **kw)
        self._cleanup = cleanup

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._cleanup()
            aclose: Callable[[], Awaitable[None]] | None = getattr(
                self.body_iterator, "aclose", None
            )
            if aclose is not None:
                await aclose()


def _merge(batch: list[tuple[int, OutputDelta]], n: int) -> dict[int, ChoiceDelta]:
    """One delta per choice for a batch of outputs. When the API falls behind the engine,
    several steps arrive at once; sending them as one chunk per choice keeps the per-token cost
    of JSON and SSE from compounding the lag. Copies only choices that appear twice."""
    merged: dict[int, ChoiceDelta] = {}
    copied: set[int] = set()
    for tag, out in batch:
        for c in out.choices:
            idx = tag * n + c.index
            m = merged.get(idx)
            if m is None:
                merged[idx] = c
                continue
            if idx not in copied:
                copied.add(idx)
                m = merged[idx] = ChoiceDelta(
                    m.index,
                    m.text,
                    list(m.token_ids),
                    list(m.logprobs) if m.logprobs is not None else None,
                    m.finish_reason,
                    m.stop_reason,
                )
            m.text += c.text
            m.token_ids.extend(c.token_ids)
            if c.logprobs:
                m.logprobs = [*(m.logprobs or []), *c.logprobs]
            if c.finish_reason is not None:
                m.finish_reason, m.stop_reason = c.finish_reason, c.stop_reason
    return merged


# The end of a stream chunk's choice while it is running: no logprobs, not finished.
_RUNNING_END = '"logprobs":null,"finish_reason":null,"stop_reason":null}'


def _chunk_choice(chat: bool, idx: int, ch: _Choice, c: ChoiceDelta, logprobs: str) -> str:
    """One choice of a stream chunk as JSON text, ``logprobs`` already JSON. Built by hand from
    constant pieces and the C string encoder: this runs once per token per stream."""
    if logprobs == "null" and c.finish_reason is None and c.stop_reason is None:
        end = _RUNNING_END
    else:
        end = (
            f'"logprobs":{logprobs},"finish_reason":{_json_scalar(c.finish_reason)},'
            f'"stop_reason":{_json_scalar(c.stop_reason)}}}'
        )
    if chat:
        role = ""
        if not ch.sent_role:
            role = '"role":"assistant",'
            ch.sent_role = True
        return f'{{"index":{idx},"delta":{{{role}"content":{_json_str(c.text)}}},{end}'
    return f'{{"index":{idx},"text":{_json_str(c.text)},{end}'


def _json_scalar(v: str | int | None) -> str:
    if v is None:
        return "null"
    if isinstance(v, str):
        return _json_str(v)
    return _dumps(v)


def _tool_finish(reason: str | None) -> str | None:
    """A choice that ended in tool calls finishes with "tool_calls", unless it was cut short."""
    return "tool_calls" if reason == "stop" else reason


def _call_head(call: ToolCall, index: int) -> dict[str, Any]:
    """The delta that opens a streamed call: id and name; its arguments follow."""
    return {
        "tool_calls": [
            {
                "index": index,
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": ""},
            }
        ]
    }


def _check_schema_types(schema: Any, where: str, param: str) -> None:
    """Every ``type`` keyword in a JSON schema names JSON types: a typo ("str", "int") is
    reported here, naming the request field, rather than as a grammar error."""
    stack: list[Any] = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        kind = node.get("type")
        if isinstance(kind, (str, list)):
            kinds = kind if isinstance(kind, list) else [kind]
            bad = [k for k in kinds if not isinstance(k, str) or k not in _JSON_TYPES]
            if bad or not kinds:
                raise APIError(
                    400,
                    f"{where}: {bad[0] if bad else kind!r} is not a JSON schema type; use one "
                    f"of {sorted(_JSON_TYPES)}",
                    param=param,
                )
        for key, value in node.items():
            if key not in _SCHEMA_DATA_KEYWORDS:
                stack.append(value)


def _model_type(info: EngineInfo) -> str | None:
    """``model_type`` from the model's config.json (None when it has none, e.g. the mock)."""
    try:
        return json.loads((Path(info.model_dir) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def _usage(job: _Job, choices: list[_Choice], cached: list[int]) -> dict[str, Any]:
    """``cached``: each prompt's tokens served by the prefix cache."""
    prompt = sum(len(p) for p in job.prompts)  # counted once, as OpenAI does, whatever n is
    completion = sum(c.num_tokens for c in choices)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": sum(cached)},
    }


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + _dumps(obj).encode() + b"\n\n"


def _finite(v: float) -> float:
    return v if math.isfinite(v) else _MIN_LOGPROB


def _chat_token(s: str, logprob: float) -> dict[str, Any]:
    return {"token": s, "logprob": _finite(logprob), "bytes": list(s.encode("utf-8", "replace"))}
