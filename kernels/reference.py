"""Torch reference implementations of graphrt's fused ops.

These define what every faster kernel must compute. They also run the CPU path. Each one
follows Hugging Face transformers' numerics (fp32 norm math, rotary in the activation dtype),
so the CPU engine matches HF within fp32 rounding.
"""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * x / rms(x)``, computed in fp32 and cast back, as HF's LlamaRMSNorm."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(rms_norm(x + residual), x + residual)``: the pre-norm residual stream."""
    summed = x + residual
    return rms_norm(summed, weight, eps), summed


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias``: every linear layer of a model."""
    return torch.nn.functional.linear(x, weight, bias)


def add_rms_norm_linear(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A pre-norm and the projection that reads it: ``(linear(h, weight, bias), s)`` with
    ``h, s = fused_add_rms_norm(x, residual, norm_weight, eps)``. With ``residual`` None (a
    model's first layer) ``h = rms_norm(x)`` and ``s`` is ``x``."""
    h, summed = _pre_norm(x, residual, norm_weight, eps)
    return linear(h, weight, bias), summed


def _pre_norm(
    x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    # (normed, new residual): fused_add_rms_norm, or rms_norm with x itself as the residual.
    if residual is None:
        return rms_norm(x, norm_weight, eps), x
    return fused_add_rms_norm(x, residual, norm_weight, eps)


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ (weight * scale[:, None]).T + bias`` for an fp8 ``weight`` ``[N, K]`` with fp32
    per-output-channel ``scale`` ``[N]``: dequantized to ``x``'s dtype (the product formed in
    fp32, rounded once), then an ordinary matmul. Activations are not quantized here; a W8A8
    kernel's dynamic per-token activation scales are its own business and must stay close."""
    w = (weight.float() * scale.float()[:, None]).to(x.dtype)
    return torch.nn.functional.linear(x, w, bias)


def fp8_add_rms_norm_linear(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`add_rms_norm_linear` over an fp8 weight and its row scales (:func:`fp8_linear`)."""
    h, summed = _pre_norm(x, residual, norm_weight, eps)
    return fp8_linear(h, weight, scale, bias), summed


def fp8_silu_mul_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The down projection over fp8 weights on the gate/up output:
    ``fp8_linear(silu_and_mul(x), weight, scale)``."""
    return fp8_linear(silu_and_mul(x), weight, scale)


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (per-token) e4m3 quantization of activations ``x`` ``[M, K]`` for W8A8:
    ``(q, scale)`` with ``scale = amax(|row|) / 448`` (fp32, ``[M, 1]``; a zero row gets
    ``1e-12 / 448``) and ``q = x * (1 / scale)`` in ``float8_e4m3fn``, all in fp32: the scales of
    ``graphrt.models.fp8.quantize_fp8`` for weights, applied to rows of activations (whose
    values divide; the two differ by one e4m3 step in a few values)."""
    x32 = x.float()
    amax = x32.abs().amax(dim=1, keepdim=True).clamp(min=1e-12)
    # Divided by a tensor, not the Python scalar 448: on CUDA torch turns division by a scalar
    # into a multiply by its reciprocal, one rounding off IEEE division in some rows (H100).
    scale = amax / torch.full_like(amax, 448.0)
    # Multiplied by the scale's reciprocal, not divided by it, as vLLM's per-token quantizer
    # does: the kernels run one IEEE division a row instead of one an element.
    q = (x32 * (torch.ones_like(scale) / scale)).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return q, scale


def fp8_w8a8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """What a W8A8 kernel computes: ``x`` quantized per row (:func:`quantize_rows_fp8`), then
    ``(xq * xs) @ (weight * scale[:, None]).T + bias`` in fp32, rounded once to ``x``'s dtype.
    Differs from :func:`fp8_linear` by the activations' e4m3 rounding (about 2.5% relative
    error on random inputs)."""
    xq, xs = quantize_rows_fp8(x)
    w = weight.float() * scale.float()[:, None]
    out = (xq.float() * xs) @ w.T
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def argmax(logits: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy sampling: the index of each row's largest logit (the lowest one on ties); with
    ``masks``, the largest allowed one (:func:`apply_token_bitmask`)."""
    if masks is not None:
        logits = apply_token_bitmask(logits, masks)
    return logits.argmax(dim=-1)


