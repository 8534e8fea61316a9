"""Tokenizer wrapper, streaming detokenization and stop-string matching.

Three pieces sit between the engine (token ids) and the API (text):

* :class:`Tokenizer` wraps a local Hugging Face *fast* tokenizer and smooths over the
  transformers 4.x / 5.x differences the runtime cares about (chat-template return types,
  eos ids spread over ``tokenizer_config.json`` and ``generation_config.json``).
* :class:`IncrementalDetokenizer` turns a growing list of generated ids into text deltas that
  never contain half a UTF-8 character and keep the leading spaces a full decode would give.
* :class:`StopStringMatcher` finds stop strings in the delta stream, holding back text that
  might still turn out to be the start of a stop string.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers.decoders import DecodeStream

__all__ = ["IncrementalDetokenizer", "StopStringMatcher", "Tokenizer"]

# How many prompt ids give the detokenizer context. A few are enough: they only need to reach
# back past the last complete character (for leading-space rules and split UTF-8 sequences).
_PROMPT_CONTEXT_TOKENS = 6

# How many ids to look back for the start of a character: at most 4 byte tokens, with room
# for special tokens in between.
_CHAR_LOOKBACK = 8

# What a lossy UTF-8 decode puts in place of an incomplete byte sequence.
_REPLACEMENT_CHAR = "\ufffd"

# apply_chat_template arguments that would change the shape of what it returns.
_RESERVED_CHAT_KWARGS = frozenset(
    {"conversation", "tokenize", "return_dict", "return_tensors", "return_assistant_tokens_mask"}
)


def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _byte_level_alphabet() -> dict[str, int]:
    """The byte-level (GPT-2) alphabet: the printable character standing for each byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += range(ord("®"), ord("ÿ") + 1)
    chars = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


def _read_generation_config_eos(directory: Path) -> list[int] | None:
    """Return ``eos_token_id`` from ``directory/generation_config.json`` as a list, if any."""
    path = directory / "generation_config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        # A silently ignored eos list would let generations run to max_tokens; fail loudly.
        raise ValueError(f"cannot read {path}: {e}") from e
    eos = config.get("eos_token_id") if isinstance(config, dict) else None
    if eos is None:
        return None
    if isinstance(eos, bool) or not isinstance(eos, (int, list)):
        raise ValueError(f"{path}: eos_token_id must be an int or a list of ints, got {eos!r}")
    ids = [eos] if isinstance(eos, int) else eos
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"{path}: eos_token_id must be an int or a list of ints, got {eos!r}")
    return list(ids)


def _validate_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        got = "an empty list" if isinstance(messages, list) else type(messages).__name__
        raise ValueError(
            f"messages must be a non-empty list of {{'role': str, 'content': str}} dicts, got {got}"
        )
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(
                f"messages[{i}] must be a dict with 'role' and 'content', "
                f"got {type(message).__name__}: {message!r}"
            )
        for key in ("role", "content"):
            if key not in message:
                raise ValueError(f"messages[{i}] has no {key!r} key: {dict(message)!r}")
            if not isinstance(message[key], str):
                raise ValueError(
                    f"messages[{i}][{key!r}] must be a str, "
                    f"got {type(message[key]).__name__}: {message[key]!r}"
                )


def _as_id_list(out: Any) -> list[int]:
    """Normalize what ``apply_chat_template(tokenize=True)`` returned into a flat id list.

    Depending on the transformers version and arguments this is a list, a BatchEncoding /
    dict holding ``input_ids``, a tensor or array, possibly with a batch dimension of one.
    """
    # BatchEncoding is a UserDict, hence a Mapping.
    if isinstance(out, Mapping):
        out = out["input_ids"]
    if hasattr(out, "tolist"):
        out = out.tolist()
    out = list(out)
    if len(out) == 1 and isinstance(out[0], (list, tuple)):
        out = list(out[0])
    if not all(isinstance(i, int) for i in out):
        raise TypeError(f"apply_chat_template returned an unexpected value: {out!r:.200}")
    return out


