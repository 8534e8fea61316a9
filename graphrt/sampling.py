"""The graph-safe, sync-free sampler and the per-slot sampling state it reads.

Every request's sampling parameters live in slot-indexed device tensors, written once when the
request gets its slot. A step passes only the slots of its rows, so a captured graph gathers the
parameters itself and needs no per-step host copies of them.

Random draws are a pure function of (request seed, position of the sampled token, token id):
a 64-bit integer hash turned into Gumbel noise. So a seeded request samples the same tokens
alone or in any batch, eager or replayed, before or after preemption, and nothing in the step
consults a stateful generator (which a CUDA graph would freeze).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from graphrt.host_copy import to_device
from graphrt.kernels import reference
from graphrt.sampling_params import MIN_TEMPERATURE
from graphrt.step_plan import GREEDY_NEEDS, MAX_BANNED_IDS, SamplerNeeds, SlotInit, needs_of

_M1 = 0xBF58476D1CE4E5B9 - (1 << 64)  # splitmix64 multipliers, as signed int64
_M2 = 0x94D049BB133111EB - (1 << 64)
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)


# What a step's sampler must compute is the union of its rows' needs (``step_plan.SamplerNeeds``):
# ``full`` covers temperature, penalties and min_tokens bans; ``filters`` top-k/top-p/min-p
# (which need a sort); ``logprobs`` the log-softmax and its top entries.
SamplerFlags = SamplerNeeds
GREEDY = GREEDY_NEEDS
# Temperature, penalties and bans without the sort or the log-softmax: the OpenAI API's default
# (temperature 1, top_p 1) and most sampled traffic. A step of 64 rows over a 128k vocabulary
# spends far longer sorting than sampling, so it has its own graphs.
SAMPLED = needs_of(True, False, False)
EVERYTHING = needs_of(True, True, True)


@dataclass
class SampleOutputs:
    """Where a step's sampler writes: ids ``[B]``, and if asked, the sampled token's logprob
    ``[B]`` and the top ``K`` (ids, logprobs) ``[B, K]``. Static buffers when captured."""

    ids: torch.Tensor
    logprob: torch.Tensor
    top_ids: torch.Tensor
    top_logprobs: torch.Tensor

    @classmethod
    def allocate(cls, rows: int, k: int, device: torch.device) -> SampleOutputs:
        return cls(
            ids=torch.zeros(rows, dtype=torch.int64, device=device),
            logprob=torch.zeros(rows, dtype=torch.float32, device=device),
            top_ids=torch.zeros(rows, max(k, 1), dtype=torch.int64, device=device),
            top_logprobs=torch.zeros(rows, max(k, 1), dtype=torch.float32, device=device),
        )

    def narrow(self, rows: int) -> SampleOutputs:
        return SampleOutputs(
            self.ids[:rows], self.logprob[:rows], self.top_ids[:rows], self.top_logprobs[:rows]
        )


class SlotSamplingState:
    """Slot-indexed device tensors of sampling parameters and penalty counts."""

    def __init__(self, num_slots: int, vocab_size: int, device: torch.device) -> None:
        f32, i64 = torch.float32, torch.int64
        self.vocab_size = vocab_size
        self.temperature = torch.zeros(num_slots, dtype=f32, device=device)
        self.top_p = torch.ones(num_slots, dtype=f32, device=device)
        self.top_k = torch.zeros(num_slots, dtype=i64, device=device)
        self.min_p = torch.zeros(num_slots, dtype=f32, device=device)
        self.rep = torch.ones(num_slots, dtype=f32, device=device)
        self.pres = torch.zeros(num_slots, dtype=f32, device=device)
        self.freq = torch.zeros(num_slots, dtype=f32, device=device)
        self.seed = torch.zeros(num_slots, dtype=i64, device=device)
        self.min_pos = torch.zeros(num_slots, dtype=i64, device=device)
        self.banned = torch.full((num_slots, MAX_BANNED_IDS), -1, dtype=i64, device=device)
        self.counts = torch.zeros(num_slots, vocab_size, dtype=torch.int32, device=device)
        self.prompt_mask = torch.zeros(num_slots, vocab_size, dtype=torch.bool, device=device)

    def write(self, inits: list[SlotInit]) -> None:
        """Write newly admitted slots. Runs on the forward stream before the step that needs it;
        each field goes up in one pinned copy (``to_device``), so nothing waits for the GPU."""
        if not inits:
            return
        dev = self.temperature.device
        slots = to_device(np.array([i.slot for i in inits], dtype=np.int64), dev)
        floats = (
            ("temperature", "temperature"),
            ("top_p", "top_p"),
            ("min_p", "min_p"),
            ("repetition_penalty", "rep"),
            ("presence_penalty", "pres"),
            ("frequency_penalty", "freq"),
        )
        fvals = to_device(
            np.array([[getattr(i, name) for i in inits] for name, _ in floats], dtype=np.float32),
            dev,
        )
        for r, (_, attr) in enumerate(floats):
            getattr(self, attr).index_copy_(0, slots, fvals[r])
        ints = (("top_k", "top_k"), ("seed", "seed"), ("min_pos", "min_pos"))
        ivals = np.empty((len(ints) + MAX_BANNED_IDS, len(inits)), dtype=np.int64)
        for r, (name, _) in enumerate(ints):
            ivals[r] = [_to_i64(getattr(i, name)) for i in inits]
        banned = ivals[len(ints) :].T  # [len(inits), MAX_BANNED_IDS] view
        banned.fill(-1)
        for r, i in enumerate(inits):
            banned[r, : len(i.banned_ids)] = i.banned_ids
        ivals_d = to_device(ivals, dev)
        for r, (_, attr) in enumerate(ints):
            getattr(self, attr).index_copy_(0, slots, ivals_d[r])
        self.banned.index_copy_(0, slots, ivals_d[len(ints) :].T)
        for i in inits:
            if i.penalty_prompt_ids is None:
                continue
            self.prompt_mask[i.slot].zero_()
            self.counts[i.slot].zero_()
            p = to_device(np.asarray(i.penalty_prompt_ids, dtype=np.int64), dev)
            self.prompt_mask[i.slot].index_fill_(0, p, True)
            if i.penalty_output_ids:
                o = to_device(np.asarray(i.penalty_output_ids, dtype=np.int64), dev)
                self.counts[i.slot].index_add_(0, o, torch.ones_like(o, dtype=torch.int32))


def _to_i64(v: int) -> int:
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >= 1 << 63 else v


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix64(x: torch.Tensor) -> torch.Tensor:
    x = (x ^ _shr(x, 30)) * _M1
    x = (x ^ _shr(x, 27)) * _M2
    return x ^ _shr(x, 31)


def gumbel_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """``[B, vocab]`` fp32 Gumbel(0, 1) noise from (seed, position, token id), device-agnostic."""
    base = _mix64(seeds * _GOLDEN + positions)  # [B]
    ids = torch.arange(vocab, dtype=torch.int64, device=seeds.device)
    x = _mix64(base[:, None] + ids[None, :] * _GOLDEN)
    # 23 high bits -> uniform in (0, 1), never 0 or 1. Not 24: (2^24 - 1) + 0.5 needs 25
    # significant bits, rounds to 2^24 in fp32, and u == 1 made that token's noise +inf.
    u = (_shr(x, 41).to(torch.float32) + 0.5) * (1.0 / (1 << 23))
    return -torch.log(-torch.log(u))


def apply_penalties(
    logits: torch.Tensor, slots: torch.Tensor, state: SlotSamplingState
) -> torch.Tensor:
    """Repetition (prompt and output tokens), frequency and presence (output tokens) penalties,
    with vLLM's semantics."""
    counts = state.counts.index_select(0, slots)
    seen = state.prompt_mask.index_select(0, slots) | (counts > 0)
    rep = state.rep.index_select(0, slots)[:, None]
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalized, logits)
    countsf = counts.to(torch.float32)
    logits = logits - state.freq.index_select(0, slots)[:, None] * countsf
    return logits - state.pres.index_select(0, slots)[:, None] * (countsf > 0).to(torch.float32)