def apply_token_bitmask(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``logits`` ``[B, V]`` with the tokens that ``masks`` forbids set to -inf: row ``b``
    allows token ``t`` where bit ``t % 32`` of ``masks[b, t // 32]`` (int32 ``[B, >= V/32]``,
    xgrammar's layout) is set. Graph-safe: no host synchronisation, no value-dependent shapes."""
    b, v = logits.shape
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = ((masks[:, :, None] >> shifts) & 1).to(torch.bool).reshape(b, -1)[:, :v]
    return logits.masked_fill(~allowed, float("-inf"))


def scatter_page_updates(page_table: torch.Tensor, updates: torch.Tensor) -> None:
    """``page_table[updates[0, i], updates[1, i]] = updates[2, i]`` (in place) for every column
    ``i`` whose slot is not negative.

    Capturable (no data-dependent shapes): an empty column rewrites ``page_table[0, 0]`` with
    the value it already holds (row 0 is the dummy slot, which no request's write targets).
    """
    u = updates
    valid = u[0] >= 0
    flat = page_table.view(-1)
    idx = torch.where(valid, u[0] * page_table.stride(0) + u[1], 0)
    val = torch.where(valid, u[2].to(page_table.dtype), flat[0])
    flat.index_put_((idx,), val)


def load_step_inputs(
    ring: torch.Tensor,
    pos: torch.Tensor,
    inputs: torch.Tensor,
    page_table: torch.Tensor,
    n: int,
    updates_row: int,
) -> None:
    """``inputs[:, :n] = ring[pos % R, :n, :].T`` (ring slots are column-major), then the
    page-table writes held in rows ``updates_row`` to ``updates_row + 2`` of those columns (see
    ``scatter_page_updates``). Capturable: the ring slot is chosen on the device, from ``pos``."""
    if n == 0:
        return
    inputs[:, :n].copy_(ring[:, :n].index_select(0, pos % ring.shape[0])[0].T)
    scatter_page_updates(page_table, inputs[updates_row : updates_row + 3, :n])


def store_step_ids(ids: torch.Tensor, ring_ids: torch.Tensor, pos: torch.Tensor) -> None:
    """``ring_ids[pos % R, :n] = ids``, ``ring_ids[pos % R, -1] = pos``, then ``pos += 1``.
    Capturable."""
    slot = pos % ring_ids.shape[0]
    ring_ids[:, : ids.shape[0]].index_copy_(0, slot, ids[None])
    ring_ids[:, -1].index_copy_(0, slot, pos)
    pos.add_(1)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[..., :d]) * x[..., d:]`` for the fused gate/up projection output."""
    d = x.shape[-1] // 2
    return torch.nn.functional.silu(x[..., :d]) * x[..., d:]


def silu_mul_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The MLP's down projection on its gate/up output: ``linear(silu_and_mul(x), weight)``."""
    return linear(silu_and_mul(x), weight)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style rotary embedding.

    ``q``: ``[T, Hq, D]``, ``k``: ``[T, Hkv, D]``, ``positions``: ``[T]``, ``cos_sin``:
    ``[max_pos, D]`` fp32 holding ``cos`` in the first half and ``sin`` in the second half of the
    last dim (each ``D/2`` wide). Returns new tensors in the input dtype.
    """
    half = cos_sin.shape[-1] // 2
    cs = cos_sin.index_select(0, positions)
    cos = torch.cat((cs[:, :half], cs[:, :half]), dim=-1).to(q.dtype)[:, None, :]
    sin = torch.cat((cs[:, half:], cs[:, half:]), dim=-1).to(q.dtype)[:, None, :]
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


KV_FP8_DTYPE = torch.float8_e4m3fn
_E4M3_MAX = float(torch.finfo(KV_FP8_DTYPE).max)  # 448


def is_fp8_cache(cache: torch.Tensor) -> bool:
    """Whether a KV cache tensor holds e4m3 values (``kv_cache_dtype="fp8_e4m3"``)."""
    return cache.dtype == KV_FP8_DTYPE


def check_kv_scale(cache: torch.Tensor, kv_scale: torch.Tensor | None) -> bool:
    """Whether ``cache`` is e4m3, refusing an e4m3 cache given no scales (every kernel that
    writes or reads one checks here)."""
    fp8 = is_fp8_cache(cache)
    if fp8 and kv_scale is None:
        raise ValueError("an FP8 KV cache needs the layer's kv_scale")
    return fp8


def quantize_kv(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x / scale`` in fp32, clamped to e4m3's range (the cast does not saturate) and rounded
    to e4m3: what an FP8 cache stores for ``x``, whose dequantized value is ``q * scale``."""
    return (x.float() / scale).clamp(-_E4M3_MAX, _E4M3_MAX).to(KV_FP8_DTYPE)


def dequantize_kv(cache: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """A cache tensor (or a gather of one) as fp32 values: e4m3 times its scale, or as is."""
    if is_fp8_cache(cache):
        return cache.float() * scale
    return cache.float()


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache_flat: torch.Tensor,
    v_cache_flat: torch.Tensor,
    locs: torch.Tensor,
    kv_scale: torch.Tensor | None = None,
) -> None:
    """Write ``k``, ``v`` (``[T, Hkv, D]``) into flat cache rows ``locs`` (``[T]``). An FP8
    cache stores ``k / kv_scale[0]`` and ``v / kv_scale[1]`` in e4m3 (:func:`quantize_kv`)."""
    if check_kv_scale(k_cache_flat, kv_scale):
        # As bytes: CPU torch has no float8 index_copy_.
        k_cache_flat.view(torch.uint8).index_copy_(
            0, locs, quantize_kv(k, kv_scale[0]).view(torch.uint8)
        )
        v_cache_flat.view(torch.uint8).index_copy_(
            0, locs, quantize_kv(v, kv_scale[1]).view(torch.uint8)
        )
        return
    k_cache_flat.index_copy_(0, locs, k.to(k_cache_flat.dtype))
    v_cache_flat.index_copy_(0, locs, v.to(v_cache_flat.dtype))


def rope_and_store_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    k_cache_flat: torch.Tensor,
    v_cache_flat: torch.Tensor,
    locs: torch.Tensor,
    kv_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary on ``q`` and ``k``, then the write of ``k`` and ``v`` into their pages
    (:func:`store_kv`).

    Returns the rotated ``(q, k)``.
    """
    q, k = apply_rope(q, k, positions, cos_sin)
    store_kv(k, v, k_cache_flat, v_cache_flat, locs, kv_scale)
    return q, k
