"""Triton ops and attention backends against their torch references.

On CPU the Triton kernels run under ``TRITON_INTERPRET=1`` at tiny shapes (the variable is set
below, before any kernel is defined). On CUDA the same tests run compiled, and the ``gpu`` tests
add real shapes in bf16 (Llama-3.1-8B heads), graph capture, the flashinfer backend and
model-level greedy parity of the backends.

Every test draws fresh random inputs and poisons what the kernel writes (NaN outputs, caches,
partial-result buffers; large finite garbage in cache slots past each row's length, which the
references read but mask).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
import zlib

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from graphrt.kernels import reference
from graphrt.kernels import torch_attention as ta
from graphrt.kernels.attention_backend import (
    AttentionSpec,
    AttnInputs,
    get_backend_class,
)


def _kernel_modules():
    """Import the Triton modules, reloading any imported before the interpreter was enabled."""
    names = ["triton_ops", "triton_attention", "flashinfer_attention", "triton_gemv"]
    names += ["triton_argmax", "triton_step_io"]
    mods = []
    for n in names:
        full = f"graphrt.kernels.{n}"
        mod = sys.modules.get(full)
        mod = importlib.import_module(full) if mod is None else mod
        if os.environ.get("TRITON_INTERPRET") == "1":
            probe = {
                "triton_ops": "_rms_norm_kernel",
                "triton_attention": "_decode_kernel",
                "flashinfer_attention": "_gather_page_indices_kernel",
                "triton_gemv": "_gemv_kernel",
                "triton_argmax": "_argmax_chunk_kernel",
                "triton_step_io": "_load_inputs_kernel",
            }[n]
            if type(getattr(mod, probe)).__name__ != "InterpretedFunction":
                mod = importlib.reload(mod)
        mods.append(mod)
    return mods


T, A, FI, GEMV, AMAX, STEP_IO = _kernel_modules()

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
GARBAGE = 1e3


@pytest.fixture(autouse=True)
def _seed(request: pytest.FixtureRequest) -> None:
    # crc32, not hash(): str hashes change with every process (PYTHONHASHSEED), which made
    # each run draw different inputs.
    torch.manual_seed(zlib.crc32(request.node.name.encode()))


def _close(out: torch.Tensor, ref: torch.Tensor, atol: float, rtol: float) -> None:
    assert not out.isnan().any(), "output has unwritten (NaN) elements"
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)


def _tol(dtype: torch.dtype) -> tuple[float, float]:
    # bf16: a few ulps (rounding order differs, and the interpreter rounds bf16 differently).
    return (1e-5, 1e-5) if dtype == torch.float32 else (2e-2, 2e-2)


# ---- paged KV fixtures --------------------------------------------------------------------------


class Paged:
    """A poisoned paged cache holding ``seq_lens`` rows of random K/V in shuffled pages.

    Pages nobody owns are NaN; the dummy page 0 and the slots past each row's length in its
    last page hold large finite garbage (the torch reference reads them, masked)."""

    def __init__(
        self,
        seq_lens: list[int],
        hkv: int,
        dim: int,
        page_size: int,
        dtype: torch.dtype,
        width: int | None = None,
    ) -> None:
        counts = [-(-n // page_size) for n in seq_lens]
        total = sum(counts) + 1 + 3
        self.width = width or max(max(counts), 1) + 1
        shape = (total, page_size, hkv, dim)
        self.k = torch.full(shape, float("nan"), dtype=dtype, device=DEV)
        self.v = torch.full(shape, float("nan"), dtype=dtype, device=DEV)
        perm = (torch.randperm(total - 1) + 1).tolist()
        self.page_rows = torch.zeros(len(seq_lens), self.width, dtype=torch.int32, device=DEV)
        self.k[0] = GARBAGE
        self.v[0] = GARBAGE
        for b, (n, c) in enumerate(zip(seq_lens, counts)):
            pages = torch.tensor([perm.pop() for _ in range(c)], dtype=torch.long, device=DEV)
            self.page_rows[b, :c] = pages.to(torch.int32)
            for cache in (self.k, self.v):
                vals = torch.randn(c * page_size, hkv, dim, device=DEV)
                vals[n:] = GARBAGE
                cache[pages] = vals.view(c, page_size, hkv, dim).to(dtype)
        self.seq_lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEV)
        self.page_size = page_size


def _spec(hq: int, hkv: int, dim: int, page_size: int, width: int, dtype) -> AttentionSpec:
    return AttentionSpec(hq, hkv, dim, page_size, width, dim**-0.5, dtype, DEV)


# Triton 3.9's interpreter computes bf16 tl.dot wrongly (fp32 is right), so bf16 attention is
# checked compiled only.
needs_compiled_bf16_dot = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1", reason="interpreter's bf16 tl.dot is wrong"
)

SMALL_CFG = A.TritonAttentionConfig(decode_block_n=16, extend_block_m=16, extend_block_n=16)

# (q heads, kv heads): GQA ratios 1, 4 and 7.
GQA = [(2, 2), (8, 2), (7, 1)]


# ---- fused ops ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm(dtype) -> None:
    x = torch.randn(5, 96, device=DEV).to(dtype)
    w = (1 + 0.1 * torch.randn(96, device=DEV)).to(dtype)
    _close(T.rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6), *_tol(dtype))
    # A [T, H, D] view of a fused qkv (q/k norm of Qwen3): strided, not flattenable.
    qkv = torch.randn(4, 3 * 2 * 16 + 8, device=DEV).to(dtype)
    q = qkv[:, 8 : 8 + 3 * 16].view(4, 3, 16)
    wq = torch.randn(16, device=DEV).to(dtype)
    _close(T.rms_norm(q, wq, 1e-6), reference.rms_norm(q, wq, 1e-6), *_tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_add_rms_norm_in_place(dtype) -> None:
    x = torch.randn(6, 80, device=DEV).to(dtype)
    r = torch.randn(6, 80, device=DEV).to(dtype)
    w = torch.randn(80, device=DEV).to(dtype)
    ref_out, ref_res = reference.fused_add_rms_norm(x, r, w, 1e-6)
    xc, rc = x.clone(), r.clone()
    out, res = T.fused_add_rms_norm(xc, rc, w, 1e-6)
    assert out.data_ptr() == xc.data_ptr() and res.data_ptr() == rc.data_ptr()
    _close(out, ref_out, *_tol(dtype))
    _close(res, ref_res, *_tol(dtype))


def test_fused_add_rms_norm_strided_inputs_are_not_modified() -> None:
    big = torch.randn(6, 160, device=DEV)
    x = big[:, :80]  # not contiguous: a new output, and x untouched
    r = torch.randn(6, 80, device=DEV)
    w = torch.randn(80, device=DEV)
    x0, r0 = x.clone(), r.clone()
    ref_out, ref_res = reference.fused_add_rms_norm(x, r, w, 1e-6)
    out, res = T.fused_add_rms_norm(x, r, w, 1e-6)
    _close(out, ref_out, 1e-5, 1e-5)
    _close(res, ref_res, 1e-5, 1e-5)
    assert torch.equal(x, x0) and torch.equal(r, r0)


def test_norm_config_default_is_one_row_per_program() -> None:
    # Until the H100 sweep says otherwise (norm_config's docstring).
    for rows, n in ((1, 64), (256, 4096), (2048, 4096), (7, 80)):
        cfg = T.norm_config(rows, n)
        assert cfg == T.NormConfig(1, T._norm_warps(T._pow2(n)), False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("evict", [False, True])
@pytest.mark.parametrize("per", [1, 2, 4])
def test_fused_add_rms_norm_configs(per, evict, dtype) -> None:
    """Every launch config computes what the default one does, bit for bit: 7 rows (a masked
    tail for 2 and 4 rows per program), hidden 80 (not a power of 2), outputs poisoned and
    followed by poisoned rows that must stay unwritten, then both wrapper paths."""
    rows, n, eps = 7, 80, 1e-6
    cfg = T.NormConfig(per, 2, evict)
    x = torch.randn(rows, n, device=DEV).to(dtype)
    r = torch.randn(rows, n, device=DEV).to(dtype)
    w = (1 + 0.1 * torch.randn(n, device=DEV)).to(dtype)
    ref_out, ref_res = reference.fused_add_rms_norm(x, r, w, eps)
    base_out, base_res = T.fused_add_rms_norm(x.clone(), r.clone(), w, eps)  # the default

    out_buf = torch.full((rows + per, n), float("nan"), device=DEV, dtype=dtype)
    res_buf = out_buf.clone()
    T.launch_fused_add_rms_norm(x, r, w, out_buf[:rows], res_buf[:rows], eps, cfg, False)
    assert torch.equal(out_buf[:rows], base_out) and torch.equal(res_buf[:rows], base_res)
    assert out_buf[rows:].isnan().all() and res_buf[rows:].isnan().all()
    _close(out_buf[:rows], ref_out, *_tol(dtype))
    _close(res_buf[:rows], ref_res, *_tol(dtype))

    xc, rc = x.clone(), r.clone()  # in place: the results overwrite x and r
    out, res = T.fused_add_rms_norm(xc, rc, w, eps, cfg=cfg)
    assert out.data_ptr() == xc.data_ptr() and res.data_ptr() == rc.data_ptr()
    assert torch.equal(out, base_out) and torch.equal(res, base_res)

    xs = torch.cat([x, x], dim=1)[:, :n]  # not contiguous: new outputs, inputs untouched
    x0, r0 = xs.clone(), r.clone()
    out, res = T.fused_add_rms_norm(xs, r, w, eps, cfg=cfg)
    assert out.data_ptr() != xs.data_ptr() and res.data_ptr() != r.data_ptr()
    assert torch.equal(out, base_out) and torch.equal(res, base_res)
    assert torch.equal(xs, x0) and torch.equal(r, r0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul(dtype) -> None:
    for shape in [(5, 2 * 48), (2, 3, 2 * 40), (1, 2 * 1500)]:
        x = (2 * torch.randn(*shape, device=DEV)).to(dtype)
        _close(T.silu_and_mul(x), reference.silu_and_mul(x), *_tol(dtype))


# ---- page-table writes ---------------------------------------------------------------------------
@pytest.mark.parametrize("n", [0, 1, 5, 300])
def test_scatter_page_updates(n: int) -> None:
    """The reference writes exactly the first ``n`` (slot, column, page) columns of the last
    three rows of a wider input buffer; columns marked empty (slot -1) write nothing. (The
    Triton side of page writes is the ring's load kernel: ``test_step_io_ring``.)"""
    slots, cols, width = 40, 24, 320
    table = torch.randint(0, 1000, (slots, cols), dtype=torch.int32, device=DEV)
    buf = torch.full((6, width), -7, dtype=torch.int64, device=DEV)
    buf[3] = -1  # empty columns past n; their column and page rows hold garbage
    cells = torch.randperm((slots - 1) * cols, device=DEV)[:n] + cols  # distinct, not slot 0
    buf[3, :n] = cells // cols
    buf[4, :n] = cells % cols
    buf[5, :n] = torch.randint(0, 2**31 - 1, (n,), device=DEV)
    want = table.clone()
    want.view(-1)[cells] = buf[5, :n].to(torch.int32)
    ref = table.clone()
    reference.scatter_page_updates(ref, buf[3:])
    assert torch.equal(ref, want)


def _host_ring(t: torch.Tensor) -> torch.Tensor:
    """``t`` where the decode graphs keep their ring: on a GPU, a device view of pinned host
    memory (the kernels then read and write it over PCIe); on CPU, ``t`` itself."""
    if DEV.type != "cuda":
        return t
    from graphrt.host_copy import device_view

    return device_view(t.pin_memory(), DEV)


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize(("n", "pos"), [(1, 0), (5, 6), (300, 3), (320, 9)])
def test_step_io_ring(impl: str, n: int, pos: int) -> None:
    """A decode graph's first node copies ring slot ``pos % 4`` into the first ``n`` columns
    of its inputs and applies that slot's page writes; its last node writes the sampled ids
    into the same slot's ids row and advances ``pos``, so the next step uses the next slot."""
    mod = reference if impl == "reference" else STEP_IO
    slots, cols, width, ring_slots = 40, 24, 320, 4
    # Slots are column-major int32: ring[k, column, row].
    ring = torch.randint(-5, 1000, (ring_slots, width, 6), dtype=torch.int32)
    cells = torch.randperm((slots - 1) * cols)[:n] + cols  # distinct table cells, not slot 0
    k = pos % ring_slots
    ring[k, :, 3] = -1
    writes = n // 2  # page writes in every other column; the rest empty
    ring[k, : 2 * writes : 2, 3] = (cells[:writes] // cols).int()
    ring[k, : 2 * writes : 2, 4] = (cells[:writes] % cols).int()
    ring[k, : 2 * writes : 2, 5] = torch.randint(0, 2**31 - 1, (writes,), dtype=torch.int32)
    ring_dev = _host_ring(ring.clone())
    table = torch.randint(0, 1000, (slots, cols), dtype=torch.int32, device=DEV)
    inputs = torch.full((6, width), -7, dtype=torch.int64, device=DEV)
    p = torch.tensor([pos], dtype=torch.int64, device=DEV)
    want_table = table.clone()
    want_table.view(-1)[cells[:writes].to(DEV)] = ring[k, : 2 * writes : 2, 5].to(DEV)
    mod.load_step_inputs(ring_dev, p, inputs, table, n, 3)
    assert torch.equal(inputs[:, :n].cpu(), ring[k, :n].T.long())
    assert (inputs[:, n:] == -7).all()
    assert torch.equal(table, want_table)
    assert p.item() == pos  # the load does not advance the count
    ring_ids = _host_ring(torch.full((ring_slots, width + 1), -3, dtype=torch.int64))
    ids = [torch.randint(0, 50000, (n,), dtype=torch.int64, device=DEV) for _ in range(2)]
    for i in ids:
        mod.store_step_ids(i, ring_ids, p)
    got = ring_ids.cpu()
    for j, i in enumerate(ids):
        row = (pos + j) % ring_slots
        assert torch.equal(got[row, :n], i.cpu())
        assert (got[row, n:-1] == -3).all()
        assert got[row, -1] == pos + j  # the tag: the count of the step that wrote the row
    untouched = [r for r in range(ring_slots) if r not in {pos % 4, (pos + 1) % 4}]
    assert (got[untouched] == -3).all()
    assert p.item() == pos + 2


# ---- GEMV and argmax -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 2, 5, 8])
@pytest.mark.parametrize(("n", "k", "block_n", "block_k"), [(64, 128, 8, 32), (40, 56, 16, 32)])
def test_gemv(m, n, k, block_n, block_k, dtype) -> None:
    if m > 1 and dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("interpreter's bf16 tl.dot is wrong (the m > 1 path is a dot)")
    x = torch.randn(m, k, device=DEV).to(dtype)
    w = (torch.randn(n, k, device=DEV) / k**0.5).to(dtype)
    b = torch.randn(n, device=DEV).to(dtype)
    for bias in (None, b):
        cfg = GEMV.GemvConfig(block_n=block_n, block_k=block_k, num_warps=4, num_stages=2)
        out = GEMV.gemv(x, w, bias, cfg)
        _close(out, reference.linear(x, w, bias), *_tol(dtype))
    # A row-strided input (a view into a wider buffer) is read in place.
    wide = torch.randn(m, k + 8, device=DEV).to(dtype)
    cfg = GEMV.GemvConfig(block_n=block_n, block_k=block_k, num_warps=4, num_stages=2)
    _close(GEMV.gemv(wide[:, :k], w, None, cfg), reference.linear(wide[:, :k], w), *_tol(dtype))


def test_gemv_dispatch() -> None:
    """``linear`` uses the kernel for few rows and cuBLAS/torch beyond; both equal F.linear."""
    n, k = 512, 64
    w = torch.randn(n, k, device=DEV) / 8
    assert GEMV.gemv_config(1, n, k) is not None
    assert GEMV.gemv_config(GEMV.GEMV_MAX_ROWS + 1, n, k) is None
    assert GEMV.gemv_config(1, 64, k) is None  # too few columns for a full grid
    assert GEMV.gemv_config(1, 4096, 14336) is None  # long K: cuBLAS split-K ...
    assert GEMV.gemv_config(1, 4096, 14336, silu_mul=True) is not None  # ... unless fused
    assert GEMV.gemv_config(2, 4096, 14336, silu_mul=True) is None
    # Narrow outputs (Llama-3.2-1B): narrow programs, long K included.
    assert GEMV.gemv_config(1, 2048, 8192) == GEMV.GemvConfig(2, 1024, 4, 4)
    assert GEMV.gemv_config(1, 2048, 8192, silu_mul=True) == GEMV.GemvConfig(4, 1024, 8, 4)
    assert GEMV.gemv_config(1, 4096, 4096).block_n == 8
    assert GEMV.gemv_config(4, 4096, 4096) is None  # several rows: cuBLAS ...
    assert GEMV.gemv_config(4, 128256, 4096) is not None  # ... except the vocabulary
    assert GEMV.gemv_config(1, 576, 576).block_k == 512  # K not a power of two: masked tail
    assert GEMV.gemv_config(1, 576, 1536).block_k == 1024
    for m in (1, 3, GEMV.GEMV_MAX_ROWS, GEMV.GEMV_MAX_ROWS + 1):
        x = torch.randn(m, k, device=DEV)
        _close(GEMV.linear(x, w), reference.linear(x, w), 1e-4, 1e-4)
    x3 = torch.randn(2, 3, k, device=DEV)
    _close(GEMV.linear(x3, w), reference.linear(x3, w), 1e-5, 1e-5)
    assert GEMV.linear(torch.empty(0, k, device=DEV), w).shape == (0, n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("m", "k"), [(1, 64), (1, 80), (3, 64)])
def test_silu_mul_linear(m, k, dtype) -> None:
    """The down projection with SiLU-and-mul applied on load (one row; k=80 has a masked tail
    block) and the two-kernel fallback for more rows, against the reference."""
    n = 512
    x = torch.randn(m, 2 * k, device=DEV).to(dtype)
    w = (torch.randn(n, k, device=DEV) / k**0.5).to(dtype)
    assert (GEMV.gemv_config(m, n, k, silu_mul=True) is not None) == (m == 1)
    out = GEMV.silu_mul_linear(x, w)
    _close(out, reference.silu_mul_linear(x, w), *_tol(dtype))
    if m == 1:
        # The fused kernel reads silu(gate) * up rounded exactly as silu_and_mul writes it.
        cfg = GEMV.gemv_config(1, n, k, silu_mul=True)
        unfused = GEMV.gemv(T.silu_and_mul(x), w, None, cfg)
        torch.testing.assert_close(out, unfused, atol=0, rtol=0)
    with pytest.raises(ValueError, match="does not match"):
        GEMV.gemv(x[:, :k], w, None, GEMV.GemvConfig(8, 32, 4, 2), silu_mul=True)


def test_pdl_is_off_without_sm90() -> None:
    from graphrt.kernels.ops import make_ops
    from graphrt.kernels.pdl import launch_options, pdl_supported

    assert not pdl_supported(torch.device("cpu"))
    assert launch_options(False) == {}  # nothing new reaches Triton's launcher when off
    assert launch_options(True) == {"launch_pdl": True}
    with pytest.raises(ValueError, match="triton"):
        make_ops("torch", pdl=True)
    assert make_ops("torch").pdl is False


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax(dtype) -> None:
    rows, vocab = 5, 9000  # three chunks, the last one partial
    logits = torch.randn(rows, vocab, device=DEV).to(dtype)
    top = logits.max().item() + 1
    logits[1, [50, 8999]] = top  # tie across chunks
    logits[2, [4100, 4101]] = top  # tie within a chunk
    logits[3, 8999] = top  # the last element
    logits[4] = -float("inf")
    logits[4, 7] = -1e30
    out = AMAX.argmax(logits)
    assert out.dtype == torch.int64
    assert torch.equal(out, reference.argmax(logits))
    assert out[1:4].tolist() == [50, 4100, 8999]
    # A row-strided view and an empty batch.
    wide = torch.randn(3, vocab + 5, device=DEV).to(dtype)
    assert torch.equal(AMAX.argmax(wide[:, :vocab]), reference.argmax(wide[:, :vocab]))
    assert AMAX.argmax(logits[:0]).shape == (0,)


def _rope_case(t: int, hq: int, hkv: int, dim: int, dtype, cache_rows: int = 64):
    qkv = torch.randn(t, (hq + 2 * hkv) * dim, device=DEV).to(dtype)
    q, k, v = qkv.split([hq * dim, hkv * dim, hkv * dim], dim=-1)
    q, k, v = (x.view(t, -1, dim) for x in (q, k, v))
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2, device=DEV).float() / dim))
    freqs = torch.outer(torch.arange(4096, device=DEV).float(), inv)
    cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
    positions = torch.randint(0, 4096, (t,), device=DEV)
    locs = torch.randperm(cache_rows, device=DEV)[:t]
    return q, k, v, positions, cos_sin, locs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("hq", "hkv", "dim"), [(2, 2, 16), (8, 2, 32), (7, 1, 24)])
