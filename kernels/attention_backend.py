"""The attention backend interface and its registry.

A backend computes paged attention for one layer and writes nothing but its output: the K/V of
the step's new tokens are already in the cache (see ``rope_and_store_kv``). Backends differ in
how they prepare per-step metadata, so the interface has explicit capture hooks:

- ``prepare_metadata``: eager steps (prefill, mixed, batches above the largest graph);
- ``init_capture_graph``: allocate static metadata buffers once, for the largest bucket;
- ``prepare_for_capture``: metadata for capturing bucket ``bs``, pointing at those buffers;
- ``prepare_for_replay``: update those buffers in place before replaying bucket ``bs``;
- ``prepare_for_mixed``: metadata for a step of static shape that carries prefill tokens (the
  mixed graphs of ``capture.mixed_graph_runner``), from device tensors alone. Backends that can
  be captured that way set ``mixed_graphs = True``; the others run such steps eagerly on CUDA.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from graphrt.kernels.reference import is_fp8_cache


@dataclass(frozen=True)
class AttentionSpec:
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    max_pages_per_seq: int
    scale: float
    dtype: torch.dtype
    device: torch.device
    # Launch decode kernels with programmatic dependent launch (graphrt.kernels.pdl); backends
    # without PDL kernels ignore it.
    pdl: bool = False


@dataclass
class AttnInputs:
    """Per-step attention inputs shared by every backend.

    ``page_rows[b]`` lists the pages of sequence ``b`` (unused entries point at the dummy page).
    ``seq_lens[b]`` is its KV length after this step's tokens. Extend steps also give
    ``cu_q`` (``[B + 1]`` offsets of each sequence's new tokens in the flat token dim).
    ``kv_len_bound`` is a static upper bound on ``seq_lens`` (the page-table width when
    capturing a graph; the real maximum, rounded up to a page, for eager steps).
    Host copies are given when the step is planned on the host, for backends that plan there.
    """

    is_decode: bool
    seq_lens: torch.Tensor
    page_rows: torch.Tensor
    kv_len_bound: int
    cu_q: torch.Tensor | None = None
    max_q_len: int = 1
    seq_lens_host: np.ndarray | None = None
    cu_q_host: np.ndarray | None = None
    page_ids_host: list[list[int]] | None = None


class AttentionBackend(ABC):
    """Paged attention for every layer of one model."""

    name: str = "abstract"
    # prepare_for_mixed reads nothing from the host, so mixed steps can be captured.
    mixed_graphs: bool = False

    # Whether the backend reads e4m3 caches (kv_cache_dtype="fp8_e4m3").
    fp8_kv: bool = False

    def __init__(
        self,
        spec: AttentionSpec,
        k_caches: list[torch.Tensor],
        v_caches: list[torch.Tensor],
        kv_scales: torch.Tensor | None = None,
    ):
        """``kv_scales``: fp32 ``[num_layers, 2]``, each layer's (K, V) scale, for e4m3 caches
        (which hold ``K / k_scale`` and ``V / v_scale``); ignored for caches in the model's
        dtype."""
        self.spec = spec
        self.k_caches = k_caches
        self.v_caches = v_caches
        fp8 = bool(k_caches) and is_fp8_cache(k_caches[0])
        if fp8 and not self.fp8_kv:
            raise ValueError(
                f"the {self.name} attention backend cannot read an FP8 KV cache; "
                "use attention_backend='triton' (CUDA) or 'torch'"
            )
        if fp8 and (kv_scales is None or tuple(kv_scales.shape) != (len(k_caches), 2)):
            raise ValueError(f"an FP8 KV cache needs [{len(k_caches)}, 2] kv_scales")
        self.kv_scales = kv_scales if fp8 else None
        # One [2] view per layer, made once: eager forwards ask for them layer by layer.
        self._layer_scales = list(kv_scales.unbind(0)) if fp8 else [None] * len(k_caches)

    def kv_scale(self, layer: int) -> torch.Tensor | None:
        """Layer ``layer``'s ``[2]`` (K, V) cache scales, or None for a cache in the model's
        dtype."""
        return self._layer_scales[layer]

    @abstractmethod
    def prepare_metadata(self, inputs: AttnInputs) -> Any:
        """Metadata for one eager step."""

    def init_capture_graph(self, max_bs: int) -> None:  # noqa: B027 - optional hook
        """Allocate static buffers for decode graphs up to ``max_bs`` rows."""

    def prepare_for_capture(self, bs: int, inputs: AttnInputs) -> Any:
        """Metadata to capture decode bucket ``bs``; ``inputs`` views static buffers."""
        return self.prepare_metadata(inputs)

    def prepare_for_replay(  # noqa: B027 - optional hook
        self, bs: int, seq_lens_host: np.ndarray, slots_host: np.ndarray
    ) -> None:
        """Refresh the static metadata of bucket ``bs`` in place before a replay, from the
        padded host rows of the step. Must not allocate device memory."""

    def prepare_for_mixed(self, inputs: AttnInputs, capture: bool) -> Any:
        """Metadata for a step of ``T`` tokens in ``R`` rows of static shape: ``inputs.cu_q``
        (``[R + 1]``), ``seq_lens`` and ``page_rows`` are device tensors, padding rows feed no
        token, and ``kv_len_bound`` is the page-table width. Rows may feed one token (decode)
        or a prefill chunk. ``capture``: buffers must be the static ones of
        ``init_capture_graph``. Must not read device values on the host when ``mixed_graphs``."""
        raise NotImplementedError(f"the {self.name} backend has no static mixed steps")

    @abstractmethod
    def forward(self, q: torch.Tensor, layer: int, meta: Any) -> torch.Tensor:
        """``q``: ``[T, Hq, D]`` (rotated). Returns ``[T, Hq, D]``."""


_BACKENDS = {
    "torch": ("graphrt.kernels.torch_attention", "TorchAttentionBackend"),
    "triton": ("graphrt.kernels.triton_attention", "TritonAttentionBackend"),
    "flashinfer": ("graphrt.kernels.flashinfer_attention", "FlashInferAttentionBackend"),
}


def get_backend_class(name: str) -> type[AttentionBackend]:
    """Import a backend lazily by name; unknown names list the known ones."""
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {list(_BACKENDS)}")
    module, cls = _BACKENDS[name]
    return getattr(importlib.import_module(module), cls)
