"""The explicit forward context passed to a model: no module-level state."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from graphrt.kernels.attention_backend import AttentionBackend


@dataclass
class ForwardBatch:
    """Device tensors for one forward over ``T`` tokens of ``B`` sequences.

    ``kv_locs[t]`` is the flat KV-cache row (``page * page_size + offset``) where token ``t``'s
    K and V are written. ``logits_rows[b]`` is the index in ``[0, T)`` of the token whose next-token
    distribution sequence ``b`` samples from (its last new token); None when every token is
    sampled, in order (a decode step: one token per sequence), so the forward gathers nothing.
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    kv_locs: torch.Tensor
    logits_rows: torch.Tensor | None
    attn_backend: AttentionBackend
    attn_meta: Any
