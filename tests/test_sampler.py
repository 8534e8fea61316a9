"""The graph-safe sampler on CPU: each parameter, logprobs, seeded noise, where results go.

Draws are a pure function of (seed, position, token id), so the statistical tests here are
deterministic: many rows at distinct positions give many independent-looking draws, and the
tolerances are loose compared with the sampling error (about 4 standard deviations).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from graphrt.sampling import (
    EVERYTHING,
    GREEDY,
    SampleOutputs,
    SamplerFlags,
    SlotSamplingState,
    apply_penalties,
    gumbel_noise,
    sample,
)
from graphrt.step_plan import SlotInit

CPU = torch.device("cpu")
FULL = SamplerFlags(full=True)
FILTERS = SamplerFlags(full=True, filters=True)
NUM_SLOTS = 5


def _init(slot: int, **kw: object) -> SlotInit:
    base = SlotInit(
        slot=slot,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        min_p=0.0,
        repetition_penalty=1.0,
        presence_penalty=0.0,
        frequency_penalty=0.0,
        seed=1000 + slot,
        min_pos=0,
        banned_ids=(),
        penalty_prompt_ids=None,
        penalty_output_ids=None,
    )
    return replace(base, **kw)


def _state(*inits: SlotInit, vocab: int) -> SlotSamplingState:
    state = SlotSamplingState(NUM_SLOTS, vocab, CPU)
    state.write(list(inits))
    return state


def _sample(
    state: SlotSamplingState,
    logits: torch.Tensor,
    slots: list[int],
    positions: list[int],
    flags: SamplerFlags = EVERYTHING,
    out_slots: list[int] | None = None,
    token_buf: torch.Tensor | None = None,
    k: int = 3,
) -> SampleOutputs:
    rows = logits.shape[0]
    out = SampleOutputs.allocate(rows, k, CPU)
    if token_buf is None:
        token_buf = torch.full((NUM_SLOTS,), -1, dtype=torch.int64)
    sample(
        logits.clone(),
        torch.tensor(slots, dtype=torch.int64),
        torch.tensor(slots if out_slots is None else out_slots, dtype=torch.int64),
        torch.tensor(positions, dtype=torch.int64),
        state,
        token_buf,
        flags,
        out,
    )
    return out


def _draws(init: SlotInit, logits: torch.Tensor, n: int, flags: SamplerFlags) -> torch.Tensor:
    """``n`` draws from one row's distribution: the same row at ``n`` positions."""
    state = _state(init, vocab=logits.shape[0])
    rows = logits[None, :].expand(n, -1).contiguous()
    return _sample(state, rows, [init.slot] * n, list(range(n)), flags).ids


def _freqs(ids: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.bincount(ids, minlength=vocab).to(torch.float32) / ids.numel()


# ---- greedy and temperature ----------------------------------------------------------------
def test_greedy_flags_give_argmax() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 50, generator=g)
    state = _state(*(_init(s, temperature=0.0) for s in range(1, 5)), vocab=50)
    slots = [1 + i % 4 for i in range(16)]
    for flags in (GREEDY, FULL, EVERYTHING):
        out = _sample(state, logits, slots, list(range(16)), flags)
        assert torch.equal(out.ids, logits.argmax(-1)), flags


def test_greedy_row_stays_argmax_beside_sampled_rows() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(8, 40, generator=g)
    state = _state(_init(1, temperature=0.0), _init(2, temperature=5.0), vocab=40)
    out = _sample(state, logits, [1, 2] * 4, list(range(8)))
    assert torch.equal(out.ids[0::2], logits[0::2].argmax(-1))
    # The hot rows really sample: at T=5 over 40 tokens they rarely all hit the argmax.
    assert not torch.equal(out.ids[1::2], logits[1::2].argmax(-1))


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_frequencies_follow_tempered_softmax(temperature: float) -> None:
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    ids = _draws(_init(1, temperature=temperature), logits, 6000, FULL)
    want = torch.softmax(logits / temperature, -1)
    got = _freqs(ids, 6)
    assert (got - want).abs().max() < 0.025
    # Ignoring the temperature would give softmax(logits), far from both targets.
    assert (torch.softmax(logits, -1) - want).abs().max() > 0.1


