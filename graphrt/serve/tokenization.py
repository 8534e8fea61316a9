"""Tokenization for the API process, off the event loop.

Every call into the Hugging Face tokenizer runs on one dedicated thread: long prompts and chat
templates do not stall other requests' streams, and the Rust tokenizer is never entered from two
threads at once (concurrent use can fail with "Already borrowed").
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

from graphrt.serve.errors import APIError
from graphrt.serve.protocol import CHAT_ROLES, ChatMessage, MessageToolCall
from graphrt.tokenizer import Tokenizer

T = TypeVar("T")


class TokenizerService:
    """Async facade over a :class:`~graphrt.tokenizer.Tokenizer` (or none, for models without
    one: then only token-id prompts work)."""

    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self.tokenizer = tokenizer
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="graphrt-tokenizer")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _need(self, what: str) -> Tokenizer:
        if self.tokenizer is None:
            raise APIError(400, f"{what} needs a tokenizer and this model has none; send token ids")
        return self.tokenizer

    async def _run(self, what: str, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, partial(fn, *args, **kw))
        except APIError:
            raise
        except Exception as e:
            # Templates raise on conversations they do not support; text with lone surrogates
            # cannot cross into Rust. Both are the input's fault.
            raise APIError(400, f"cannot {what}: {type(e).__name__}: {e}") from e

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        tok = self._need("a text prompt")
        return await self._run("tokenize the prompt", tok.encode, text, add_special_tokens)

    async def apply_chat_template(
        self,
        messages: list[ChatMessage],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        """``tools`` (OpenAI's tool dicts) go to the template, which renders them the way its
        model was taught; a template that knows no tools ignores them."""
        tok = self._need("chat")
        plain = chat_messages_to_dicts(messages)
        kw: dict[str, Any] = {"tools": tools} if tools else {}
        return await self._run(
            "apply the chat template",
            tok.apply_chat_template,
            plain,
            add_generation_prompt=add_generation_prompt,
            **kw,
        )

    def chat_template_text(self) -> str | None:
        """The chat template's source (all named templates joined), or None."""
        hf = getattr(self.tokenizer, "hf", None)  # None for a mock tokenizer
        template = getattr(hf, "chat_template", None)
        if isinstance(template, dict):
            return "\n".join(str(t) for t in template.values())
        return template if isinstance(template, str) else None

    async def decode(self, ids: Sequence[int]) -> str:
        tok = self._need("detokenize")
        return await self._run("detokenize", tok.decode, list(ids))

    async def token_strings(self, ids: Sequence[int]) -> list[str]:
        """Display text of each id (for logprobs); ``token_id:N`` without a tokenizer."""
        if self.tokenizer is None:
            return [f"token_id:{i}" for i in ids]
        return await self._run("decode tokens", self.tokenizer.token_strings, list(ids))


def chat_messages_to_dicts(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Plain ``{"role", "content"}`` dicts for the chat template; text parts are joined. An
    assistant turn's ``tool_calls`` and a tool turn's ``tool_call_id`` are passed on."""
    if not messages:
        raise APIError(400, "messages must not be empty", param="messages")
    out = []
    for i, m in enumerate(messages):
        if m.role not in CHAT_ROLES:
            raise APIError(
                400,
                f"messages[{i}].role must be one of {sorted(CHAT_ROLES)}, got {m.role!r}",
                param=f"messages.{i}.role",
            )
        content = m.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise APIError(
                        400,
                        f"messages[{i}].content[{j}]: only text parts are supported, got "
                        f"type {part.type!r}",
                        param=f"messages.{i}.content.{j}",
                    )
                texts.append(part.text)
            content = "".join(texts)
        # The templates expect 'system'; 'developer' is OpenAI's newer name for it.
        role = "system" if m.role == "developer" else m.role
        d: dict[str, Any] = {"role": role, "content": content or ""}
        if m.tool_calls:
            d["tool_calls"] = [_template_tool_call(c) for c in m.tool_calls]
        if m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        out.append(d)
    return out


def _template_tool_call(call: MessageToolCall) -> dict[str, Any]:
    """A call as templates expect it: the arguments as a mapping (templates render them with
    ``tojson``; OpenAI sends JSON text), as vLLM does. Text that is not a JSON object stays
    text."""
    args: Any = call.function.arguments
    try:
        parsed = json.loads(args)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        args = parsed
    fn = {"name": call.function.name, "arguments": args}
    out: dict[str, Any] = {"type": "function", "function": fn}
    if call.id is not None:
        out["id"] = call.id
    return out
