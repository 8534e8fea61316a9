"""The reference attention backend: plain torch, any device. Slow but obviously right."""

from __future__ import annotations

import torch

from graphrt.kernels.attention_backend import AttentionBackend, AttnInputs


def gather_kv(cache: torch.Tensor, page_rows: torch.Tensor, kv_len: int) -> torch.Tensor:
    """``cache``: ``[num_pages, page_size, H, D]``; returns ``[B, kv_len, H, D]`` for the first
    ``kv_len`` positions of each row's pages."""
    page_size = cache.shape[1]
    npages = -(-kv_len // page_size)
    pages = page_rows[:, :npages]
    return cache[pages].flatten(1, 2)[:, :kv_len]


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_rows: torch.Tensor,
    seq_lens: torch.Tensor,
    kv_len_bound: int,
    scale: float,
) -> torch.Tensor:
    """One query per row. ``q``: ``[B, Hq, D]``. Positions ``>= seq_lens[b]`` are masked."""
    bsz, hq, d = q.shape
    k = gather_kv(k_cache, page_rows, kv_len_bound).float()  # [B, L, Hkv, D]
    v = gather_kv(v_cache, page_rows, kv_len_bound).float()
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
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its whole cached context.

    Sequence ``b`` has ``n = cu_q[b+1] - cu_q[b]`` new tokens at positions
    ``[seq_lens[b] - n, seq_lens[b])``; token ``i`` attends to positions ``<= seq_lens[b] - n + i``.
    """
    out = torch.empty_like(q)
    hq, d = q.shape[1], q.shape[2]
    for b in range(len(seq_lens)):
        s, e, kv_len = cu_q[b], cu_q[b + 1], seq_lens[b]
        n = e - s
        if n == 0:
            continue
        k = gather_kv(k_cache, page_rows[b : b + 1], kv_len)[0].float()  # [L, Hkv, D]
        v = gather_kv(v_cache, page_rows[b : b + 1], kv_len)[0].float()
        hkv = k.shape[1]
        qg = q[s:e].float().view(n, hkv, hq // hkv, d)
        scores = torch.einsum("nhgd,lhd->hgnl", qg, k) * scale
        qpos = torch.arange(kv_len - n, kv_len, device=q.device)
        kpos = torch.arange(kv_len, device=q.device)
        mask = kpos[None, :] > qpos[:, None]
        scores = scores.masked_fill(mask, float("-inf"))
        probs = scores.softmax(dim=-1)
        o = torch.einsum("hgnl,lhd->nhgd", probs, v)
        out[s:e] = o.reshape(n, hq, d).to(q.dtype)
    return out


class TorchAttentionBackend(AttentionBackend):
    """Gathers pages into dense tensors and runs softmax attention in fp32."""

    name = "torch"

    def prepare_metadata(self, inputs: AttnInputs) -> AttnInputs:
        if not inputs.is_decode and (inputs.seq_lens_host is None or inputs.cu_q_host is None):
            raise ValueError("torch backend extend steps need host seq_lens and cu_q")
        return inputs

    def forward(self, q: torch.Tensor, layer: int, meta: AttnInputs) -> torch.Tensor:
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
            )
        return paged_extend_attention(
            q,
            k_cache,
            v_cache,
            meta.page_rows,
            meta.seq_lens_host.tolist(),
            meta.cu_q_host.tolist(),
            self.spec.scale,
        )