def test_sampling_frequencies_follow_softmax_at_unit_temperature() -> None:
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(10, generator=g)
    ids = _draws(_init(1), logits, 6000, FULL)
    assert (_freqs(ids, 10) - torch.softmax(logits, -1)).abs().max() < 0.025


# ---- filters -------------------------------------------------------------------------------
def test_top_k_never_samples_outside_top_k() -> None:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(16, generator=g)
    top3 = set(logits.topk(3).indices.tolist())
    ids = _draws(_init(1, temperature=3.0, top_k=3), logits, 2000, FILTERS)
    assert set(ids.tolist()) == top3
    # Without top-k the same hot distribution reaches far beyond the top 3.
    free = _draws(_init(1, temperature=3.0), logits, 2000, FILTERS)
    assert len(set(free.tolist()) - top3) >= 8


def test_top_p_never_samples_outside_nucleus() -> None:
    probs = torch.tensor([0.5, 0.3, 0.1, 0.05, 0.03, 0.02])
    ids = _draws(_init(1, top_p=0.75), probs.log(), 4000, FILTERS)
    assert set(ids.tolist()) == {0, 1}
    # Inside the nucleus the mass is renormalised: 0.5/0.8 and 0.3/0.8.
    assert abs(_freqs(ids, 6)[0].item() - 0.625) < 0.03
    free = _draws(_init(1), probs.log(), 4000, FILTERS)
    assert set(free.tolist()) >= {2, 3, 4}


def test_min_p_never_samples_below_threshold() -> None:
    probs = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])
    # Threshold 0.3 * 0.4 = 0.12: tokens 3 and 4 go, token 2 (0.15) stays.
    ids = _draws(_init(1, min_p=0.3), probs.log(), 4000, FILTERS)
    assert set(ids.tolist()) == {0, 1, 2}
    free = _draws(_init(1), probs.log(), 4000, FILTERS)
    assert set(free.tolist()) == {0, 1, 2, 3, 4}


def test_top_p_applies_to_distribution_renormalised_after_top_k() -> None:
    probs = torch.tensor([0.3, 0.25, 0.2, 0.15, 0.1])
    # After top-k=2 the masses are 0.545 and 0.455; top_p=0.5 then keeps token 0 alone.
    # (On the unrenormalised distribution, 0.3 < 0.5 would keep token 1 too.)
    ids = _draws(_init(1, top_k=2, top_p=0.5), probs.log(), 1000, FILTERS)
    assert set(ids.tolist()) == {0}
    ids = _draws(_init(1, top_k=2), probs.log(), 1000, FILTERS)
    assert set(ids.tolist()) == {0, 1}


def test_filters_off_in_a_row_leave_its_draws_unchanged() -> None:
    # A row without filters samples the same whether or not the step sorts for other rows.
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(64, 20, generator=g)
    state = _state(_init(1, temperature=0.7), vocab=20)
    a = _sample(state, logits, [1] * 64, list(range(64)), FULL).ids
    b = _sample(state, logits, [1] * 64, list(range(64)), EVERYTHING).ids
    assert torch.equal(a, b)


# ---- penalties -----------------------------------------------------------------------------
def test_apply_penalties_matches_vllm_formulas() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, 1.0, -2.0]])
    init = _init(
        1,
        repetition_penalty=2.0,
        presence_penalty=0.5,
        frequency_penalty=0.25,
        penalty_prompt_ids=(0, 1),
        penalty_output_ids=(2, 2, 5),
    )
    state = _state(init, vocab=6)
    got = apply_penalties(logits, torch.tensor([1]), state)
    # Repetition (prompt and outputs): positive logits divided, negative ones multiplied.
    # Presence and frequency: outputs only, once and per occurrence.
    want = torch.tensor(
        [[2.0 / 2, -1.0 * 2, 0.5 / 2 - 0.5 - 2 * 0.25, 3.0, 1.0, -2.0 * 2 - 0.5 - 0.25]]
    )
    assert torch.allclose(got, want)