def test_rope_and_store_kv(hq, hkv, dim, dtype) -> None:
    t = 5
    q, k, v, pos, cos_sin, locs = _rope_case(t, hq, hkv, dim, dtype)
    kc_ref = torch.full((64, hkv, dim), float("nan"), dtype=dtype, device=DEV)
    vc_ref = kc_ref.clone()
    kc, vc = kc_ref.clone(), vc_ref.clone()
    q_ref, k_ref = reference.rope_and_store_kv(q, k, v, pos, cos_sin, kc_ref, vc_ref, locs)
    q_out, k_out = T.rope_and_store_kv(q, k, v, pos, cos_sin, kc, vc, locs)
    atol, rtol = _tol(dtype)
    if dtype == torch.bfloat16:
        # x cos - y sin cancels: a result near 0 keeps the rounding error of its operands, a
        # couple of bf16 ulps of the largest input, not of itself.
        atol = max(atol, 2 * 2**-8 * float(torch.cat([q.flatten(), k.flatten()]).abs().max()))
    _close(q_out, q_ref, atol, rtol)
    _close(k_out, k_ref, atol, rtol)
    torch.testing.assert_close(kc.float(), kc_ref.float(), atol=atol, rtol=rtol, equal_nan=True)
    torch.testing.assert_close(vc, vc_ref, atol=0, rtol=0, equal_nan=True)


