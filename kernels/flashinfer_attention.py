"""The flashinfer attention backend: flashinfer's paged decode and prefill kernels.

flashinfer plans each step on the host (``plan()``: a split-KV schedule from the host page
counts) and runs from device metadata: ``indptr`` (page offsets per row), ``indices`` (the
pages) and ``last_page_len``. graphrt keeps its page table on the device, so the pages are
gathered there by a small Triton kernel (``gather_page_indices``) from each row's page-table
row and length; it also rewrites ``indptr`` and ``last_page_len`` from the device lengths, so
the device metadata is self-consistent even if a host plan were stale.

Decode graphs: one ``BatchDecodeWithPagedKVCacheWrapper(use_cuda_graph=True)`` per bucket,
with fixed-size metadata buffers. The gather kernel is captured into the graph, so before a
replay only the host part remains (``prepare_for_replay``): page counts and ``last_page_len``
from the padded host lengths (numpy, O(bs)), ``plan()`` (which copies ``indptr``,
``last_page_len`` and its schedule to the device) and one event record. The page indices never
cross PCIe.

flashinfer's ``plan()`` stages its schedule in a pinned host buffer owned by the wrapper and
copies it asynchronously. Re-planning before that copy has run would rewrite the schedule of
a step still queued, so each wrapper's previous plan is fenced by an event; in steady state the
event has long completed when the next plan starts.

flashinfer is optional (``pip install "graphrt[flashinfer]"``); only its attention kernels are
used, so a fresh machine JIT-compiles decode and prefill attention and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import triton
import triton.language as tl

from graphrt.kernels.attention_backend import AttentionBackend, AttentionSpec, AttnInputs

WORKSPACE_BYTES = 128 * 1024 * 1024  # flashinfer's recommended split-KV float workspace


@triton.jit
def _gather_page_indices_kernel(
    page_rows_ptr,
    stride_pr,
    seq_lens_ptr,
    indices_ptr,
    indptr_ptr,
    last_page_len_ptr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK: tl.constexpr,
    WRITE_META: tl.constexpr,
):
    b = tl.program_id(0)
    # Exclusive prefix sum of page counts, recomputed per row: bs is small, so one vector load
    # beats a separate scan launch.
    rows = tl.arange(0, BLOCK_B)
    lens = tl.load(seq_lens_ptr + rows, mask=rows < b, other=0)
    start = tl.sum((lens + PAGE_SIZE - 1) // PAGE_SIZE, axis=0)
    seq_len = tl.load(seq_lens_ptr + b)
    n_pages = (seq_len + PAGE_SIZE - 1) // PAGE_SIZE
    offs = tl.arange(0, BLOCK)
    src = page_rows_ptr + b.to(tl.int64) * stride_pr
    for j0 in range(0, n_pages, BLOCK):
        j = j0 + offs
        m = j < n_pages
        tl.store(indices_ptr + start + j, tl.load(src + j, mask=m), mask=m)
    if WRITE_META:
        tl.store(indptr_ptr + b + 1, start + n_pages)
        tl.store(last_page_len_ptr + b, seq_len - (n_pages - 1) * PAGE_SIZE)
        if b == 0:
            tl.store(indptr_ptr, 0)


def gather_page_indices(
    page_rows: torch.Tensor,
    seq_lens: torch.Tensor,
    page_size: int,
    indices: torch.Tensor,
    indptr: torch.Tensor | None = None,
    last_page_len: torch.Tensor | None = None,
) -> None:
    """Write row ``b``'s first ``ceil(seq_lens[b] / page_size)`` pages of ``page_rows[b]`` to
    ``indices`` back to back (flashinfer's ragged layout), and, if given, ``indptr`` (``[B+1]``)
    and ``last_page_len`` (``[B]``). Reads lengths on the device only: graph safe."""
    bsz = seq_lens.shape[0]
    if bsz == 0:
        return
    write_meta = indptr is not None and last_page_len is not None
    _gather_page_indices_kernel[(bsz,)](
        page_rows, page_rows.stride(0), seq_lens, indices,
        indptr if write_meta else indices, last_page_len if write_meta else indices,
        PAGE_SIZE=page_size, BLOCK_B=triton.next_power_of_2(bsz), BLOCK=128,
        WRITE_META=write_meta, num_warps=1,
    )  # fmt: skip


def host_page_metadata(seq_lens: np.ndarray, page_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(indptr, last_page_len)`` as int32 arrays for host lengths."""
    pages = (seq_lens.astype(np.int64) + page_size - 1) // page_size
    indptr = np.zeros(len(seq_lens) + 1, dtype=np.int32)
    np.cumsum(pages, out=indptr[1:])
    last = (seq_lens - (pages - 1) * page_size).astype(np.int32)
    return indptr, last


@dataclass
class _GraphBucket:
    """Static state of one decode bucket: its wrapper, device metadata and pinned staging."""

    wrapper: Any
    indptr: torch.Tensor
    last_page_len: torch.Tensor
    indptr_host: torch.Tensor
    last_host: torch.Tensor
    planned: torch.cuda.Event | None = None


@dataclass
class FlashInferMeta:
    wrapper: Any


class FlashInferAttentionBackend(AttentionBackend):
    """flashinfer paged attention (NHD layout). Needs CUDA and ``flashinfer-python``."""

    name = "flashinfer"

    def __init__(
        self,
        spec: AttentionSpec,
        k_caches: list[torch.Tensor],
        v_caches: list[torch.Tensor],
        kv_scales: torch.Tensor | None = None,
    ) -> None:
        # Refuses an FP8 cache (fp8_kv is False): untested here, flashinfer is not on the H100.
        super().__init__(spec, k_caches, v_caches, kv_scales)
        try:
            import flashinfer
        except ImportError as e:
            raise ImportError(
                "the flashinfer attention backend needs flashinfer: "
                'pip install "graphrt[flashinfer]" (flashinfer-python)'
            ) from e
        if spec.device.type != "cuda":
            raise ValueError("the flashinfer attention backend needs a CUDA device")
        self._fi = flashinfer
        # flashinfer's CUDA-core decode kernel is compiled for these query groups only; other
        # GQA ratios (Qwen2.5-0.5B's 7) run its tensor-core (prefill-style) decode instead.
        group = spec.num_q_heads // spec.num_kv_heads
        self._decode_kwargs = {"use_tensor_cores": group not in (1, 2, 3, 4, 6, 8)}
        dev = spec.device
        # One float workspace for every wrapper: steps run one after another on one stream.
        self.workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=dev)
        self._prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD")
        self._decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, "NHD", **self._decode_kwargs
        )
        self._eager_planned: dict[str, torch.cuda.Event] = {}
        self._buckets: dict[int, _GraphBucket] = {}
        self._indices: torch.Tensor | None = None
        self._no_indices = torch.empty(0, dtype=torch.int32, device=dev)

    # ---- planning -------------------------------------------------------------------------
    def _plan_kwargs(self) -> dict[str, Any]:
        s = self.spec
        return dict(q_data_type=s.dtype, kv_data_type=s.dtype, sm_scale=s.scale)

    def _fence(self, event: torch.cuda.Event | None) -> torch.cuda.Event:
        # Wait until this wrapper's previous plan has been copied out of its pinned buffer.
        if event is not None:
            event.synchronize()
        return event or torch.cuda.Event()

    def _eager_indices(self, inputs: AttnInputs, indptr: np.ndarray) -> torch.Tensor:
        indices = torch.empty(int(indptr[-1]), dtype=torch.int32, device=self.spec.device)
        gather_page_indices(inputs.page_rows, inputs.seq_lens, self.spec.page_size, indices)
        return indices

    def prepare_metadata(self, inputs: AttnInputs) -> FlashInferMeta:
        s = self.spec
        if inputs.seq_lens_host is None:
            raise ValueError("flashinfer steps need host seq_lens (AttnInputs.seq_lens_host)")
        indptr, last = host_page_metadata(np.asarray(inputs.seq_lens_host), s.page_size)
        indices = self._eager_indices(inputs, indptr)
        kind = "decode" if inputs.is_decode else "prefill"
        event = self._fence(self._eager_planned.get(kind))
        if inputs.is_decode:
            wrapper = self._decode
            wrapper.plan(
                torch.from_numpy(indptr), indices, torch.from_numpy(last),
                s.num_q_heads, s.num_kv_heads, s.head_dim, s.page_size, **self._plan_kwargs(),
            )  # fmt: skip
        else:
            if inputs.cu_q_host is None:
                raise ValueError("flashinfer extend steps need host cu_q (AttnInputs.cu_q_host)")
            wrapper = self._prefill
            wrapper.plan(
                torch.from_numpy(np.asarray(inputs.cu_q_host, dtype=np.int32)),
                torch.from_numpy(indptr), indices, torch.from_numpy(last),
                s.num_q_heads, s.num_kv_heads, s.head_dim, s.page_size, causal=True,
                **self._plan_kwargs(),
            )  # fmt: skip
        event.record()
        self._eager_planned[kind] = event
        return FlashInferMeta(wrapper)

    # ---- graphs ---------------------------------------------------------------------------
    def init_capture_graph(self, max_bs: int) -> None:
        s = self.spec
        self._indices = torch.zeros(
            max(max_bs, 1) * s.max_pages_per_seq, dtype=torch.int32, device=s.device
        )

    def _bucket(self, bs: int) -> _GraphBucket:
        if self._indices is None:
            raise RuntimeError("init_capture_graph must run before prepare_for_capture")
        dev = self.spec.device
        indptr = torch.zeros(bs + 1, dtype=torch.int32, device=dev)
        last = torch.ones(bs, dtype=torch.int32, device=dev)
        wrapper = self._fi.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace,
            "NHD",
            use_cuda_graph=True,
            paged_kv_indptr_buffer=indptr,
            paged_kv_indices_buffer=self._indices,
            paged_kv_last_page_len_buffer=last,
            **self._decode_kwargs,
        )
        return _GraphBucket(
            wrapper,
            indptr,
            last,
            torch.zeros(bs + 1, dtype=torch.int32, pin_memory=True),
            torch.zeros(bs, dtype=torch.int32, pin_memory=True),
        )

    def _plan_bucket(self, st: _GraphBucket, seq_lens_host: np.ndarray) -> None:
        s = self.spec
        event = self._fence(st.planned)
        indptr, last = host_page_metadata(seq_lens_host, s.page_size)
        st.indptr_host.numpy()[:] = indptr
        st.last_host.numpy()[:] = last
        # The page indices are gathered inside the graph; plan() only needs their count.
        st.wrapper.plan(
            st.indptr_host, self._no_indices, st.last_host,
            s.num_q_heads, s.num_kv_heads, s.head_dim, s.page_size, **self._plan_kwargs(),
        )  # fmt: skip
        event.record()
        st.planned = event

    def prepare_for_capture(self, bs: int, inputs: AttnInputs) -> FlashInferMeta:
        st = self._buckets.get(bs)
        capturing = torch.cuda.is_current_stream_capturing()
        if st is None:
            if capturing:
                raise RuntimeError(f"decode bucket {bs} was not warmed up before capture")
            st = self._buckets[bs] = self._bucket(bs)
        if not capturing:
            # Warm-up, outside the graph: plan for the lengths now in the static inputs (a
            # sync, at start-up only). plan() must not run under capture: its copies would be
            # recorded into the graph.
            self._plan_bucket(st, inputs.seq_lens.cpu().numpy())
        gather_page_indices(
            inputs.page_rows,
            inputs.seq_lens,
            self.spec.page_size,
            self._indices,
            st.indptr,
            st.last_page_len,
        )
        return FlashInferMeta(st.wrapper)

    def prepare_for_replay(
        self, bs: int, seq_lens_host: np.ndarray, slots_host: np.ndarray
    ) -> None:
        self._plan_bucket(self._buckets[bs], np.asarray(seq_lens_host))

    def replan(self, bs: int) -> None:
        """flashinfer's ``plan()`` alone for bucket ``bs``, on the metadata of its last
        ``prepare_for_replay``: no fence, no metadata refresh. For benchmarks that split a
        replay's host cost into its parts (``benchmarks/kernel_bench.py``)."""
        st, s = self._buckets[bs], self.spec
        st.wrapper.plan(
            st.indptr_host, self._no_indices, st.last_host,
            s.num_q_heads, s.num_kv_heads, s.head_dim, s.page_size, **self._plan_kwargs(),
        )  # fmt: skip

    def forward(self, q: torch.Tensor, layer: int, meta: FlashInferMeta) -> torch.Tensor:
        if q.stride(-1) != 1 or q.stride(1) != q.shape[2]:
            q = q.contiguous()
        return meta.wrapper.run(q, (self.k_caches[layer], self.v_caches[layer]))