def test_repetition_penalty_prompt_tokens_change_greedy_choice() -> None:
    logits = torch.tensor([[2.0, 1.9, 0.0, -1.0]])
    for rep, want in ((1.0, 0), (1.2, 1)):
        init = _init(1, temperature=0.0, repetition_penalty=rep, penalty_prompt_ids=(0, 3))
        out = _sample(_state(init, vocab=4), logits, [1], [5], FULL)
        assert out.ids.item() == want, rep


def test_repetition_penalty_multiplies_negative_logits() -> None:
    logits = torch.tensor([[-1.0, -1.1, -5.0]])
    init = _init(1, temperature=0.0, repetition_penalty=1.2, penalty_prompt_ids=(0,))
    assert _sample(_state(init, vocab=3), logits, [1], [3], FULL).ids.item() == 1


def test_repetition_penalty_counts_output_tokens() -> None:
    logits = torch.tensor([[2.0, 1.9, 0.0, -1.0]])
    init = _init(
        1,
        temperature=0.0,
        repetition_penalty=1.2,
        penalty_prompt_ids=(3,),
        penalty_output_ids=(0,),
    )
    assert _sample(_state(init, vocab=4), logits, [1], [5], FULL).ids.item() == 1


def _greedy_run(init: SlotInit, logits: list[float], steps: int) -> list[int]:
    """Greedy tokens of one request over ``steps`` steps; its own samples feed the counts."""
    state = _state(init, vocab=len(logits))
    row = torch.tensor([logits])
    return [_sample(state, row, [1], [10 + i], FULL).ids.item() for i in range(steps)]


def test_presence_penalty_applies_once_per_seen_token() -> None:
    init = _init(1, temperature=0.0, presence_penalty=0.5, penalty_prompt_ids=(0,))
    # Token 0 is in the prompt, but presence counts outputs only, so it is still chosen first.
    assert _greedy_run(init, [1.0, 0.9, 0.8], 5) == [0, 1, 2, 0, 0]
    assert _greedy_run(replace(init, presence_penalty=0.0), [1.0, 0.9, 0.8], 5) == [0] * 5


def test_frequency_penalty_grows_with_each_occurrence() -> None:
    init = _init(1, temperature=0.0, frequency_penalty=0.15, penalty_prompt_ids=(0,))
    assert _greedy_run(init, [1.0, 0.9, 0.8], 5) == [0, 1, 0, 2, 1]
    assert _greedy_run(replace(init, frequency_penalty=0.0), [1.0, 0.9, 0.8], 5) == [0] * 5


def test_penalty_init_resets_counts_of_a_reused_slot() -> None:
    state = _state(_init(2), vocab=6)
    state.counts[2].fill_(9)
    state.prompt_mask[2].fill_(True)
    state.write([_init(2, penalty_prompt_ids=(3,), penalty_output_ids=(1, 1, 4))])
    assert state.counts[2].tolist() == [0, 2, 0, 0, 1, 0]
    assert state.prompt_mask[2].tolist() == [False, False, False, True, False, False]


def test_sampled_token_is_counted_at_out_slot_only() -> None:
    state = _state(_init(1), _init(2), vocab=6)
    buf = torch.full((NUM_SLOTS,), -5, dtype=torch.int64)
    logits = torch.tensor([[0.0, 0.0, 9.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 9.0, 0.0, 0.0]])
    # Row 1 is a non-final prefill chunk of slot 2: its token goes to the dummy slot 0.
    out = _sample(state, logits, [1, 2], [4, 4], FULL, out_slots=[1, 0], token_buf=buf)
    assert out.ids.tolist() == [2, 3]
    assert buf.tolist() == [3, 2, -5, -5, -5]
    assert state.counts[1].tolist() == [0, 0, 1, 0, 0, 0]
    assert state.counts[2].sum().item() == 0


