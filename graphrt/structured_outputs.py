"""Structured outputs: grammars compiled off the step loop, and the token masks they give.

A request with ``SamplingParams.structured_outputs`` gets a grammar (xgrammar) compiled from its
JSON schema, regex, EBNF grammar or choice list. Compilation runs in a small thread pool, cached
by the constraint (equal schemas compile once), with a time limit; the request waits for it
outside the scheduler, so it holds up no other request. Each completion then owns a matcher:
before a step samples its next token, the matcher fills that row of the step's allowed-token
bitmask (int32 words, bit ``j`` of word ``i`` allows token ``32 i + j``); after the step, the
sampled token advances it.

The mask of step n+1 depends on the token of step n, so a step with constrained rows is
planned one step ahead as usual but launched only after the step before it has been taken (see
``Engine._launch_next``). Steps without constrained rows pay nothing.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from graphrt.errors import RequestRejected
from graphrt.sampling_params import StructuredOutputsParams

# Workers that compile grammars, and how long one compilation may take.
COMPILE_THREADS = 2
# Compiled grammars kept for reuse (a server sees many distinct schemas).
MAX_CACHED_GRAMMARS = 256
# Threads that advance a step's grammars and fill its masks (xgrammar's batched calls) when
# EngineConfig.grammar_threads is 0 ("auto"): one, up to PARALLEL_MIN_ROWS constrained rows,
# then half the host's cores, up to 8. Both are on a split step's critical path. A mask row
# costs a few us, so below a few hundred rows waking threads costs more than it saves (on the
# 2-core VM, 64 rows on 2 threads took 2-3x as long as on one); vLLM fills serially up to 128
# rows for the same reason.
PARALLEL_MIN_ROWS = 128
MASK_THREADS = max(1, min(8, (os.cpu_count() or 1) // 2))
COMPILE_TIMEOUT_S = 30.0
# Whitespace characters allowed in a row between JSON tokens with json_whitespace="flexible":
# enough for any indentation a model is taught, and a sampled (temperature > 0) output cannot
# spend its tokens on blanks. The cap makes xgrammar's masks costlier to fill, the more so the
# larger it is (on the VM, 64 rows of an integer array: 25 us a row against 3 us with "fixed").
MAX_JSON_WHITESPACE = 32


def bitmask_words(vocab_size: int) -> int:
    """int32 words per row of a token bitmask over ``vocab_size`` tokens."""
    return (vocab_size + 31) // 32


class GrammarMatcherState:
    """One completion's grammar: the compiled grammar's future until it is ready, then a
    matcher that follows the completion's tokens."""

    __slots__ = ("deadline", "future", "matcher")

    def __init__(self, future: concurrent.futures.Future, deadline: float) -> None:
        self.future = future
        self.deadline = deadline
        self.matcher: Any = None

    def accept(self, token: int) -> bool:
        """Advance past ``token``; False if the grammar does not allow it."""
        return bool(self.matcher.accept_token(token))

    @property
    def terminated(self) -> bool:
        """The grammar has ended: its output is complete (and its stop token taken)."""
        return bool(self.matcher.is_terminated())