# ---- decode attention ---------------------------------------------------------------------------


def _decode_case(hq, hkv, page_size, seq_lens, dtype=torch.float32, dim=32):
    paged = Paged(seq_lens, hkv, dim, page_size, dtype)
    q = torch.randn(len(seq_lens), hq, dim, device=DEV).to(dtype)
    ref = ta.paged_decode_attention(
        q, paged.k, paged.v, paged.page_rows, paged.seq_lens, paged.width * page_size, dim**-0.5
    )
    return paged, q, ref


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize(("hq", "hkv"), GQA)
def test_decode_attention(hq, hkv, page_size, splits) -> None:
    paged, q, ref = _decode_case(hq, hkv, page_size, [1, 37, 70])
    b, dim = q.shape[0], q.shape[2]
    out = torch.full_like(q, float("nan"))
    mid_o = torch.full((b, hq, splits, dim), float("nan"), device=DEV)
    mid_lse = torch.full((b, hq, splits), float("nan"), device=DEV)
    A.paged_decode_attention(
        q, paged.k, paged.v, paged.page_rows, paged.seq_lens, dim**-0.5, splits,
        mid_o, mid_lse, out, config=SMALL_CFG,
    )  # fmt: skip
    _close(out, ref, 1e-5, 1e-5)


@needs_compiled_bf16_dot
def test_decode_attention_bf16() -> None:
    paged, q, ref = _decode_case(8, 2, 16, [5, 50], torch.bfloat16)
    out = A.paged_decode_attention(
        q, paged.k, paged.v, paged.page_rows, paged.seq_lens, 32**-0.5, 2, config=SMALL_CFG
    )
    _close(out, ref, 2e-2, 2e-2)