def ban_stop_ids(
    logits: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor, state: SlotSamplingState
) -> torch.Tensor:
    """Forbid EOS and stop ids while a request has fewer than ``min_tokens`` outputs."""
    banned = state.banned.index_select(0, slots)
    active = (banned >= 0) & (positions < state.min_pos.index_select(0, slots))[:, None]
    idx = banned.clamp(min=0)
    vals = torch.where(active, float("-inf"), logits.gather(1, idx))
    # amin keeps the original value for inactive (or padding) entries even when they collide
    # with an active one at the same index.
    return logits.scatter_reduce(1, idx, vals, reduce="amin", include_self=True)


def apply_filters(
    logits: torch.Tensor, slots: torch.Tensor, state: SlotSamplingState
) -> torch.Tensor:
    """min-p, then top-k, then top-p (on the distribution renormalised after top-k)."""
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    min_p = state.min_p.index_select(0, slots)[:, None]
    drop = probs < min_p * probs[:, :1]
    top_k = state.top_k.index_select(0, slots)
    k = torch.where(top_k > 0, top_k, vocab)[:, None]
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    drop |= ranks >= k
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    top_p = state.top_p.index_select(0, slots)[:, None]
    # Keep a token if the mass strictly before it is below top_p; the top token always stays.
    # Rows with top_p == 1 skip the test: fp32 cumsums can reach 1.0 before the tail ends.
    drop = ((probs.cumsum(dim=-1) - probs) >= top_p) & (top_p < 1.0)
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def sample(
    logits: torch.Tensor,
    slots: torch.Tensor,
    out_slots: torch.Tensor,
    positions: torch.Tensor,
    state: SlotSamplingState,
    token_buf: torch.Tensor,
    flags: SamplerFlags,
    out: SampleOutputs,
    argmax: Callable[..., torch.Tensor] = reference.argmax,
    token_masks: torch.Tensor | None = None,
    mask_logits: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = (
        reference.apply_token_bitmask
    ),
) -> None:
    """Sample one token per row and write it to ``out`` and to ``token_buf[out_slots]``.

    ``logits``: ``[B, V]`` in the model dtype, upcast to fp32 only for logprobs and the full
    sampler (greedy needs no copy); ``slots``: whose parameters each row uses; ``out_slots``:
    where each row's token goes (the dummy slot for rows that must not record one);
    ``positions``: the position the sampled token will occupy; ``argmax``: the greedy kernel
    (``Ops.argmax``); ``token_masks``: int32 ``[B, words]`` allowed-token bitmasks
    (``structured_outputs``), applied after penalties and bans and before temperature (by
    ``mask_logits``, ``Ops.apply_token_bitmask``), or inside the greedy argmax, so every row
    picks only allowed tokens while logprobs stay those of the model's raw distribution. No host
    synchronisation, no allocation that depends on values: safe to capture.
    """
    # One fp32 copy, shared by logprobs and the full sampler; greedy alone needs none.
    lf = logits.float() if flags.logprobs or flags.full else logits
    if flags.logprobs:
        logp = lf.log_softmax(dim=-1)
    if not flags.full:
        ids = argmax(logits, token_masks)
    else:
        work = apply_penalties(lf, slots, state)
        work = ban_stop_ids(work, slots, positions, state)
        if token_masks is not None:
            work = mask_logits(work, token_masks)
        greedy_ids = work.argmax(dim=-1)
        temp = state.temperature.index_select(0, slots)
        sampled = temp >= MIN_TEMPERATURE
        work = work / torch.where(sampled, temp, 1.0)[:, None]
        if flags.filters:
            work = apply_filters(work, slots, state)
        noise = gumbel_noise(state.seed.index_select(0, slots), positions, logits.shape[-1])
        ids = torch.where(sampled, (work + noise).argmax(dim=-1), greedy_ids)
        state.counts.index_put_(
            (out_slots, ids), torch.ones_like(ids, dtype=torch.int32), accumulate=True
        )
    out.ids.copy_(ids)
    token_buf.index_copy_(0, out_slots, ids)
    if flags.logprobs:
        out.logprob.copy_(logp.gather(1, ids[:, None])[:, 0])
        k = out.top_ids.shape[1]
        top = logp.topk(k, dim=-1)
        out.top_ids.copy_(top.indices)
        out.top_logprobs.copy_(top.values)
