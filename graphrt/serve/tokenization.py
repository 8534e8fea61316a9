"""Tokenization for the API process, off the event loop.

Every call into the Hugging Face tokenizer runs on one dedicated thread: long prompts and chat
templates do not stall other requests' streams, and the Rust tokenizer is never entered from two
threads at once (concurrent use can fail with "Already borrowed").
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

from graphrt.serve.errors import APIError
from graphrt.serve.protocol import CHAT_ROLES, ChatMessage
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
        self, messages: list[ChatMessage], add_generation_prompt: bool = True
    ) -> list[int]:
        tok = self._need("chat")
        plain = chat_messages_to_dicts(messages)
        return await self._run(
            "apply the chat template",
            tok.apply_chat_template,
            plain,
            add_generation_prompt=add_generation_prompt,
        )

    async def decode(self, ids: Sequence[int]) -> str:
        tok = self._need("detokenize")
        return await self._run("detokenize", tok.decode, list(ids))

    async def token_strings(self, ids: Sequence[int]) -> list[str]:
        """Display text of each id (for logprobs); ``token_id:N`` without a tokenizer."""
        if self.tokenizer is None:
            return [f"token_id:{i}" for i in ids]
        return await self._run("decode tokens", self.tokenizer.token_strings, list(ids))


def chat_messages_to_dicts(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """Plain ``{"role", "content"}`` dicts for the chat template; text parts are joined."""
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
        out.append({"role": role, "content": content or ""})
    return out
