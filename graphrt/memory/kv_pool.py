"""The paged KV cache tensors.

Layout per layer: ``k[l]`` and ``v[l]`` of shape ``[num_pages, page_size, num_kv_heads,
head_dim]`` (flashinfer's "NHD" layout), in the model's dtype or, with
``kv_cache_dtype="fp8_e4m3"``, in ``float8_e4m3fn`` holding ``K / k_scale`` and ``V / v_scale``
(per-layer scales kept by the runner, see :func:`kv_cache_scales`).

A token at position ``p`` of a request lives in page ``page_table[slot, p // page_size]`` at
offset ``p % page_size``; flattened, that is location ``page * page_size + offset`` of the
``[num_pages * page_size, heads, dim]`` view.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVPoolSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    dtype: torch.dtype

    @property
    def bytes_per_page(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.page_size * self.num_kv_heads * self.head_dim * elem

    @property
    def bytes_per_token(self) -> int:
        return self.bytes_per_page // self.page_size


class KVPool:
    """Owns the K and V tensors of every layer. Sized once; never reallocated."""

    def __init__(self, spec: KVPoolSpec, num_pages: int, device: torch.device) -> None:
        self.spec = spec
        self.num_pages = num_pages
        shape = (num_pages, spec.page_size, spec.num_kv_heads, spec.head_dim)
        # Zero-filled so pages never written (the dummy page, padding) hold finite values.
        self.k = [
            torch.zeros(shape, dtype=spec.dtype, device=device) for _ in range(spec.num_layers)
        ]
        self.v = [
            torch.zeros(shape, dtype=spec.dtype, device=device) for _ in range(spec.num_layers)
        ]

    @property
    def nbytes(self) -> int:
        return self.num_pages * self.spec.bytes_per_page

    def flat_k(self, layer: int) -> torch.Tensor:
        """``[num_pages * page_size, heads, dim]`` view of layer ``layer``'s keys."""
        return self.k[layer].view(-1, self.spec.num_kv_heads, self.spec.head_dim)

    def flat_v(self, layer: int) -> torch.Tensor:
        return self.v[layer].view(-1, self.spec.num_kv_heads, self.spec.head_dim)


def kv_cache_scales(
    num_layers: int, device: torch.device, found: dict[int, tuple[float, float]] | None = None
) -> torch.Tensor:
    """Each layer's (K, V) scale for an FP8 cache, fp32 ``[num_layers, 2]`` on ``device``: the
    checkpoint's where it gives them (``found``: layer -> (k_scale, v_scale)), else 1.0, as vLLM
    does for checkpoints without scales (e4m3 covers +-448 at 1.0)."""
    scales = torch.ones(num_layers, 2, dtype=torch.float32)
    for layer, (k, v) in (found or {}).items():
        scales[layer, 0], scales[layer, 1] = k, v
    return scales.to(device)