def test_padding_rows_do_not_disturb_real_slots() -> None:
    state = _state(_init(1), _init(2), vocab=6)
    buf = torch.tensor([-1, 11, 22, 33, 44])
    before = state.counts.clone()
    logits = torch.zeros(3, 6)
    logits[:, 4] = 10.0
    # A captured decode bucket of 3 rows with one real request (slot 1) and two padding rows.
    out = _sample(state, logits, [1, 0, 0], [7, 0, 0], FULL, token_buf=buf)
    assert out.ids[0].item() == 4
    assert buf[1:].tolist() == [4, 22, 33, 44]
    assert torch.equal(state.counts[2:], before[2:])
    assert state.counts[1, 4].item() == 1


# ---- min_tokens ----------------------------------------------------------------------------
def test_min_tokens_bans_stop_ids_before_min_pos_only() -> None:
    logits = torch.tensor([[0.0, 0.0, 0.0, 5.0, 0.0, 4.0, 1.0, 0.0]])
    init = _init(1, temperature=0.0, banned_ids=(3, 5), min_pos=10)
    state = _state(init, vocab=8)
    assert _sample(state, logits, [1], [9], FULL).ids.item() == 6
    assert _sample(state, logits, [1], [10], FULL).ids.item() == 3
    assert _sample(state, logits, [1], [11], FULL).ids.item() == 3


def test_min_tokens_bans_hold_when_sampling() -> None:
    logits = torch.tensor([0.0, 0.0, 6.0, 0.0, 5.0])
    init = _init(1, banned_ids=(2, 4), min_pos=1000)
    state = _state(init, vocab=5)
    n = 1200
    ids = _sample(state, logits.expand(n, -1).contiguous(), [1] * n, list(range(n)), FILTERS).ids
    before, after = ids[:1000], ids[1000:]
    assert not (before == 2).any() and not (before == 4).any()
    assert (after == 2).float().mean() > 0.5


def test_min_tokens_padding_entries_do_not_ban_token_zero() -> None:
    # Unused ban entries are -1, clamped to index 0 for the scatter; they must leave it alone.
    logits = torch.tensor([[3.0, 0.0, 2.0, 0.0]])
    state = _state(_init(1, temperature=0.0, banned_ids=(2,), min_pos=10), vocab=4)
    assert _sample(state, logits, [1], [0], FULL).ids.item() == 0
    state = _state(_init(1, temperature=0.0, banned_ids=(0,), min_pos=10), vocab=4)
    assert _sample(state, logits, [1], [0], FULL).ids.item() == 2


# ---- logprobs ------------------------------------------------------------------------------
def test_logprobs_come_from_raw_logits_and_top_is_sorted() -> None:
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 30, generator=g) * 3
    init = _init(
        1,
        temperature=0.6,
        top_k=5,
        repetition_penalty=1.5,
        penalty_prompt_ids=(1, 2, 3),
        penalty_output_ids=(),
    )
    state = _state(init, _init(2, temperature=0.0), vocab=30)
    out = _sample(state, logits, [1, 2, 1, 2, 1, 2], list(range(6)), EVERYTHING, k=4)
    logp = logits.log_softmax(-1)
    assert torch.allclose(out.logprob, logp.gather(1, out.ids[:, None])[:, 0])
    assert torch.equal(out.top_ids, logp.topk(4).indices)
    assert torch.allclose(out.top_logprobs, logp.topk(4).values)
    assert (out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:]).all()
    assert torch.allclose(out.top_logprobs, logp.gather(1, out.top_ids))