class Tokenizer:
    """Thin wrapper around a local Hugging Face fast tokenizer.

    Decoding never applies ``clean_up_tokenization_spaces``: that heuristic rewrites text
    (``"a ."`` becomes ``"a."``) and would make a full decode disagree with the streamed text
    of :class:`IncrementalDetokenizer`.
    """

    def __init__(self, hf_tokenizer: Any, generation_config_eos: list[int] | None = None) -> None:
        """Wrap ``hf_tokenizer``; ``generation_config_eos`` adds extra end-of-sequence ids."""
        self._hf = hf_tokenizer
        eos: set[int] = set()
        if getattr(hf_tokenizer, "eos_token_id", None) is not None:
            eos.add(int(hf_tokenizer.eos_token_id))
        if generation_config_eos:
            eos.update(int(i) for i in generation_config_eos)
        self._eos_token_ids = frozenset(eos)
        self._backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        self._token_text_cache: dict[int, str] = {}
        # (ids, text) of a short prefix that keeps decoders from stripping a leading
        # space; computed on first use by token_strings.
        self._anchor: tuple[list[int], str] | None = None
        self._anchor_checked = False
        # skip_special_tokens -> per-id text for byte-level decoders (see simple_token_texts).
        self._simple_texts: dict[bool, list[str | None] | None] = {}

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> Tokenizer:
        """Load the tokenizer of the local model directory ``path`` (no network, no remote code).

        Also reads ``generation_config.json`` from the directory, whose ``eos_token_id`` often
        lists more end-of-sequence ids than the tokenizer config does.
        """
        from transformers import AutoTokenizer

        directory = Path(path)
        if not directory.is_dir():
            raise FileNotFoundError(f"tokenizer directory {str(path)!r} does not exist")
        hf = AutoTokenizer.from_pretrained(
            str(directory), trust_remote_code=False, local_files_only=True
        )
        if not getattr(hf, "is_fast", False) or getattr(hf, "backend_tokenizer", None) is None:
            raise ValueError(
                f"tokenizer in {str(path)!r} is not a fast (tokenizers-backed) tokenizer "
                f"({type(hf).__name__}); graphrt needs a tokenizer.json"
            )
        return cls(hf, _read_generation_config_eos(directory))

    @property
    def hf(self) -> Any:
        """The underlying Hugging Face tokenizer."""
        return self._hf

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Ids that end generation: the tokenizer's eos plus ``generation_config.json``'s."""
        return self._eos_token_ids

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, added tokens included (``len(tokenizer)``)."""
        return len(self._hf)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` adds e.g. a BOS as the model expects."""
        return list(self._hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (without tokenization-space clean-up, see the class docstring)."""
        return self._decode_raw(list(ids), skip_special_tokens)

    def _decode_raw(self, ids: list[int], skip_special_tokens: bool) -> str:
        if self._backend is not None:
            # Same result as hf.decode(..., clean_up_tokenization_spaces=False), less overhead.
            return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)
        return self._hf.decode(
            ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
        )

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        """Vocabulary strings of ``ids`` (raw, e.g. ``"Ġhello"`` or ``"▁hello"``)."""
        return list(self._hf.convert_ids_to_tokens(list(ids)))

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        """Display text of each id on its own, e.g. for logprobs.

        A token that is part of a multi-byte character decodes to U+FFFD. Leading spaces are
        kept even for SentencePiece-style tokenizers, whose decoders drop the space of the
        first token of a sequence: each id is decoded after a fixed anchor token.
        """
        cache = self._token_text_cache
        out = []
        for i in ids:
            i = int(i)
            text = cache.get(i)
            if text is None:
                text = self._single_token_text(i)
                cache[i] = text
            out.append(text)
        return out

    def _single_token_text(self, token_id: int) -> str:
        anchor = self._get_anchor()
        if anchor is not None:
            anchor_ids, anchor_text = anchor
            text = self._decode_raw([*anchor_ids, token_id], False)
            if text.startswith(anchor_text):
                return text[len(anchor_text) :]
        return self._decode_raw([token_id], False)

    def _get_anchor(self) -> tuple[list[int], str] | None:
        if not self._anchor_checked:
            self._anchor_checked = True
            ids = self.encode("a", add_special_tokens=False)
            if ids and self._decode_raw(ids, False) == "a":
                self._anchor = (ids, "a")
        return self._anchor

    def _check_chat_template(self, kw: Mapping[str, Any]) -> None:
        if kw.get("chat_template") is None and not getattr(self._hf, "chat_template", None):
            raise ValueError(
                "model has no chat template (no chat_template in tokenizer_config.json or "
                "chat_template.jinja); send a plain prompt instead of messages"
            )
        reserved = _RESERVED_CHAT_KWARGS.intersection(kw)
        if reserved:
            raise TypeError(f"apply_chat_template does not accept {sorted(reserved)}")

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, **kw: Any
    ) -> list[int]:
        """Token ids of ``messages`` rendered with the model's chat template.

        ``messages`` must be a non-empty list of ``{"role": str, "content": str}`` dicts
        (other keys are passed through to the template). Extra keyword arguments go to the
        template, e.g. ``chat_template=`` or template variables.
        """
        _validate_messages(messages)
        self._check_chat_template(kw)
        out = self._hf.apply_chat_template(
            messages,
            add_generation_prompt=add_generation_prompt,
            tokenize=True,
            # transformers 5 returns a BatchEncoding by default; 4.x a list.
            return_dict=False,
            **kw,
        )
        return _as_id_list(out)

    def chat_prompt_text(
        self, messages: list[dict], add_generation_prompt: bool = True, **kw: Any
    ) -> str:
        """``messages`` rendered with the chat template, as text (see apply_chat_template)."""
        _validate_messages(messages)
        self._check_chat_template(kw)
        out = self._hf.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False, **kw
        )
        if not isinstance(out, str):
            raise TypeError(f"apply_chat_template returned {type(out).__name__}, expected str")
        return out

    def simple_token_texts(self, skip_special_tokens: bool) -> list[str | None] | None:
        """Per id, the text it adds on its own after any complete character, or None.

        Only for a plain byte-level decoder (GPT-2 style: Llama 3, Qwen, SmolLM), whose decode
        of ids is the UTF-8 decode of their concatenated bytes. An id's entry is its text when
        its bytes are complete, valid UTF-8 not ending in U+FFFD ("" for ids that decode to
        nothing), else None (part of a character). Built on first use and checked against
        ``decode([id])`` for every id; returns None when the decoder is another kind or a check
        fails, and the detokenizer then decodes every token.
        """
        if skip_special_tokens not in self._simple_texts:
            try:
                texts = self._build_simple_texts(skip_special_tokens)
            except Exception:  # an API this tokenizers version lacks: decode every token
                texts = None
            self._simple_texts[skip_special_tokens] = texts
        return self._simple_texts[skip_special_tokens]

    def _build_simple_texts(self, skip: bool) -> list[str | None] | None:
        from tokenizers import decoders

        be = self._backend
        if be is None or type(be.decoder) is not decoders.ByteLevel:
            return None
        to_byte = _byte_level_alphabet()
        special = {i for i, t in be.get_added_tokens_decoder().items() if t.special}
        n = be.get_vocab_size(with_added_tokens=True)
        texts: list[str | None] = []
        lossy: list[str] = []
        for i in range(n):
            tok = be.id_to_token(i)
            if tok is None or (skip and i in special):
                raw = b""
            else:
                try:
                    raw = bytes(to_byte[c] for c in tok)
                except KeyError:
                    raw = tok.encode()  # what the byte-level decoder does with such a token
            text = raw.decode("utf-8", "replace")
            lossy.append(text)
            try:
                strict = raw.decode("utf-8")
            except UnicodeDecodeError:
                strict = None
            texts.append(None if strict is None or strict.endswith(_REPLACEMENT_CHAR) else strict)
        decoded = be.decode_batch([[i] for i in range(n)], skip_special_tokens=skip)
        if decoded != lossy:
            return None
        return texts

    def new_detokenizer(
        self, prompt_ids: Sequence[int], skip_special_tokens: bool = True
    ) -> IncrementalDetokenizer:
        """A detokenizer for the ids generated after ``prompt_ids``."""
        return IncrementalDetokenizer(self, prompt_ids, skip_special_tokens)


class IncrementalDetokenizer:
    """Turns a stream of generated token ids into text deltas.

    Deltas only ever hold complete characters: a token that ends inside a multi-byte UTF-8
    character yields ``""`` until the character completes. The last few prompt ids serve as
    context, so the first generated token keeps the leading space a decode of
    prompt + output would give it (SentencePiece decoders strip the space of a sequence's
    first token). With no prompt, ``"".join(deltas) == tokenizer.decode(ids)`` for any
    chunking of ``ids`` into :meth:`step` calls, as long as the ids end on a complete
    character (:meth:`flush` releases an incomplete tail).

    Uses ``tokenizers.decoders.DecodeStream`` when the installed version can be primed with
    prompt ids (or there is no prompt), else a window decode of its own.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
        *,
        use_decode_stream: bool = True,
        fast_path: bool = True,
    ) -> None:
        """Prepare to detokenize ids that follow ``prompt_ids``.

        ``use_decode_stream=False`` forces the built-in algorithm and ``fast_path=False`` turns
        off the byte-level lookup (mainly for tests).
        """
        self._tokenizer = tokenizer
        self._backend = tokenizer._backend
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._chunks: list[str] = []
        self._text_cache: str | None = ""
        # The context is a few prompt ids before the output, split where its last complete
        # character ends: ids after that belong to a character the output will complete.
        context, complete = self._pick_context(prompt_ids)
        self._context = context
        self._context_text = tokenizer._decode_raw(context[:complete], skip_special_tokens)
        self._stream: Any = None
        if use_decode_stream and tokenizer._backend is not None and complete == len(context):
            self._stream = self._new_decode_stream()
        # Window-decode state, used when _stream is None: window[:read_offset] were already
        # emitted (or are prompt) and decode to prefix_text; the whole window is decoded each
        # step.
        self._window = list(context)
        self._read_offset = complete
        self._prefix_text = self._context_text
        # Fast mode (byte-level decoders): at a character boundary, an id whose bytes are
        # complete text on their own adds exactly that text, so step_one looks it up instead of
        # decoding. An id that is part of a character hands over to the decoder, which starts
        # afresh (a byte-level decode needs no context at a boundary); the next delta it emits
        # ends on a character again, and fast mode resumes.
        self._simple: list[str | None] | None = None
        # A context decoding to a trailing U+FFFD may end inside a character: no fast mode.
        if (
            fast_path
            and complete == len(context)
            and not self._context_text.endswith(_REPLACEMENT_CHAR)
        ):
            self._simple = tokenizer.simple_token_texts(skip_special_tokens)
        self._fast = self._simple is not None

    def _ends_on_char_boundary(self, ids: Sequence[int], pos: int) -> bool:
        """Whether the text of ``ids[:pos]`` ends on a complete character, looking back a bit.

        Decodes ever longer runs of ids before ``pos``: one that starts on a character and
        decodes to text without a trailing U+FFFD proves it (a character is at most 4 byte
        tokens, special tokens in between may decode to nothing, hence _CHAR_LOOKBACK).
        """
        seen_text = False
        for k in range(1, min(_CHAR_LOOKBACK, pos) + 1):
            piece = [int(i) for i in ids[pos - k : pos]]
            text = self._tokenizer._decode_raw(piece, self._skip)
            if text:
                if not text.endswith(_REPLACEMENT_CHAR):
                    return True
                seen_text = True
        return not seen_text

    def _pick_context(self, prompt_ids: Sequence[int]) -> tuple[list[int], int]:
        """The last few prompt ids, and how many of them end on a complete character.

        The context starts on a character boundary: byte-level decoders would only put a
        harmless U+FFFD first otherwise, but ByteFallback turns the whole run of byte tokens
        into U+FFFD, complete characters after the cut included.
        """
        n = len(prompt_ids)
        start = max(0, n - _PROMPT_CONTEXT_TOKENS)
        for _ in range(_CHAR_LOOKBACK):
            if start == 0 or self._ends_on_char_boundary(prompt_ids, start):
                break
            start -= 1
        context = [int(i) for i in prompt_ids[start:]]
        complete = len(context)
        while complete > 0 and not self._ends_on_char_boundary(context, complete):
            complete -= 1
            if len(context) - complete == _CHAR_LOOKBACK:
                # No boundary in reach, so not an unfinished character but invalid UTF-8:
                # treat it all as prompt.
                return context, len(context)
        return context, complete

    def _new_decode_stream(self) -> Any:
        if not self._context:
            return DecodeStream(skip_special_tokens=self._skip)
        try:
            return DecodeStream(ids=list(self._context), skip_special_tokens=self._skip)
        except TypeError:
            # tokenizers < 0.22 cannot prime a stream: use the window decode instead.
            return None

    @property
    def text(self) -> str:
        """All text emitted so far."""
        if self._text_cache is None:
            self._text_cache = "".join(self._chunks)
            self._chunks = [self._text_cache]
        return self._text_cache

    @property
    def token_ids(self) -> list[int]:
        """All ids passed to :meth:`step` so far (a copy)."""
        return list(self._ids)

    def step(self, token_ids: Sequence[int]) -> str:
        """Append ``token_ids`` and return the text they complete (may be ``""``)."""
        parts = []
        for token_id in token_ids:
            piece = self.step_one(int(token_id))
            if piece:
                parts.append(piece)
        return "".join(parts)

    def step_one(self, token_id: int) -> str:
        """Append one id (an ``int``) and return the text it completes: ``step([token_id])``
        without the list, for the engine's per-token path."""
        if self._fast:
            simple = self._simple
            piece = simple[token_id] if 0 <= token_id < len(simple) else ""  # type: ignore[index]
            if piece is not None:
                self._ids.append(token_id)
                if piece:
                    self._chunks.append(piece)
                    self._text_cache = None
                return piece
            self._fast = False
            if self._ids:
                self._restart_decoder()
        self._ids.append(token_id)
        stream = self._stream
        if stream is None:
            piece = self._window_step(token_id)
        else:
            try:
                piece = stream.step(self._backend, token_id)
            except Exception:
                # As in _step_one: DecodeStream gave up; resynchronize the window decode.
                self._stream = None
                piece = self._resync()
        if not piece:
            return ""
        self._chunks.append(piece)
        self._text_cache = None
        # An emitted delta never ends inside a character, so lookups are exact again.
        self._fast = self._simple is not None
        return piece

    def _restart_decoder(self) -> None:
        """Leave fast mode at a character boundary: the decoder restarts with no context."""
        if self._stream is not None:
            self._stream = DecodeStream(skip_special_tokens=self._skip)
        else:
            self._window = []
            self._read_offset = 0
            self._prefix_text = ""

    def _step_one(self, token_id: int) -> str:
        if self._stream is not None:
            try:
                piece = self._stream.step(self._tokenizer._backend, token_id)
            except Exception:
                # DecodeStream gives up ("invalid prefix") when a decoder rewrites text it
                # already produced. Resynchronize the window decode and carry on with it.
                self._stream = None
                return self._resync()
            return piece or ""
        return self._window_step(token_id)

    def _resync(self) -> str:
        # Restart the window at the context, with everything emitted so far as its prefix.
        # A read offset of 0 keeps the first slide from cutting where DecodeStream may have
        # been holding part of a character.
        self._window = self._context + self._ids
        self._read_offset = 0
        self._prefix_text = self._context_text + "".join(self._chunks)
        return self._window_emit()

    def _window_step(self, token_id: int) -> str:
        self._window.append(token_id)
        return self._window_emit()

    def _window_emit(self) -> str:
        window = self._window
        decode = self._tokenizer._decode_raw
        new_text = decode(window, self._skip)
        if new_text.endswith(_REPLACEMENT_CHAR):
            return ""
        prefix_text = self._prefix_text
        if new_text.startswith(prefix_text):
            delta = new_text[len(prefix_text) :]
            if not delta:
                return ""
            # Slide the window: the ids just emitted become the prefix that gives the next
            # ids their context. The cut is at a character boundary, since the text up to
            # read_offset ended on a complete character when it was emitted.
            del window[: self._read_offset]
            self._prefix_text = decode(window, self._skip)
        else:
            # Only after a resync, or with invalid UTF-8 in the prompt context: the text
            # before this id changed. Emit from where it differs (a character it completed
            # belongs to the output) and keep the whole window, as the old read offset may
            # be inside a character.
            delta = new_text[_common_prefix_len(new_text, prefix_text) :]
            if not delta:
                return ""
            self._prefix_text = new_text
        self._read_offset = len(window)
        return delta

    def flush(self) -> str:
        """Return text still held back at the end of generation (an incomplete character).

        Normally ``""``; if the ids end inside a multi-byte character this returns the U+FFFD
        a full decode would show.
        """
        full = self._tokenizer._decode_raw(self._context + self._ids, self._skip)
        emitted = self._context_text + self.text
        if len(full) <= len(emitted) or not full.startswith(emitted):
            return ""
        delta = full[len(emitted) :]
        self._chunks.append(delta)
        self._text_cache = None
        return delta


class StopStringMatcher:
    """Finds stop strings in a stream of text deltas, holding back possible stop prefixes.

    The stop that ends first in the text wins; among stops ending at the same position the
    longest (earliest-starting) one wins. Ending first rather than starting first is what
    generation that halts as soon as any stop string appears produces, and it makes the
    result independent of how the text is split into deltas.

    Matching runs an Aho-Corasick automaton over the deltas, so :meth:`feed` costs
    O(len(delta) + max stop length) whatever the length of the text so far.
    """

    def __init__(self, stop: Sequence[str], include_stop_str_in_output: bool = False) -> None:
        """Match any string of ``stop``; ``include_stop_str_in_output`` emits the stop too."""
        if isinstance(stop, str):
            raise TypeError("stop must be a sequence of strings, not a single str")
        stops = list(stop)
        for i, s in enumerate(stops):
            if not isinstance(s, str):
                raise TypeError(f"stop[{i}] must be a str, got {type(s).__name__}")
            if not s:
                raise ValueError(f"stop[{i}] is an empty string; stop strings must be non-empty")
        self._stops = stops
        self._include = include_stop_str_in_output
        self._build(stops)
        self._state = 0
        self._held = ""
        self._matched: str | None = None
        self._stopped = False
        self._flushed = False

    def _build(self, stops: list[str]) -> None:
        # Trie: goto[n] maps a char to a child; depth[n] is the length of the prefix n spells.
        goto: list[dict[str, int]] = [{}]
        depth = [0]
        # Index into stops of the pattern spelled by a node, or -1.
        terminal = [-1]
        for k, s in enumerate(stops):
            node = 0
            for ch in s:
                nxt = goto[node].get(ch)
                if nxt is None:
                    nxt = len(goto)
                    goto[node][ch] = nxt
                    goto.append({})
                    depth.append(depth[node] + 1)
                    terminal.append(-1)
                node = nxt
            if terminal[node] < 0:
                terminal[node] = k
        # Failure links (longest proper suffix that is also a trie node) in BFS order, and
        # for each node the longest stop string that is a suffix of it.
        fail = [0] * len(goto)
        best = list(terminal)
        queue = list(goto[0].values())
        head = 0
        while head < len(queue):
            node = queue[head]
            head += 1
            if best[node] < 0:
                best[node] = best[fail[node]]
            for ch, child in goto[node].items():
                f = fail[node]
                while f and ch not in goto[f]:
                    f = fail[f]
                fail[child] = goto[f].get(ch, 0) if node else 0
                queue.append(child)
        self._goto = goto
        self._fail = fail
        self._depth = depth
        self._best = best

    @property
    def matched(self) -> str | None:
        """The stop string that ended the text, or None."""
        return self._matched

    @property
    def stopped(self) -> bool:
        """Whether a stop string has matched."""
        return self._stopped

    def feed(self, delta: str) -> tuple[str, bool]:
        """Add ``delta``; return (text safe to emit now, whether a stop string matched).

        Once a stop matched, the text before it (and the stop itself with
        ``include_stop_str_in_output``) is returned with ``True``; later calls return
        ``("", True)``.
        """
        if self._stopped:
            return "", True
        if self._flushed:
            raise RuntimeError("StopStringMatcher.feed() called after flush()")
        goto, fail, best = self._goto, self._fail, self._best
        held = self._held
        node = self._state
        for i, ch in enumerate(delta):
            while True:
                nxt = goto[node].get(ch)
                if nxt is not None:
                    node = nxt
                    break
                if node == 0:
                    break
                node = fail[node]
            k = best[node]
            if k >= 0:
                stop = self._stops[k]
                buf = held + delta[: i + 1]
                end = len(buf) if self._include else len(buf) - len(stop)
                self._stopped = True
                self._matched = stop
                self._held = ""
                self._state = 0
                return buf[:end], True
        self._state = node
        buf = held + delta
        # The automaton state is the longest suffix that may still grow into a stop string.
        keep = self._depth[node]
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        """Release held-back text at the end of generation (when no stop string matched)."""
        self._flushed = True
        held, self._held = self._held, ""
        self._state = 0
        return "" if self._stopped else held