def test_choose_num_splits() -> None:
    cfg = A.TritonAttentionConfig()
    # A small batch spreads over the SMs; a big one needs no split; short bounds cap splits.
    assert A.choose_num_splits(1, 8, 131072, 132, cfg) == cfg.max_splits
    assert A.choose_num_splits(256, 8, 131072, 132, cfg) == 1
    assert A.choose_num_splits(1, 8, 64, 132, cfg) == 1
    assert A.choose_num_splits(64, 8, 8192, 132, A.TritonAttentionConfig(num_splits=5)) == 5
    # An e4m3 cache's blocks are twice as long (the same bytes a tile): half the splits fit.
    assert A.choose_num_splits(1, 8, 256, 132, cfg) == 256 // cfg.decode_block_n == 4
    assert A.choose_num_splits(1, 8, 256, 132, cfg, fp8_kv=True) == 2


@pytest.mark.parametrize("page_size", [1, 16])
def test_triton_backend_capture_path(page_size) -> None:
    """The graph path: static partials from ``init_capture_graph`` (poisoned), split-K on,
    rows of a bucket padded with the dummy page, as the graph runner pads them."""
    hq, hkv, dim = 8, 2, 32
    lens = [33, 1, 90, 1]  # the two 1s are padding rows pointing at the dummy page
    paged = Paged(lens, hkv, dim, page_size, torch.float32)
    paged.page_rows[1] = 0
    paged.page_rows[3] = 0
    spec = _spec(hq, hkv, dim, page_size, paged.width, torch.float32)
    cfg = A.TritonAttentionConfig(decode_block_n=16, num_splits=4)
    be = A.TritonAttentionBackend(spec, [paged.k], [paged.v], config=cfg)
    be.init_capture_graph(max_bs=8)
    be._mid_o.fill_(float("nan"))
    be._mid_lse.fill_(float("nan"))
    bound = paged.width * page_size
    inputs = AttnInputs(True, paged.seq_lens, paged.page_rows, bound)
    meta = be.prepare_for_capture(4, inputs)
    assert meta.num_splits == 4 and meta.mid_o.shape == (4, hq, 4, dim)
    q = torch.randn(4, hq, dim, device=DEV)
    ref = ta.paged_decode_attention(q, paged.k, paged.v, paged.page_rows, paged.seq_lens, bound,
                                    dim**-0.5)  # fmt: skip
    _close(be.forward(q, 0, meta), ref, 1e-5, 1e-5)
    # Eager metadata for the same step gives the same result.
    _close(be.forward(q, 0, be.prepare_metadata(inputs)), ref, 1e-5, 1e-5)


# ---- extend attention ---------------------------------------------------------------------------

# (new tokens, KV length): a fresh prompt, chunks over a cached prefix, a decode row of a
# mixed step, an empty row.
EXTEND_ROWS = [(6, 6), (5, 41), (1, 19), (0, 3), (20, 22), (3, 150)]


def _extend(hq, hkv, page_size, rows, dtype=torch.float32, dim=32, cfg=SMALL_CFG):
    q_lens = [n for n, _ in rows]
    seq_lens = [s for _, s in rows]
    paged = Paged(seq_lens, hkv, dim, page_size, dtype)
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    q = torch.randn(int(cu[-1]), hq, dim, device=DEV).to(dtype)
    ref = ta.paged_extend_attention(
        q, paged.k, paged.v, paged.page_rows, seq_lens, cu.tolist(), dim**-0.5
    )
    out = A.paged_extend_attention(
        q, paged.k, paged.v, paged.page_rows, paged.seq_lens,
        torch.from_numpy(cu).to(DEV), max(q_lens), dim**-0.5, config=cfg,
    )  # fmt: skip
    return out, ref


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize(("hq", "hkv"), GQA)
def test_extend_attention(hq, hkv, page_size) -> None:
    out, ref = _extend(hq, hkv, page_size, EXTEND_ROWS)
    _close(out, ref, 1e-5, 1e-5)


@needs_compiled_bf16_dot
def test_extend_attention_default_blocks_bf16() -> None:
    out, ref = _extend(8, 2, 16, EXTEND_ROWS, torch.bfloat16, cfg=A.TritonAttentionConfig())
    _close(out, ref, 2e-2, 2e-2)


def test_extend_attention_default_blocks() -> None:
    out, ref = _extend(8, 2, 16, EXTEND_ROWS, cfg=A.TritonAttentionConfig())
    _close(out, ref, 1e-5, 1e-5)


# Decode rows first (one token each, the scheduler's order), then prefill chunks (one of them a
# final chunk of one token, which must stay with the extend rows), and an all-decode step.
MIXED_ROWS = [(1, 37), (1, 5), (1, 70), (1, 1), (6, 6), (1, 19), (5, 41), (3, 150)]