# ---- seeds ---------------------------------------------------------------------------------
def _seeded_rows() -> tuple[SlotInit, torch.Tensor, list[int]]:
    g = torch.Generator().manual_seed(6)
    init = _init(1, seed=1234, temperature=0.8, top_p=0.95, top_k=20)
    return init, torch.randn(64, 32, generator=g), list(range(100, 164))


def test_seeded_sampling_is_reproducible() -> None:
    init, logits, pos = _seeded_rows()
    a = _sample(_state(init, vocab=32), logits, [1] * 64, pos, FILTERS).ids
    b = _sample(_state(init, vocab=32), logits, [1] * 64, pos, FILTERS).ids
    assert torch.equal(a, b)
    # Not trivially constant: 64 hot draws over 32 tokens hit many ids.
    assert len(set(a.tolist())) > 10


def test_seeded_sampling_is_batch_invariant() -> None:
    init, logits, pos = _seeded_rows()
    alone = _sample(_state(init, vocab=32), logits, [1] * 64, pos, FILTERS).ids
    # Same request in slot 3, interleaved with other requests' rows, with logprobs on.
    moved = replace(init, slot=3)
    others = [
        _init(2, temperature=0.0),
        _init(
            4, temperature=1.5, min_p=0.1, seed=99, repetition_penalty=1.3, penalty_prompt_ids=(1,)
        ),
    ]
    state = _state(moved, *others, vocab=32)
    g = torch.Generator().manual_seed(7)
    noise_rows = torch.randn(128, 32, generator=g)
    batch = torch.empty(192, 32)
    slots, positions = [], []
    for i in range(64):
        batch[3 * i] = noise_rows[2 * i]
        batch[3 * i + 1] = logits[i]
        batch[3 * i + 2] = noise_rows[2 * i + 1]
        slots += [2, 3, 4]
        positions += [i, pos[i], 7 * i]
    out = _sample(state, batch, slots, positions, EVERYTHING)
    assert torch.equal(out.ids[1::3], alone)


def test_different_seeds_differ() -> None:
    init, logits, pos = _seeded_rows()
    a = _sample(_state(init, vocab=32), logits, [1] * 64, pos, FILTERS).ids
    b = _sample(_state(replace(init, seed=1235), vocab=32), logits, [1] * 64, pos, FILTERS).ids
    assert (a != b).float().mean() > 0.3


def test_seed_is_used_modulo_2_64() -> None:
    state = _state(_init(1, seed=2**64 - 1), _init(2, seed=-1), vocab=8)
    assert state.seed[1].item() == state.seed[2].item() == -1


def test_gumbel_noise_is_finite_at_hash_extremes() -> None:
    # (seed 6, position 873) hashes token 2963 to the top 24-bit value. The sampler once turned
    # 24 bits into a float32 uniform, which rounded that value to exactly 1.0: noise +inf.
    noise = gumbel_noise(torch.tensor([6]), torch.tensor([873]), 4096)
    assert torch.isfinite(noise).all()


def test_filtered_token_never_wins_through_extreme_noise() -> None:
    logits = torch.zeros(1, 4096)
    logits[0, 0] = 1.0
    logits[0, 2963] = -20.0
    state = _state(_init(1, seed=6, top_k=1), vocab=4096)
    assert _sample(state, logits, [1], [873], FILTERS).ids.item() == 0


def test_gumbel_noise_statistics() -> None:
    seeds = torch.arange(64, dtype=torch.int64)
    noise = gumbel_noise(seeds, seeds * 3 + 1, 2048)
    assert torch.isfinite(noise).all()
    # Gumbel(0, 1): mean is the Euler-Mascheroni constant, variance pi^2 / 6.
    assert abs(noise.mean().item() - 0.5772) < 0.01
    assert abs(noise.var().item() - 1.6449) < 0.03
    # Independent of the vocabulary size: a token's noise depends only on its id.
    assert torch.equal(gumbel_noise(seeds, seeds * 3 + 1, 100), noise[:, :100])