class StructuredOutputs:
    """The engine's grammar service: the tokenizer's vocabulary as xgrammar sees it, a compile
    pool with a cache and a time limit, and batched mask filling.

    Built on the first constrained request, so engines that never see one pay nothing. Reading
    the vocabulary (0.2 s for 49k tokens, more for larger ones) happens in the compile pool, with
    the first compilation, not on the step thread.
    """

    def __init__(
        self,
        hf_tokenizer: Any,
        vocab_size: int,
        stop_token_ids: Iterable[int],
        compile_timeout_s: float = COMPILE_TIMEOUT_S,
        threads: int = COMPILE_THREADS,
        max_cached: int = MAX_CACHED_GRAMMARS,
        mask_threads: int = 0,
        json_whitespace: str = "fixed",
    ) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        self.vocab_size = vocab_size
        self.words = bitmask_words(vocab_size)
        # xgrammar sees only the ids the tokenizer has. A model's vocabulary is often padded
        # past its tokenizer's (a 49,152-token tokenizer on a 128,256-row lm_head in our
        # benchmark); xgrammar counts each padding id as a special token, and its
        # accept_token grows with their number: 17 us against 2.7 us a token on the VM for
        # 79,104 of them. Padding ids are never allowed: ``fill`` writes zeros there.
        # Stop ids past the tokenizer (a model config's EOS that this tokenizer lacks) are
        # left out, unless none is left: a finished grammar must have a stop it can take.
        stop_token_ids = sorted(set(stop_token_ids))
        n_tok = len(hf_tokenizer)
        if stop_token_ids and not any(t < n_tok for t in stop_token_ids):
            n_tok = stop_token_ids[-1] + 1
        self._xgr_vocab = min(vocab_size, n_tok) if n_tok > 0 else vocab_size
        self._xgr_words = bitmask_words(self._xgr_vocab)
        self._scratch = np.empty((0, self._xgr_words), dtype=np.int32)
        stops = [t for t in stop_token_ids if t < self._xgr_vocab]
        self._tokenizer = (hf_tokenizer, stops, threads)
        self._compiler: Any = None  # made by the first compilation (``_compiler_for_pool``)
        self._compiler_lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, "graphrt-grammar")
        # Compiled grammars by constraint, least recently used first: concurrent requests with
        # one schema wait on one compilation. Called from the engine's thread only.
        self._futures: dict[StructuredOutputsParams, concurrent.futures.Future] = {}
        self._max_cached = max_cached
        # grammar_threads N > 0: N threads for every batch (1: all on the caller's thread).
        self.mask_threads = mask_threads or MASK_THREADS
        self._parallel_min_rows = PARALLEL_MIN_ROWS if mask_threads == 0 else 4
        # "fixed": one line, separators ", " and ": "; finite by construction, like flexible's
        # cap, so a sampled row cannot loop on whitespace either.
        self._json_args: dict[str, Any] = (
            {"any_whitespace": False}
            if json_whitespace == "fixed"
            else {"max_whitespace_cnt": MAX_JSON_WHITESPACE}
        )
        self._batch1 = xgr.BatchGrammarMatcher(max_threads=1)
        self._batch = xgr.BatchGrammarMatcher(max_threads=self.mask_threads)
        self.compile_timeout_s = compile_timeout_s

    # ---- compilation ----------------------------------------------------------------------
    def start(self, so: StructuredOutputsParams) -> concurrent.futures.Future:
        """The compiled grammar of ``so``, compiling in the pool or already compiled. On a
        cache miss the constraint is parsed here, on the caller's thread (fast: no vocabulary
        work), so a malformed or unsupported schema, regex or grammar raises
        ``RequestRejected`` naming it before anything of the request exists."""
        fut = self._futures.pop(so, None)
        if fut is None or (fut.done() and fut.exception() is not None):
            fut = self._pool.submit(self._compile, self._parse(so))
        self._futures[so] = fut  # most recently used last
        if len(self._futures) > self._max_cached:
            for key in [k for k, f in self._futures.items() if f.done()]:
                if len(self._futures) <= self._max_cached:
                    break
                del self._futures[key]
        return fut

    def matcher_state(self, compiled: concurrent.futures.Future) -> GrammarMatcherState:
        """A completion's grammar state, waiting for ``compiled`` within the time limit."""
        return GrammarMatcherState(compiled, time.monotonic() + self.compile_timeout_s)

    def _parse(self, so: StructuredOutputsParams) -> Any:
        xgr = self._xgr
        try:
            if so.json is not None or so.json_object:
                schema = so.json if so.json is not None else '{"type": "object"}'
                return xgr.Grammar.from_json_schema(schema, **self._json_args)
            if so.regex is not None:
                return xgr.Grammar.from_regex(so.regex)
            if so.grammar is not None:
                return xgr.Grammar.from_ebnf(so.grammar)
            # One alternative per choice, each a JSON string literal in EBNF.
            return xgr.Grammar.from_ebnf("root ::= " + " | ".join(map(json.dumps, so.choice)))
        except Exception as e:  # xgrammar raises RuntimeError/ValueError subclasses
            raise RequestRejected(
                f"structured_outputs.{so.kind} is not supported or not valid: {_first_line(e)}",
                param="structured_outputs",
            ) from None

    def _compiler_for_pool(self) -> Any:
        with self._compiler_lock:
            if self._compiler is None:
                tok, stops, threads = self._tokenizer
                info = self._xgr.TokenizerInfo.from_huggingface(
                    tok, vocab_size=self._xgr_vocab, stop_token_ids=stops
                )
                # Our futures are the cache; xgrammar's own would keep every grammar twice.
                self._compiler = self._xgr.GrammarCompiler(
                    info, max_threads=threads, cache_enabled=False
                )
            return self._compiler

    def _compile(self, grammar: Any) -> Any:
        return self._compiler_for_pool().compile_grammar(grammar)

    def poll(self, state: GrammarMatcherState) -> str | None:
        """Make ``state``'s matcher once its grammar is compiled. Returns None while it is
        not ready or once the matcher is made, or the error that ends the request."""
        if state.matcher is not None:
            return None
        if not state.future.done():
            if time.monotonic() > state.deadline:
                return f"grammar compilation took longer than {self.compile_timeout_s:g} s"
            return None
        err = state.future.exception()
        if err is not None:
            return f"grammar compilation failed: {_first_line(err)}"
        state.matcher = self._xgr.GrammarMatcher(state.future.result())
        return None

    # ---- masks ----------------------------------------------------------------------------
    def accept(self, states: Sequence[GrammarMatcherState], tokens: Sequence[int]) -> list[bool]:
        """Advance each of ``states`` past its token (xgrammar's batched accept on
        ``mask_threads`` threads where the batch is large enough, see ``PARALLEL_MIN_ROWS``);
        False where a grammar refuses it."""
        # Always one call into xgrammar, never one per row: each call gives up the GIL, and
        # taking it back from a thread busy in Python (the text side) takes up to the switch
        # interval, 5 ms. On the VM beside a spinning Python thread, 64 rows one by one took
        # 5 ms per row; one batched call 17 ms in all (1 ms alone).
        batch = self._batch if self._parallel(len(states)) else self._batch1
        vocab = self._xgr_vocab
        # A padding id (the masks never allow one): refused here, as xgrammar would raise.
        if vocab < self.vocab_size and any(t >= vocab for t in tokens):
            keep = [i for i, t in enumerate(tokens) if t < vocab]
            verdicts = [False] * len(tokens)
            if keep:
                ok = batch.batch_accept_token(
                    [states[i].matcher for i in keep], [tokens[i] for i in keep]
                )
                for i, v in zip(keep, ok, strict=True):
                    verdicts[i] = bool(v)
            return verdicts
        ok = batch.batch_accept_token([s.matcher for s in states], list(tokens))
        return [bool(x) for x in ok]

    def fill(self, states: Sequence[GrammarMatcherState | None], out: np.ndarray) -> list[int]:
        """Fill row ``r`` of ``out`` (int32 ``[len(states), words]``) with what ``states[r]``
        allows next; rows without a grammar allow every token. Returns the rows whose grammar
        allows nothing (their requests must end with an error)."""
        rows = [r for r, s in enumerate(states) if s is not None and s.matcher is not None]
        if len(rows) < len(states):  # only the rows xgrammar will not write
            free = np.ones(len(states), dtype=bool)
            free[rows] = False
            out[free] = -1
        if not rows:
            return []
        batch = self._batch if self._parallel(len(rows)) else self._batch1
        matchers = [states[r].matcher for r in rows]
        wx = self._xgr_words
        if wx == out.shape[1]:
            batch.batch_fill_next_token_bitmask(matchers, out, rows)
        else:  # a padded vocabulary: xgrammar writes contiguous rows of its own width
            if self._scratch.shape[0] < len(states):
                self._scratch = np.empty((len(states), wx), dtype=np.int32)
            batch.batch_fill_next_token_bitmask(matchers, self._scratch, rows)
            # Slices where every row is constrained (the usual batch): fancy indexing copies
            # twice.
            sel = slice(0, len(rows)) if len(rows) == len(states) else rows
            out[sel, :wx] = self._scratch[sel]
            out[sel, wx:] = 0
        # One pass over the masks (a row per call was 3x slower at 64 rows); the rows set to
        # all ones above are never empty.
        return np.flatnonzero(~out.any(axis=1)).tolist()

    def _parallel(self, rows: int) -> bool:
        return self.mask_threads > 1 and rows >= self._parallel_min_rows

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


# xgrammar's C++ errors start with "[hh:mm:ss] /path/file.cc:94: ": where, not what.
_CPP_PREFIX = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*")


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return _CPP_PREFIX.sub("", text.splitlines()[0])[:300]