def _mixed(hq, hkv, page_size, rows, cfg, dtype=torch.float32, dim=32, pdl=False):
    """An eager mixed step through the Triton backend: (its metadata, output, torch reference)."""
    q_lens, seq_lens = [n for n, _ in rows], [s for _, s in rows]
    paged = Paged(seq_lens, hkv, dim, page_size, dtype)
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int64)
    q = torch.randn(int(cu[-1]), hq, dim, device=DEV).to(dtype)
    # The reference pads every row to the longest chunk and context: one call for the leading
    # one-token rows and one for the rest keeps it within memory at real shapes.
    m = next((i for i, n in enumerate(q_lens) if n != 1), len(q_lens))
    parts = []
    for lo, hi in ((0, m), (m, len(rows))):
        if lo < hi:
            sub_cu = (cu[lo : hi + 1] - cu[lo]).tolist()
            parts.append(
                ta.paged_extend_attention(
                    q[cu[lo] : cu[hi]],
                    paged.k,
                    paged.v,
                    paged.page_rows[lo:hi],
                    seq_lens[lo:hi],
                    sub_cu,
                    dim**-0.5,
                )
            )
    ref = torch.cat(parts)
    spec = dataclasses.replace(_spec(hq, hkv, dim, page_size, paged.width, dtype), pdl=pdl)
    be = A.TritonAttentionBackend(spec, [paged.k], [paged.v], config=cfg)
    inputs = AttnInputs(
        is_decode=False,
        seq_lens=paged.seq_lens,
        page_rows=paged.page_rows,
        kv_len_bound=paged.width * page_size,
        cu_q=torch.from_numpy(cu).to(torch.int32).to(DEV),
        max_q_len=max(q_lens),
        seq_lens_host=np.array(seq_lens),
        cu_q_host=cu,
    )
    meta = be.prepare_metadata(inputs)
    return meta, be.forward(q, 0, meta), ref, cu


@pytest.mark.parametrize(
    ("rows", "least", "min_prefill", "n_decode"),
    [
        (MIXED_ROWS, 2, 15, 4),
        (MIXED_ROWS, 5, 0, None),  # too few decode rows
        (MIXED_ROWS, 2, 16, None),  # too few prefill tokens (15) for the split to pay
        ([(1, 9), (1, 33), (1, 2)], 1, 0, 3),
    ],
)
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize(("hq", "hkv"), GQA)
def test_triton_backend_mixed_step(hq, hkv, page_size, rows, least, min_prefill, n_decode) -> None:
    """An eager step of decode rows and prefill chunks: the leading one-token rows go through
    the decode kernel (split-K on) and the rest through the extend kernel, into one output
    that matches the torch reference; below either threshold it is one extend call."""
    cfg = A.TritonAttentionConfig(
        decode_block_n=16, extend_block_m=16, extend_block_n=16, num_splits=3,
        mixed_decode_min_rows=least, mixed_split_min_prefill=min_prefill,
    )  # fmt: skip
    meta, out, ref, cu = _mixed(hq, hkv, page_size, rows, cfg)
    q_lens = [n for n, _ in rows]
    if n_decode is None:
        assert isinstance(meta, AttnInputs)
    else:
        assert isinstance(meta, A.TritonMixedMeta) and meta.n_decode == n_decode
        assert meta.decode.num_splits == 3
        assert (meta.extend is None) == (n_decode == len(rows))
        if meta.extend is not None:
            assert meta.extend.cu_q.tolist() == (cu[n_decode:] - n_decode).tolist()
            assert meta.extend.max_q_len == max(q_lens[n_decode:])
    _close(out, ref, 1e-5, 1e-5)


def _static_mixed(hq, hkv, page_size, rows, pad_rows, pad_tokens, cfg, capture):
    """A static-shape mixed step (``prepare_for_mixed``): ``rows`` (new tokens, KV length) in
    any order, then ``pad_rows`` rows that feed nothing and ``pad_tokens`` tokens of no row."""
    dim = 32
    q_lens, seq_lens = [n for n, _ in rows], [s for _, s in rows]
    paged = Paged(seq_lens + [0] * pad_rows, hkv, dim, page_size, torch.float32)
    real = int(sum(q_lens))
    cu = np.concatenate([[0], np.cumsum(q_lens + [0] * pad_rows)]).astype(np.int64)
    q = torch.randn(real + pad_tokens, hq, dim, device=DEV)
    ref = ta.paged_extend_attention(
        q[:real], paged.k, paged.v, paged.page_rows[: len(rows)], seq_lens,
        cu[: len(rows) + 1].tolist(), dim**-0.5,
    )  # fmt: skip
    spec = _spec(hq, hkv, dim, page_size, paged.width, torch.float32)
    be = A.TritonAttentionBackend(spec, [paged.k], [paged.v], config=cfg)
    if capture:
        be.init_capture_graph(len(cu) - 1)
    inputs = AttnInputs(
        is_decode=False,
        seq_lens=paged.seq_lens,
        page_rows=paged.page_rows,
        kv_len_bound=paged.width * page_size,
        cu_q=torch.from_numpy(cu).to(torch.int32).to(DEV),
    )
    meta = be.prepare_for_mixed(inputs, capture=capture)
    assert isinstance(meta, A.TritonVarlenMeta)
    return be.forward(q, 0, meta), ref, real


# One-token rows anywhere, not only first (a last prefill chunk of one token is one too).
STATIC_MIXED_ROWS = [(6, 6), (1, 37), (5, 41), (1, 5), (1, 1), (20, 22), (1, 70), (3, 150)]


@pytest.mark.parametrize(("pad_rows", "pad_tokens"), [(0, 0), (3, 13)])
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize(("hq", "hkv"), GQA)
def test_triton_backend_static_mixed_step(hq, hkv, page_size, splits, pad_rows, pad_tokens):
    """The capturable mixed step: the decode kernel takes the one-token rows wherever they are,
    the static-grid extend kernel finds every other row's query blocks on the device, padding
    rows and tokens are skipped, and the real tokens match the torch reference."""
    cfg = A.TritonAttentionConfig(
        decode_block_n=16, extend_block_m=16, extend_block_n=16, num_splits=splits
    )
    out, ref, real = _static_mixed(
        hq, hkv, page_size, STATIC_MIXED_ROWS, pad_rows, pad_tokens, cfg, capture=True
    )
    _close(out[:real], ref, 1e-5, 1e-5)


@pytest.mark.parametrize(
    "rows",
    [
        [(1, 9)],  # one decode row
        [(16, 16)],  # one prefill, exactly two query blocks of 8 tokens (group 2, BLOCK_M 16)
        [(7, 30), (9, 9), (8, 100)],  # blocks that straddle the rows' offsets
        [(1, 3)] * 5 + [(33, 40)],
    ],
)
def test_static_extend_grid_covers_every_split(rows) -> None:
    """``T // BLOCK_Q + B`` programs cover any split of the tokens, without the host's
    ``max_q_len`` (eager metadata, not the capture buffers)."""
    cfg = A.TritonAttentionConfig(decode_block_n=16, extend_block_m=16, extend_block_n=16)
    out, ref, real = _static_mixed(2, 1, 16, rows, 2, 5, cfg, capture=False)
    _close(out[:real], ref, 1e-5, 1e-5)


# ---- flashinfer helpers and availability ---------------------------------------------------------


