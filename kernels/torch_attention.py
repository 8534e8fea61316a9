"""The reference attention backend: plain torch, any device. Slow but obviously right."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from graphrt.kernels.attention_backend import AttentionBackend, AttnInputs
from graphrt.kernels.reference import dequantize_kv, is_fp8_cache


def gather_kv(cache: torch.Tensor, page_rows: torch.Tensor, kv_len: int) -> torch.Tensor:
    """``cache``: ``[num_pages, page_size, H, D]``; returns ``[B, kv_len, H, D]`` for the first
    ``kv_len`` positions of each row's pages."""
    page_size = cache.shape[1]
    npages = -(-kv_len // page_size)
    pages = page_rows[:, :npages]
    if is_fp8_cache(cache):  # as bytes: CPU torch cannot index float8 tensors
        return cache.view(torch.uint8)[pages].flatten(1, 2)[:, :kv_len].view(cache.dtype)
    return cache[pages].flatten(1, 2)[:, :kv_len]


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_rows: torch.Tensor,
    seq_lens: torch.Tensor,
    kv_len_bound: int,
    scale: float,
    kv_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query per row. ``q``: ``[B, Hq, D]``. Positions ``>= seq_lens[b]`` are masked.
    e4m3 caches are dequantized with ``kv_scale`` (``[2]``: K's, V's)."""
    bsz, hq, d = q.shape
    ks, vs = (None, None) if kv_scale is None else kv_scale
    k = dequantize_kv(gather_kv(k_cache, page_rows, kv_len_bound), ks)  # [B, L, Hkv, D]
    v = dequantize_kv(gather_kv(v_cache, page_rows, kv_len_bound), vs)
    hkv = k.shape[2]
    qg = q.float().view(bsz, hkv, hq // hkv, d)
    scores = torch.einsum("bhgd,blhd->bhgl", qg, k) * scale
    pos = torch.arange(k.shape[1], device=q.device)
    mask = pos[None, :] >= seq_lens[:, None].long()  # [B, L]
    scores = scores.masked_fill(mask[:, None, None, :], float("-inf"))
    probs = scores.softmax(dim=-1)
    out = torch.einsum("bhgl,blhd->bhgd", probs, v)
    return out.reshape(bsz, hq, d).to(q.dtype)


def paged_extend_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_rows: torch.Tensor,
    seq_lens: list[int],
    cu_q: list[int],
    scale: float,
    kv_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its whole cached context.

    Sequence ``b`` has ``n = cu_q[b+1] - cu_q[b]`` new tokens at positions
    ``[seq_lens[b] - n, seq_lens[b])``; token ``i`` attends to positions ``<= seq_lens[b] - n + i``.
    """
    # All sequences at once, padded to the longest chunk and the longest context: one gather
    # and two einsums instead of a Python loop of them (this is the CPU engine's hot path).
    dev = q.device
    hq, d = q.shape[1], q.shape[2]
    lens = torch.tensor(seq_lens, dtype=torch.int64)
    cu = torch.tensor(cu_q, dtype=torch.int64)
    n = cu[1:] - cu[:-1]
    b, max_q, max_kv = len(seq_lens), int(n.max()), int(lens.max())
    row = torch.repeat_interleave(torch.arange(b), n)
    col = torch.arange(q.shape[0]) - cu[:-1][row]
    row, col = row.to(dev), col.to(dev)
    qp = q.new_zeros(b, max_q, hq, d)
    qp[row, col] = q
    ks, vs = (None, None) if kv_scale is None else kv_scale
    k = dequantize_kv(gather_kv(k_cache, page_rows, max_kv), ks)  # [B, L, Hkv, D]
    v = dequantize_kv(gather_kv(v_cache, page_rows, max_kv), vs)
    hkv = k.shape[2]
    qg = qp.float().view(b, max_q, hkv, hq // hkv, d)
    scores = torch.einsum("bnhgd,blhd->bhgnl", qg, k) * scale
    # Query i of sequence b sits at position lens[b] - n[b] + i; padding queries reuse the last
    # real position so their rows stay finite (they are dropped below).
    i = torch.arange(max_q)[None, :]
    qpos = (lens - n)[:, None] + torch.minimum(i, (n - 1)[:, None])
    kpos = torch.arange(max_kv)
    mask = kpos[None, None, :] > qpos[:, :, None]  # [B, Q, L]
    scores = scores.masked_fill(mask.to(dev)[:, None, None], float("-inf"))
    o = torch.einsum("bhgnl,blhd->bnhgd", scores.softmax(dim=-1), v)
    return o.reshape(b, max_q, hq, d)[row, col].to(q.dtype)


@dataclass
class TorchMixedMeta:
    """A static-shape mixed step: its first ``num_tokens`` tokens are real, in the rows of
    ``inputs`` (the rest is bucket padding)."""

    inputs: AttnInputs
    num_tokens: int


class TorchAttentionBackend(AttentionBackend):
    """Gathers pages into dense tensors and runs softmax attention in fp32. Its mixed steps
    read their lengths on the host, so they run through the mixed step function but are not
    captured (``mixed_graphs`` is False)."""

    name = "torch"
    fp8_kv = True

    def prepare_for_mixed(self, inputs: AttnInputs, capture: bool) -> TorchMixedMeta:
        if capture:
            raise RuntimeError("the torch backend's mixed steps cannot be captured")
        cu = inputs.cu_q.cpu().numpy().astype(np.int64)
        lens = inputs.seq_lens.cpu().numpy().astype(np.int64)
        q_lens = np.diff(cu)
        rows = int(np.count_nonzero(q_lens))  # padding rows feed no token and come last
        host = AttnInputs(
            is_decode=False,
            seq_lens=inputs.seq_lens[:rows],
            page_rows=inputs.page_rows[:rows],
            kv_len_bound=inputs.kv_len_bound,
            cu_q=inputs.cu_q[: rows + 1],
            max_q_len=int(q_lens.max()),
            seq_lens_host=lens[:rows],
            cu_q_host=cu[: rows + 1],
        )
        return TorchMixedMeta(host, int(cu[rows]))

    def prepare_metadata(self, inputs: AttnInputs) -> AttnInputs:
        if not inputs.is_decode and (inputs.seq_lens_host is None or inputs.cu_q_host is None):
            raise ValueError("torch backend extend steps need host seq_lens and cu_q")
        return inputs

    def forward(
        self, q: torch.Tensor, layer: int, meta: AttnInputs | TorchMixedMeta
    ) -> torch.Tensor:
        if isinstance(meta, TorchMixedMeta):
            out = torch.zeros_like(q)
            out[: meta.num_tokens] = self.forward(q[: meta.num_tokens], layer, meta.inputs)
            return out
        k_cache, v_cache = self.k_caches[layer], self.v_caches[layer]
        if meta.is_decode:
            return paged_decode_attention(
                q,
                k_cache,
                v_cache,
                meta.page_rows,
                meta.seq_lens,
                meta.kv_len_bound,
                self.spec.scale,
                self.kv_scale(layer),
            )
        return paged_extend_attention(
            q,
            k_cache,
            v_cache,
            meta.page_rows,
            meta.seq_lens_host.tolist(),
            meta.cu_q_host.tolist(),
            self.spec.scale,
            self.kv_scale(layer),
        )
