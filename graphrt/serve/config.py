"""``ServerConfig``: the HTTP server's own settings and per-request limits (the engine's settings
stay in :class:`graphrt.config.EngineConfig`). Frozen and validated; also the source of the
server's CLI defaults."""

from __future__ import annotations

import argparse
import ipaddress
import os
from dataclasses import dataclass, fields
from typing import Any

from graphrt.serve.tool_calls import PARSERS

API_KEY_ENV = "GRAPHRT_API_KEY"

_HELP: dict[str, str] = {
    "host": "address to bind; keep the loopback default unless a proxy or firewall fronts the "
    "server",
    "port": "TCP port to listen on",
    "api_key": f"require 'Authorization: Bearer KEY' on /v1, /tokenize and /detokenize "
    f"(or set {API_KEY_ENV})",
    "served_model_name": "model name clients send in 'model' (default: the model directory's name)",
    "max_request_body_bytes": "largest request body accepted (413 beyond it)",
    "max_prompt_tokens": "longest prompt in tokens (default: the context length minus one)",
    "max_output_tokens": "largest max_tokens a request may ask for, and the default when it "
    "gives none (default: the rest of the context)",
    "max_n": "most completions one request may ask for (n, times the number of prompts)",
    "max_stop_strings": "most stop strings per request",
    "max_stop_string_length": "longest stop string, in characters",
    "max_stop_token_ids": "most stop_token_ids per request",
    "max_structured_output_bytes": "largest JSON schema, grammar or list of tools one request "
    "may send, in bytes of JSON (compiling a grammar costs time and memory in the engine)",
    "tool_call_parser": "how tool calls are read from a model's output when tool_choice is "
    "'auto': llama3_json (Llama 3.1/3.2) or hermes (Qwen2.5, Hermes). Default: from the chat "
    "template's markers, else the model type (qwen*: hermes, llama: llama3_json), else both",
    "max_concurrent_requests": "most generation requests in flight at once (503 beyond it)",
    "drain_timeout": "seconds to let in-flight requests finish after SIGTERM before aborting them",
    "engine_start_timeout": "seconds to wait for the engine process to load the model",
    "engine_heartbeat_timeout": "seconds without word from the engine process before /health "
    "reports it stuck",
    "log_level": "logging level",
    "engine_mode": "'process': the engine loop in its own process (the design); 'thread': in a "
    "thread of the API process, where HTTP work competes with it for the GIL (for measurement)",
    "api_server_count": "API processes (HTTP, JSON, SSE) sharing the port through SO_REUSEPORT, "
    "all feeding the one engine process; one process sends about 1e6 / (its CPU µs per chunk) "
    "stream chunks per second (benchmarks/api_capacity.py measures it). Default: 1 below 8 CPUs, "
    "else one per 4 CPUs, at most 4",
    "mock_engine_step_ms": "benchmarks only (benchmarks/api_capacity.py): load no model; a mock "
    "engine gives every running request one token per this many ms, to measure the API side "
    "alone (token-id prompts only)",
}
_CHOICES: dict[str, tuple[str, ...]] = {
    "engine_mode": ("process", "thread"),
    "log_level": ("critical", "error", "warning", "info", "debug"),
    "tool_call_parser": PARSERS,
}
_NULLABLE_CHOICES = frozenset({"tool_call_parser"})  # None: decided from the model