@pytest.mark.parametrize("page_size", [1, 16])
def test_gather_page_indices(page_size) -> None:
    lens = [1, 40, 17, 1]
    paged = Paged(lens, 1, 16, page_size, torch.float32)
    counts = [-(-n // page_size) for n in lens]
    nnz = sum(counts)
    indices = torch.full((nnz + 5,), -7, dtype=torch.int32, device=DEV)
    indptr = torch.full((len(lens) + 1,), -7, dtype=torch.int32, device=DEV)
    last = torch.full((len(lens),), -7, dtype=torch.int32, device=DEV)
    FI.gather_page_indices(paged.page_rows, paged.seq_lens, page_size, indices, indptr, last)
    want = torch.cat([paged.page_rows[b, :c] for b, c in enumerate(counts)])
    assert torch.equal(indices[:nnz], want)
    assert torch.all(indices[nnz:] == -7)
    h_indptr, h_last = FI.host_page_metadata(np.array(lens), page_size)
    assert indptr.cpu().tolist() == h_indptr.tolist()
    assert last.cpu().tolist() == h_last.tolist()


def test_flashinfer_backend_says_how_to_install() -> None:
    try:
        import flashinfer  # noqa: F401

        pytest.skip("flashinfer is installed")
    except ImportError:
        pass
    cls = get_backend_class("flashinfer")
    spec = _spec(8, 2, 64, 16, 4, torch.float32)
    with pytest.raises(ImportError, match=r"graphrt\[flashinfer\]"):
        cls(spec, [], [])


# ---- GPU: real shapes, graphs, flashinfer, model level -----------------------------------------

BF16 = torch.bfloat16
H8B = dict(hq=32, hkv=8, dim=128)  # Llama-3.1-8B attention heads


@pytest.mark.gpu
def test_gpu_ops_real_shapes() -> None:
    x = torch.randn(256, 4096, device=DEV, dtype=BF16)
    r = torch.randn(256, 4096, device=DEV, dtype=BF16)
    w = (1 + 0.1 * torch.randn(4096, device=DEV)).to(BF16)
    ref_out, ref_res = reference.fused_add_rms_norm(x, r, w, 1e-5)
    out, res = T.fused_add_rms_norm(x.clone(), r.clone(), w, 1e-5)
    _close(out, ref_out, 2e-2, 1e-2)
    assert torch.equal(res, ref_res)
    _close(T.rms_norm(x, w, 1e-5), reference.rms_norm(x, w, 1e-5), 2e-2, 1e-2)
    g = torch.randn(256, 2 * 14336, device=DEV, dtype=BF16)
    _close(T.silu_and_mul(g), reference.silu_and_mul(g), 2e-2, 1e-2)
    q, k, v, pos, cos_sin, locs = _rope_case(64, 32, 8, 128, BF16, cache_rows=4096)
    kc_ref = torch.full((4096, 8, 128), float("nan"), dtype=BF16, device=DEV)
    vc_ref = kc_ref.clone()
    kc, vc = kc_ref.clone(), vc_ref.clone()
    q_ref, _ = reference.rope_and_store_kv(q, k, v, pos, cos_sin, kc_ref, vc_ref, locs)
    q_out, _ = T.rope_and_store_kv(q, k, v, pos, cos_sin, kc, vc, locs)
    _close(q_out, q_ref, 2e-2, 1e-2)
    torch.testing.assert_close(kc, kc_ref, atol=2e-2, rtol=1e-2, equal_nan=True)
    torch.testing.assert_close(vc, vc_ref, atol=0, rtol=0, equal_nan=True)


@pytest.mark.gpu
def test_gpu_fused_add_rms_norm_configs_exact() -> None:
    """Each value of each dimension the sweep tries gives the default's results bit for bit at
    the same warp count (rows per program and cache hints change no arithmetic); across warp
    counts the fp32 sum of squares is reduced in another order, so the normed output may move
    by an ulp, never the residual sum. 250 rows: a masked tail for 4 and 8 rows per program.
    A cover of the sweep's 32 configs (each compiles its own kernel), not all of them."""
    x = torch.randn(250, 4096, device=DEV, dtype=BF16)
    r = torch.randn(250, 4096, device=DEV, dtype=BF16)
    w = (1 + 0.1 * torch.randn(4096, device=DEV)).to(BF16)
    ref_out, ref_res = reference.fused_add_rms_norm(x, r, w, 1e-5)
    cover = {
        4: [(1, False), (2, False), (4, False), (8, False), (8, True)],
        2: [(1, False), (4, True)],
        8: [(1, False), (2, True)],
        16: [(1, False), (8, True)],
    }
    for warps, cfgs in cover.items():
        base = None
        for per, evict in cfgs:
            cfg = T.NormConfig(per, warps, evict)
            out, res = T.fused_add_rms_norm(x.clone(), r.clone(), w, 1e-5, cfg=cfg)
            assert torch.equal(res, ref_res), cfg
            _close(out, ref_out, 2e-2, 1e-2)
            base = base if base is not None else out
            assert torch.equal(out, base), cfg


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2, 3, 8])
@pytest.mark.parametrize(("n", "k"), [(4096, 4096), (6144, 4096), (2048, 8192), (32768, 2048)])
def test_gpu_gemv_real_shapes(m, n, k) -> None:
    x = torch.randn(m, k, device=DEV, dtype=BF16)
    w = (torch.randn(n, k, device=DEV) / k**0.5).to(BF16)
    b = torch.randn(n, device=DEV, dtype=BF16)
    ref = (x.float() @ w.float().T + b.float()).to(BF16)
    _close(GEMV.linear(x, w, b), ref, 2e-2, 2e-2)
    # Every config the sweep tries, whatever the dispatch picks.
    cfgs = [GEMV.GemvConfig(8, 512, 4, 4), GEMV.GemvConfig(32, 128, 8, 4)]
    if m == 1:
        cfgs += [GEMV.GemvConfig(2, 1024, 4, 4), GEMV.GemvConfig(4, 1024, 8, 4)]
    for cfg in cfgs:
        _close(GEMV.gemv(x, w, b, cfg), ref, 2e-2, 2e-2)
    if m == 1:
        gu = torch.randn(1, 2 * k, device=DEV, dtype=BF16)
        ref = reference.silu_mul_linear(gu.float(), w.float()).to(BF16)
        _close(GEMV.silu_mul_linear(gu, w), ref, 2e-2, 2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 4])
def test_gpu_pdl_chain_in_graph_is_exact(rows) -> None:
    """A chain of dependent kernels (norm, GEMVs, fused down projection, decode attention with
    split-K and merge, argmax) launched with PDL and replayed from a graph gives bit-identical
    results to the same chain launched plainly: each kernel waits for its inputs."""
    from graphrt.kernels.pdl import pdl_supported

    if not pdl_supported(DEV):
        pytest.skip("PDL needs sm_90")
    h, inter, vocab, hq, hkv, dim = 2048, 8192, 32768, 32, 8, 64
    g = torch.Generator(device=DEV).manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, device=DEV, generator=g) * scale).to(BF16)

    nw = (1 + 0.1 * torch.randn(h, device=DEV, generator=g)).to(BF16)
    w_q, w_o = rnd(hq * dim, h, scale=h**-0.5), rnd(h, hq * dim, scale=h**-0.5)
    w_gu, w_dn = rnd(2 * inter, h, scale=h**-0.5), rnd(h, inter, scale=inter**-0.5)
    w_lm = rnd(vocab, h, scale=h**-0.5)
    paged = Paged([1500, 700, 33, 1024][:rows], hkv, dim, 16, BF16)
    x, r = rnd(rows, h), rnd(rows, h)

    def chain(pdl: bool) -> tuple[torch.Tensor, torch.Tensor]:
        hs, res = T.fused_add_rms_norm(x.clone(), r.clone(), nw, 1e-5, pdl=pdl)
        q = GEMV.linear(hs, w_q, pdl=pdl).view(rows, hq, dim)
        att = A.paged_decode_attention(
            q, paged.k, paged.v, paged.page_rows, paged.seq_lens, dim**-0.5, 4, pdl=pdl
        )
        hs, res = T.fused_add_rms_norm(GEMV.linear(att.view(rows, -1), w_o, pdl=pdl), res, nw,
                                       1e-5, pdl=pdl)  # fmt: skip
        d = GEMV.silu_mul_linear(GEMV.linear(hs, w_gu, pdl=pdl), w_dn, pdl=pdl)
        hs, _ = T.fused_add_rms_norm(d, res, nw, 1e-5, pdl=pdl)
        logits = GEMV.linear(hs, w_lm, pdl=pdl)
        return logits, AMAX.argmax(logits, pdl=pdl)

    ref_logits, ref_ids = chain(False)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        chain(True)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits, ids = chain(True)
    for _ in range(3):
        logits.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(logits, ref_logits)
        assert torch.equal(ids, ref_ids)
    assert torch.equal(ref_ids, ref_logits.float().argmax(dim=-1))


def _bitmasks(rows: int, vocab: int, words: int, p: float, seed: int = 0) -> torch.Tensor:
    """Random int32 bitmasks ``[rows, words]`` allowing each token with probability ``p``."""
    g = torch.Generator().manual_seed(seed)
    bits = torch.rand(rows, words * 32, generator=g) < p
    weights = torch.tensor([1 << i for i in range(32)], dtype=torch.int64)
    packed = (bits.view(rows, words, 32).to(torch.int64) * weights).sum(-1)
    # As int32: bit 31 set is a negative word.
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32).to(DEV)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_argmax_and_apply_token_bitmask(dtype) -> None:
    """Structured outputs' bitmasks inside the argmax, and applied to a copy of the logits, equal
    the torch reference: bit 31 (a negative word) and bit 0 read right, words past the
    vocabulary ignored, a row that allows nothing gives index 0 (as torch on -inf does)."""
    rows, vocab = 6, 9000  # three chunks, the last partial; 282 words, the last one partial
    words = (vocab + 31) // 32 + 2  # wider than needed: a padded mask row
    logits = torch.randn(rows, vocab, device=DEV).to(dtype)
    masks = _bitmasks(rows, vocab, words, 0.02)
    masks[1] = 0  # allows nothing
    masks[2] = -1  # allows everything
    masks[3] = 0
    masks[3, 0] = 1  # token 0 only
    masks[4] = 0
    masks[4, 280] = -(2**31)  # bit 31 of word 280: token 8,991 only
    masks[4, 281] = -(2**31)  # token 9,023: past the vocabulary
    masks[5, 3] = -(2**31)
    logits[5, 127] = logits[5].max() + 1  # allowed by that bit, and the best
    ref = reference.argmax(logits, masks)
    out = AMAX.argmax(logits, masks)
    assert torch.equal(out, ref)
    assert out[1:6].tolist() == [0, int(logits[2].float().argmax()), 0, 8991, 127]
    # Every allowed id is one the mask allows.
    allowed = reference.apply_token_bitmask(torch.zeros(rows, vocab, device=DEV), masks) == 0
    assert all(allowed[r, out[r]] for r in (0, 2, 3, 4, 5))
    masked = AMAX.apply_token_bitmask(logits, masks)
    assert masked.dtype == dtype and torch.equal(
        masked, reference.apply_token_bitmask(logits, masks)
    )
    # A row-strided view of the logits; masks that are not int32 or too narrow are refused.
    wide = torch.randn(rows, vocab + 5, device=DEV).to(dtype)
    view = wide[:, :vocab]
    assert torch.equal(AMAX.argmax(view, masks), reference.argmax(view, masks))
    assert torch.equal(
        AMAX.apply_token_bitmask(view, masks), reference.apply_token_bitmask(view, masks)
    )
    with pytest.raises(ValueError, match="int32"):
        AMAX.argmax(logits, masks.to(torch.int64))
    with pytest.raises(ValueError, match="cover fewer"):
        AMAX.apply_token_bitmask(logits, masks[:, :100])


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 7, 256])
def test_gpu_argmax_vocab(rows) -> None:
    logits = torch.randn(rows, 128256, device=DEV, dtype=BF16) * 4
    out = AMAX.argmax(logits)
    assert torch.equal(out, logits.float().argmax(dim=-1))
    masks = _bitmasks(rows, 128256, 4008, 0.001, seed=rows)
    assert torch.equal(AMAX.argmax(logits, masks), reference.argmax(logits, masks))
    masked = AMAX.apply_token_bitmask(logits.float(), masks)
    assert torch.equal(masked, reference.apply_token_bitmask(logits.float(), masks))