@dataclass(frozen=True)
class ServerConfig:
    """HTTP server settings and the limits it enforces on each request.

    ``None`` for ``max_prompt_tokens``/``max_output_tokens`` means "as much as the context
    allows". ``api_key=None`` disables authentication.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_model_name: str | None = None
    max_request_body_bytes: int = 4 * 1024 * 1024
    max_prompt_tokens: int | None = None
    max_output_tokens: int | None = None
    max_n: int = 16
    max_stop_strings: int = 16
    max_stop_string_length: int = 256
    max_stop_token_ids: int = 64
    max_structured_output_bytes: int = 64 * 1024
    tool_call_parser: str | None = None
    max_concurrent_requests: int = 1024
    drain_timeout: float = 30.0
    engine_start_timeout: float = 1800.0
    engine_heartbeat_timeout: float = 30.0
    log_level: str = "info"
    engine_mode: str = "process"
    api_server_count: int | None = None
    mock_engine_step_ms: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            raise ValueError(f"host must be a non-empty string, got {self.host!r}")
        _check_int("port", self.port, 0, 65535)
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key):
            raise ValueError("api_key must be a non-empty string or None")
        if self.served_model_name is not None and not self.served_model_name:
            raise ValueError("served_model_name must not be empty")
        _check_int("max_request_body_bytes", self.max_request_body_bytes, 1024, 1 << 34)
        if self.max_prompt_tokens is not None:
            _check_int("max_prompt_tokens", self.max_prompt_tokens, 1, 1 << 24)
        if self.max_output_tokens is not None:
            _check_int("max_output_tokens", self.max_output_tokens, 1, 1 << 24)
        _check_int("max_n", self.max_n, 1, 1 << 16)
        _check_int("max_stop_strings", self.max_stop_strings, 0, 1 << 16)
        _check_int("max_stop_string_length", self.max_stop_string_length, 1, 1 << 16)
        _check_int("max_stop_token_ids", self.max_stop_token_ids, 0, 1 << 16)
        _check_int("max_structured_output_bytes", self.max_structured_output_bytes, 2, 1 << 26)
        _check_int("max_concurrent_requests", self.max_concurrent_requests, 1, 1 << 24)
        _check_float("drain_timeout", self.drain_timeout, 0.0, 86400.0)
        _check_float("engine_start_timeout", self.engine_start_timeout, 1.0, 86400.0)
        _check_float("engine_heartbeat_timeout", self.engine_heartbeat_timeout, 0.5, 86400.0)
        if self.api_server_count is not None:
            _check_int("api_server_count", self.api_server_count, 1, 64)
            if self.api_server_count > 1 and self.engine_mode != "process":
                raise ValueError("api_server_count > 1 needs engine_mode='process'")
        if self.mock_engine_step_ms is not None:
            _check_float("mock_engine_step_ms", self.mock_engine_step_ms, 0.01, 60000.0)
        for name, choices in _CHOICES.items():
            if getattr(self, name) is None and name in _NULLABLE_CHOICES:
                continue
            if getattr(self, name) not in choices:
                raise ValueError(
                    f"{name} must be one of {list(choices)}, got {getattr(self, name)!r}"
                )

    @property
    def num_api_servers(self) -> int:
        """``api_server_count``, or the default for this machine's CPUs when it is None."""
        if self.api_server_count is not None:
            return self.api_server_count
        return default_api_server_count(available_cpus())

    @property
    def is_loopback(self) -> bool:
        """Whether ``host`` only accepts connections from this machine."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        """Add one ``--flag`` per field, defaulting to the dataclass default."""
        for f in fields(cls):
            flag = "--" + f.name.replace("_", "-")
            kind = _FLAG_TYPES.get(f.name, str)
            help_text = _HELP.get(f.name, "")
            if f.default is not None:  # None's meaning is in the help text
                help_text += f" (default: {f.default})"
            parser.add_argument(
                flag,
                dest=f.name,
                type=kind,
                default=f.default,
                choices=_CHOICES.get(f.name),
                help=help_text,
            )

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> ServerConfig:
        """Collect the fields added by :meth:`add_cli_args`; the API key falls back to
        ``$GRAPHRT_API_KEY``."""
        kw: dict[str, Any] = {f.name: getattr(args, f.name) for f in fields(cls)}
        if kw["api_key"] is None:
            kw["api_key"] = os.environ.get(API_KEY_ENV) or None
        return cls(**kw)


_FLAG_TYPES: dict[str, type] = {
    "port": int,
    "max_request_body_bytes": int,
    "max_prompt_tokens": int,
    "max_output_tokens": int,
    "max_n": int,
    "max_stop_strings": int,
    "max_stop_string_length": int,
    "max_stop_token_ids": int,
    "max_structured_output_bytes": int,
    "max_concurrent_requests": int,
    "drain_timeout": float,
    "engine_start_timeout": float,
    "engine_heartbeat_timeout": float,
    "mock_engine_step_ms": float,
    "api_server_count": int,
}


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which containers narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_api_server_count(cpus: int) -> int:
    """1 below 8 CPUs, else one API process per 4 CPUs, at most 4.

    The engine process needs a core of its own (scheduler and launcher threads), a streaming
    load generator on the same host needs several, and an API process at full load takes one.
    Small machines keep the single process: a second one would only compete with the engine
    for the same cores. 4 processes leave each under a third of a core at the issue's load (64
    streams, a token each per 1.8 ms: about 36k chunks/s; benchmarks/RESULTS.md, Serving)."""
    if cpus < 8:
        return 1
    return min(4, cpus // 4)


def _check_int(name: str, value: Any, lo: int, hi: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")


def _check_float(name: str, value: Any, lo: float, hi: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