LONG = [1, 300, 4000, 17, 2049, 1000, 64, 3333]


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [None, 1, 7])
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize(("hq", "hkv"), [(32, 8), (28, 4), (8, 8)])
def test_gpu_decode_real_shapes(hq, hkv, page_size, splits) -> None:
    paged, q, ref = _decode_case(hq, hkv, page_size, LONG, BF16, dim=128)
    cfg = A.TritonAttentionConfig(num_splits=splits)
    n = splits or A.choose_num_splits(len(LONG), hkv, paged.width * page_size, 132, cfg)
    out = A.paged_decode_attention(
        q, paged.k, paged.v, paged.page_rows, paged.seq_lens, 128**-0.5, n, config=cfg
    )
    _close(out, ref, 1e-2, 2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize(("hq", "hkv"), [(32, 8), (28, 4)])
def test_gpu_extend_real_shapes(hq, hkv, page_size) -> None:
    rows = [(512, 512), (300, 1000), (1, 2000), (77, 77), (130, 4000)]
    out, ref = _extend(hq, hkv, page_size, rows, BF16, dim=128, cfg=A.TritonAttentionConfig())
    _close(out, ref, 1e-2, 2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize(("hq", "hkv", "pdl"), [(32, 8, True), (28, 4, False)])
def test_gpu_mixed_step_real_shapes(hq, hkv, pdl) -> None:
    """An offline-sized mixed step: 200 decode rows over up to 2k tokens of context (the decode
    kernel, launched with PDL where asked), then prefill chunks (the extend kernel)."""
    g = torch.Generator().manual_seed(5)
    rows = [(1, int(n)) for n in torch.randint(1, 2000, (200,), generator=g)]
    rows += [(512, 512), (300, 1000), (1, 77), (130, 4000), (1200, 1500)]
    from graphrt.kernels.pdl import pdl_supported

    if pdl and not pdl_supported(torch.device(DEV)):
        pytest.skip("this GPU or Triton has no PDL")
    meta, out, ref, _ = _mixed(hq, hkv, 16, rows, A.TritonAttentionConfig(), BF16, 128, pdl)
    # 2,143 prefill tokens: above the default mixed_split_min_prefill.
    assert isinstance(meta, A.TritonMixedMeta) and meta.n_decode == 200
    _close(out, ref, 1e-2, 2e-2)


def _graph_decode_check(be, paged: Paged, hq: int, dim: int, bs: int, max_len: int) -> None:
    """Capture ``forward`` for bucket ``bs`` and replay it on new lengths."""
    bound = paged.width * paged.page_size
    # Captured on one-token rows, as the engine captures on padding rows; replayed on long ones.
    seq_lens = torch.ones_like(paged.seq_lens)
    page_rows = paged.page_rows.clone()
    q = torch.randn(bs, hq, dim, device=DEV, dtype=BF16)
    be.init_capture_graph(bs)
    inputs = AttnInputs(True, seq_lens, page_rows, bound)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            be.forward(q, 0, be.prepare_for_capture(bs, inputs))
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = be.forward(q, 0, be.prepare_for_capture(bs, inputs))
    # New steps: other lengths (so other page counts), fresh queries, a padding row.
    for _ in range(2):
        lens = torch.randint(1, max_len + 1, (bs,), device=DEV, dtype=torch.int32)
        lens[-1] = 1
        seq_lens.copy_(lens)
        page_rows[-1] = 0  # the padding row reads the dummy page
        q.copy_(torch.randn_like(q))
        out.fill_(float("nan"))
        be.prepare_for_replay(bs, lens.cpu().numpy().astype(np.int64), np.zeros(bs, np.int64))
        graph.replay()
        ref = ta.paged_decode_attention(q, paged.k, paged.v, page_rows, seq_lens, bound, dim**-0.5)
        _close(out, ref, 1e-2, 2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize(("hq", "hkv"), [(32, 8), (28, 4)])
@pytest.mark.parametrize("backend", ["triton", "flashinfer"])
def test_gpu_backend_decode_graph(backend, hq, hkv) -> None:
    if backend == "flashinfer":
        pytest.importorskip("flashinfer")
    dim, ps, bs = 128, 16, 8
    # Every row owns a full-width set of pages, so any length up to the bound is valid.
    paged = Paged([2048] * bs, hkv, dim, ps, BF16)
    spec = _spec(hq, hkv, dim, ps, paged.width, BF16)
    be = get_backend_class(backend)(spec, [paged.k], [paged.v])
    _graph_decode_check(be, paged, hq, dim, bs, 2048)


@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize(("hq", "hkv"), [(32, 8), (8, 8), (28, 4)])
def test_gpu_flashinfer_eager(hq, hkv, page_size) -> None:
    pytest.importorskip("flashinfer")
    dim = 128
    paged = Paged(LONG, hkv, dim, page_size, BF16)
    spec = _spec(hq, hkv, dim, page_size, paged.width, BF16)
    be = get_backend_class("flashinfer")(spec, [paged.k], [paged.v])
    bound = paged.width * page_size
    host = np.array(LONG, dtype=np.int64)
    q = torch.randn(len(LONG), hq, dim, device=DEV, dtype=BF16)
    meta = be.prepare_metadata(
        AttnInputs(True, paged.seq_lens, paged.page_rows, bound, seq_lens_host=host)
    )
    ref = ta.paged_decode_attention(q, paged.k, paged.v, paged.page_rows, paged.seq_lens, bound,
                                    dim**-0.5)  # fmt: skip
    _close(be.forward(q, 0, meta), ref, 1e-2, 2e-2)
    rows = [(512, 512), (300, 1000), (1, 2000), (77, 77), (130, 4000)]
    ext = Paged([s for _, s in rows], hkv, dim, page_size, BF16)
    be = get_backend_class("flashinfer")(spec, [ext.k], [ext.v])
    cu = np.concatenate([[0], np.cumsum([n for n, _ in rows])])
    q = torch.randn(int(cu[-1]), hq, dim, device=DEV, dtype=BF16)
    seq = np.array([s for _, s in rows])
    inputs = AttnInputs(
        False, ext.seq_lens, ext.page_rows, int(seq.max()),
        cu_q=torch.from_numpy(cu).to(DEV, torch.int32), max_q_len=512,
        seq_lens_host=seq, cu_q_host=cu,
    )  # fmt: skip
    ref = ta.paged_extend_attention(q, ext.k, ext.v, ext.page_rows, seq.tolist(), cu.tolist(),
                                    dim**-0.5)  # fmt: skip
    _close(be.forward(q, 0, be.prepare_metadata(inputs)), ref, 1e-2, 2e-2)


# A tiny random Llama whose heads flashinfer supports (head_dim 128, GQA 4).
MODEL = dict(hidden_size=512, num_attention_heads=4, num_key_value_heads=1)
PROMPTS = [[5, 17, 99, 3, 200, 45, 7], list(range(40, 140)), [1, 2, 3], list(range(0, 250))]


def _generate(model_dir, backend: str):
    from graphrt import Engine, SamplingParams

    eng = Engine(
        str(model_dir), show_progress=False, device="cuda", dtype="bfloat16",
        attention_backend=backend, max_logprobs=256, max_num_batched_tokens=64,
        cuda_graph_batch_sizes=(1, 2, 4), max_num_seqs=4,
    )  # fmt: skip
    params = SamplingParams(temperature=0, max_tokens=24, logprobs=256, ignore_eos=True)
    outs = [o.outputs[0] for o in eng.generate(PROMPTS, params)]
    eng.shutdown()
    return outs


def _dense(c) -> torch.Tensor:
    rows = []
    for step in c.logprobs:
        row = torch.full((256,), float("-inf"))
        for tok, lp in step.top:
            row[tok] = lp
        rows.append(row)
    return torch.stack(rows)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "flashinfer"])
def test_gpu_model_greedy_matches_torch_backend(tiny_model_factory, backend) -> None:
    """Chunked prefill (64-token chunks over a cached prefix), decode graphs of 1-4 rows."""
    if backend == "flashinfer":
        pytest.importorskip("flashinfer")
    d = tiny_model_factory("LlamaForCausalLM", **MODEL)
    ref = _generate(d, "torch")
    ours = _generate(d, backend)
    atol = 0.08  # bf16, as in the HF parity test
    for r, o in zip(ref, ours):
        lr, lo = _dense(r), _dense(o)
        for i, (tr, to) in enumerate(zip(r.token_ids, o.token_ids)):
            torch.testing.assert_close(lo[i], lr[i], atol=atol, rtol=0.05)
            if tr != to:
                # A near-tie in bf16; the contexts differ from here on.
                assert lr[i, to] >= lr[i].max() - atol
                break


def test_engine_mixed_steps_through_triton_match_torch_on_cpu(tiny_model_factory) -> None:
    """The GPU's path for steps with prefill tokens, end to end on CPU: the engine's mixed step
    function with the Triton backend's ``prepare_for_mixed`` (decode kernel over one-token rows
    by ``cu_q``, static-grid extend kernel), interpreted, against the torch backend. Chunked
    prefills (32-token budget) share steps with decode rows and are padded to token buckets;
    fp32 greedy ids and logprobs must match."""
    if DEV.type == "cuda":
        pytest.skip("on CUDA, tests/test_mixed_graphs.py checks the captured graphs")
    from graphrt import Engine, SamplingParams

    d = tiny_model_factory("Qwen2ForCausalLM", num_attention_heads=4, num_key_value_heads=2)
    prompts = [list(range(3, 40)), [7, 8, 9], list(range(50, 70)), [11] * 5]
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=2)
    outs = {}
    for backend in ("torch", "triton"):
        eng = Engine(
            str(d), show_progress=False, device="cpu", attention_backend=backend,
            max_model_len=128, max_num_batched_tokens=32, max_num_seqs=4,
        )  # fmt: skip
        outs[backend] = [o.outputs[0] for o in eng.generate(prompts, params)]
        assert eng.stats["mixed_graph_steps"] > 2
        eng.shutdown()
    for a, b in zip(outs["triton"], outs["torch"]):
        assert a.token_ids == b.token_ids
        assert a.cumulative_logprob == pytest.approx(b.cumulative_logprob, abs=1e-4)
