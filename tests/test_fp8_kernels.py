"""FP8-weight kernels (issue #21, GPU part; ``kernels/triton_fp8.py``) against their torch
references.

On CPU the Triton kernels run under ``TRITON_INTERPRET=1`` (set by conftest before anything
imports triton) at tiny shapes: the FP8 GEMV, its SiLU-and-mul variant and the per-token
activation quantizer, plus the W8A8 glue where this torch's CPU ``_scaled_mm`` takes row-wise
scales. The ``gpu`` tests add real shapes, W8A8 on the fp8 tensor cores, PDL in a captured graph
and an FP8 model's graphs against eager.

Tolerances, per element, from ``mag = |x| @ |w|^T + |b|`` (the bound on a dot product's rounding
error) and ``eps``, the output dtype's ulp at 1 (2^-7 bf16, 2^-10 fp16, 2^-23 fp32):

- against ``reference.fp8_linear``: ``2 eps (mag + |ref|) + K 2^-23 mag``. The reference
  rounds each dequantized weight to the activation dtype (up to half an ulp of each product:
  ``eps/2 mag``) and rounds its output (CPU bf16 ``addmm`` may round before adding the bias);
  the kernel does not round the weight and rounds its output once; both sum in fp32 in
  different orders (``K 2^-23 mag`` at worst);
- against exact arithmetic (float64 over the dequantized weights): ``eps |exact| + K 2^-23
  mag``: the GEMV rounds once. One ulp, not half, because the interpreter converts fp32 to bf16
  by truncation (the GPU rounds to nearest).
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch

from graphrt.kernels import reference
from graphrt.kernels import triton_fp8 as F8
from graphrt.kernels import triton_ops as T
from graphrt.kernels.triton_gemv import GemvConfig
from graphrt.models.fp8 import FP8_DTYPE, quantize_fp8

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
BF16 = torch.bfloat16


@pytest.fixture(autouse=True)
def _seed(request: pytest.FixtureRequest) -> None:
    torch.manual_seed(zlib.crc32(request.node.name.encode()))


def _weight(n: int, k: int, spread: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A quantized random ``[n, k]`` weight whose rows span ``10^±spread`` in magnitude, so the
    per-row scales differ by orders of magnitude (a scale applied to the wrong column shows)."""
    rows = torch.logspace(-spread, spread, n, device=DEV)[torch.randperm(n, device=DEV)]
    return quantize_fp8(torch.randn(n, k, device=DEV) / k**0.5 * rows[:, None])


def _deq(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return q.double() * s.double()[:, None]


def _mag(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    m = x.double().abs() @ w.double().abs().T
    return m if bias is None else m + bias.double().abs()


def _within(out: torch.Tensor, want: torch.Tensor, tol: torch.Tensor, what: str) -> None:
    assert not out.isnan().any(), f"{what}: unwritten (NaN) outputs"
    excess = (out.double() - want.double()).abs() - tol
    assert (excess <= 0).all(), (
        f"{what}: {int((excess > 0).sum())} of {excess.numel()} outside tolerance, worst by "
        f"{excess.max().item():.3g}"
    )


def _check_linear(out, x_eff, q, s, bias, what: str, silu: bool = False) -> None:
    """``out`` against the reference and against exact arithmetic (module docstring)."""
    dtype, k = out.dtype, q.shape[1]
    eps = torch.finfo(dtype).eps
    w = _deq(q, s)
    mag = _mag(x_eff, w, bias)
    acc = k * 2.0**-23 * mag
    ref = reference.fp8_linear(x_eff, q, s, bias)
    _within(out, ref, 2 * eps * (mag + ref.double().abs()) + acc, f"{what} vs reference")
    exact = x_eff.double() @ w.T + (0 if bias is None else bias.double())
    _within(out, exact, eps * exact.abs() + acc, f"{what} vs exact")


# ---- the FP8 GEMV --------------------------------------------------------------------------


def _skip_interpreted_bf16_dot(m: int, dtype: torch.dtype) -> None:
    if m > 1 and dtype == BF16 and INTERPRETED:
        pytest.skip("interpreter's bf16 tl.dot is wrong (the m > 1 path is a dot)")


@pytest.mark.parametrize("dtype", [BF16, torch.float16, torch.float32])
@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize(
    ("n", "k", "block_n", "block_k"),
    [(64, 128, 8, 32), (40, 56, 16, 32)],  # every block full; ragged N and K
)
def test_fp8_gemv(m, n, k, block_n, block_k, dtype) -> None:
    _skip_interpreted_bf16_dot(m, dtype)
    q, s = _weight(n, k)
    x = torch.randn(m, k, device=DEV).to(dtype)
    b = torch.randn(n, device=DEV).to(dtype)
    cfg = GemvConfig(block_n=block_n, block_k=block_k, num_warps=4, num_stages=2)
    for bias in (None, b):
        out = F8.fp8_gemv(x, q, s, bias, cfg)
        assert out.dtype == dtype and out.shape == (m, n)
        _check_linear(out, x, q, s, bias, f"m={m} bias={bias is not None}")
    # A row-strided input (a view into a wider buffer) is read in place.
    wide = torch.randn(m, k + 8, device=DEV).to(dtype)
    _check_linear(F8.fp8_gemv(wide[:, :k], q, s, None, cfg), wide[:, :k], q, s, None, "strided")


@pytest.mark.parametrize("dtype", [BF16, torch.float16])
@pytest.mark.parametrize(("m", "k"), [(1, 64), (1, 80), (3, 64), (4, 80)])
def test_fp8_gemv_silu_mul(m, k, dtype) -> None:
    """The down projection with SiLU-and-mul applied on load (k=80: a masked tail block) equals
    the GEMV on ``silu_and_mul``'s output bit for bit, and the reference within tolerance."""
    _skip_interpreted_bf16_dot(m, dtype)
    n = 48
    q, s = _weight(n, k)
    gu = torch.randn(m, 2 * k, device=DEV).to(dtype)
    cfg = F8.fp8_gemv_config(m, n, k, silu_mul=True)
    fused = F8.fp8_gemv(gu, q, s, None, cfg, silu_mul=True)
    act = T.silu_and_mul(gu)  # rounded exactly as the fused load rounds it
    assert torch.equal(fused, F8.fp8_gemv(act, q, s, None, cfg))
    _check_linear(fused, act, q, s, None, "silu_mul")
    # Against the torch activation: its silu may differ from the kernel's by an ulp (and the
    # interpreter truncates where torch rounds), so two more ulps of each product.
    ref = reference.fp8_silu_mul_linear(gu, q, s)
    mag = _mag(reference.silu_and_mul(gu), _deq(q, s), None)
    eps = torch.finfo(dtype).eps
    _within(fused, ref, 2 * eps * (2 * mag + ref.double().abs()), "silu_mul vs torch")
    assert torch.equal(F8.silu_mul_linear(gu, q, s), fused)
    with pytest.raises(ValueError, match="does not match"):
        F8.fp8_gemv(gu[:, :k], q, s, None, cfg, silu_mul=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("swap_ab", [False, True])
@pytest.mark.parametrize(
    ("m", "n", "k", "split_k"),
    [(3, 48, 256, 2), (5, 40, 200, 3), (17, 48, 256, 8)],  # even; ragged N and K; 8 splits
)
def test_fp8_gemv_split_k(m, n, k, split_k, swap_ab, dtype) -> None:
    """Programs along K (``GemvConfig.split_k``) write fp32 partial sums that a second kernel
    adds in a fixed order, then scales: within the GEMV's tolerance of the reference, the same
    at every run, and equal to one split where the sums are exact (integer-valued inputs). With
    SiLU-and-mul on load too, and with the dot's operands swapped (``swap_ab``). One row refuses
    a split."""
    q, s = _weight(n, k)
    x = torch.randn(m, k, device=DEV).to(dtype)
    b = torch.randn(n, device=DEV).to(dtype)
    one = GemvConfig(16, 32, 4, 2)
    cfg = GemvConfig(16, 32, 4, 2, split_k=split_k, swap_ab=swap_ab)
    for bias in (None, b):
        out = F8.fp8_gemv(x, q, s, bias, cfg)
        _check_linear(out, x, q, s, bias, f"split_k={split_k} bias={bias is not None}")
        assert torch.equal(out, F8.fp8_gemv(x, q, s, bias, cfg))
    # Small integers and unit scales: every partial sum is exact, so the order cannot show.
    xi = torch.randint(-3, 4, (m, k), device=DEV).to(dtype)
    qi = torch.randint(-4, 5, (n, k), device=DEV).to(torch.float32).to(F8.FP8_DTYPE)
    ones = torch.ones(n, device=DEV)
    assert torch.equal(F8.fp8_gemv(xi, qi, ones, None, cfg), F8.fp8_gemv(xi, qi, ones, None, one))
    gu = torch.randn(m, 2 * k, device=DEV).to(dtype)
    fused = F8.fp8_gemv(gu, q, s, None, cfg, silu_mul=True)
    _check_linear(fused, T.silu_and_mul(gu), q, s, None, "split_k silu_mul")
    with pytest.raises(ValueError, match="split_k"):
        F8.fp8_gemv(x[:1], q, s, None, cfg)


@pytest.mark.parametrize("m", [1, 2, 16])
def test_silu_mul_linear_fuses_only_one_row(m, monkeypatch) -> None:
    """The SiLU-fused GEMV runs for one row only; 2-16 rows take the SiLU kernel, then the
    plain GEMV (the fused one recomputes SiLU in every program: 5x slower on the H100)."""
    _skip_interpreted_bf16_dot(m, torch.float32)
    calls = []
    real = F8.fp8_gemv

    def spy(x, w, s, b, cfg, *, silu_mul=False, pdl=False):
        calls.append(silu_mul)
        return real(x, w, s, b, cfg, silu_mul=silu_mul, pdl=pdl)

    monkeypatch.setattr(F8, "fp8_gemv", spy)
    q, s = _weight(48, 64)
    gu = torch.randn(m, 128, device=DEV)
    out = F8.silu_mul_linear(gu, q, s)
    assert calls == [m == 1]
    _check_linear(out, T.silu_and_mul(gu), q, s, None, f"silu_mul m={m}")


def test_fp8_gemv_decodes_every_e4m3_value() -> None:
    """Every finite e4m3 code (subnormals and -0 included) times its row scale, read through a
    one-hot input: exactly on the one-row path (fp32), and rounded once on the dot path (fp16,
    where the weight is upcast to the activation dtype)."""
    codes = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F], dtype=torch.uint8)
    n, k = codes.numel(), 32
    q = torch.randint(0, 0x7F, (n, k), dtype=torch.uint8)
    q[:, 5] = codes
    q = q.view(FP8_DTYPE).to(DEV)
    s = torch.rand(n, device=DEV) + 0.5
    want = q[:, 5].float() * s
    x = torch.zeros(1, k, device=DEV)
    x[0, 5] = 1.0
    out = F8.fp8_gemv(x, q, s, None, GemvConfig(8, 32, 4, 2))
    assert torch.equal(out[0], want)
    assert (out[0][codes.to(DEV) == 0x80] == 0).all()
    x2 = torch.zeros(2, k, device=DEV, dtype=torch.float16)
    x2[:, 5] = 1.0
    out2 = F8.fp8_gemv(x2, q, s, None, GemvConfig(16, 32, 4, 2))
    assert torch.equal(out2, want.half().expand(2, n))


def test_fp8_gemv_config_by_shape() -> None:
    cfg = F8.fp8_gemv_config
    assert cfg(0, 4096, 4096) is None
    assert cfg(F8.FP8_GEMV_MAX_ROWS + 1, 4096, 4096) is None
    assert cfg(1, 2048, 8192) == F8.ONE_ROW_NARROW  # narrow N: narrow programs
    assert cfg(1, 2048, 8192, silu_mul=True) == F8.ONE_ROW_NARROW_SILU
    assert cfg(1, 4096, 14336) == F8.ONE_ROW_WIDE
    assert cfg(1, 4096, 14336, silu_mul=True) == F8.ONE_ROW_WIDE_SILU
    assert cfg(2, 4096, 4096) == cfg(F8.FEW_ROWS_MAX, 64, 4096) == F8.FEW_ROWS
    assert cfg(2, 28672, 4096) == F8.FEW_ROWS_WIDE  # wide N: enough column blocks, no split
    # Past 16 rows: W8A8, unless it cannot take the operands (then the GEMV's many-row mode).
    for n, k in [(4096, 4096), (4096, 14336), (28672, 4096)]:
        assert cfg(F8.FEW_ROWS_MAX + 1, n, k) is None and cfg(F8.FP8_GEMV_MAX_ROWS, n, k) is None
        assert cfg(F8.FEW_ROWS_MAX + 1, n, k, w8a8=False) == F8.MANY_ROWS
    # ... and at those rows (17-64) W8A8 is the GEMV's own mode, by the layer's shape; past
    # them _scaled_mm.
    wcfg = F8.fp8_w8a8_gemv_config
    assert wcfg(F8.FEW_ROWS_MAX + 1, 28672, 4096) == wcfg(64, 16384, 2048) == F8.W8A8_WIDE
    assert wcfg(F8.FEW_ROWS_MAX, 28672, 4096) is None and wcfg(65, 28672, 4096) is None
    assert wcfg(64, 6144, 4096) == wcfg(17, 4096, 4096) == wcfg(64, 3072, 2048) == F8.W8A8_NARROW
    assert wcfg(64, 4096, 14336) == wcfg(32, 2048, 8192) == F8.W8A8_NARROW
    assert wcfg(64, 16384, 96).block_k == 64
    assert cfg(1, 576, 576).block_k == 512  # K not a power of two: a masked tail block
    assert cfg(3, 576, 40).block_k == 32


# ---- the quantizer and W8A8 ------------------------------------------------------------------


def _activation_rows(k: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows that probe the rounding: random rows over six orders of magnitude, a zero row, a
    row of every finite e4m3 value (its amax is 448, so its scale is 1 and it must come back
    unchanged), and a row of ties and edge cases (scale 1 too): midpoints between e4m3 values
    (1.0625, 17, 0.0146 and 0.0151 around the subnormal boundary), values that round up into
    the next binade (1.97, 3.97), and signed zeros."""
    rows = torch.randn(6, k) * torch.logspace(-3, 3, 6)[:, None]
    zero = torch.zeros(1, k)
    codes = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F], dtype=torch.uint8)
    every = codes.view(FP8_DTYPE).float().repeat(-(-k // codes.numel()))[:k]
    edge = torch.tensor([448.0, 1.0625, -1.0625, 17.0, 1.97, -3.97, 0.0146, 0.0151, 0.0155,
                         -0.0009, 2.0**-10, -0.0, 0.0, 240.0, 232.0, -1.1875])  # fmt: skip
    edge = edge.repeat(-(-k // edge.numel()))[:k]
    edge[0] = 448.0
    return torch.cat([rows, zero, every[None], edge[None]]).to(DEV, dtype)


@pytest.mark.parametrize("one_pass", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, BF16])
@pytest.mark.parametrize("k", [256, 300])
def test_quantize_rows_fp8(k, dtype, one_pass, monkeypatch) -> None:
    """The per-token quantizer gives the reference's bits: scales and values, ties to even,
    subnormals, signed zeros; the reference is the weights' recipe applied to rows. Rows that
    fit one block (held in registers) and longer ones (two passes over 2K blocks; here the
    bound is lowered so that these short rows take that path too)."""
    if not one_pass:
        monkeypatch.setattr(F8, "QUANT_ONE_PASS_MAX", 64)
    x = _activation_rows(k, dtype)
    q, s = F8.quantize_rows_fp8(x)
    rq, rs = reference.quantize_rows_fp8(x)
    assert q.dtype == FP8_DTYPE and q.shape == x.shape and s.shape == (x.shape[0], 1)
    assert torch.equal(s, rs)
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8))
    # The weights' recipe gives the same scales; its values divide where the activations'
    # multiply by the reciprocal, so they may differ by one e4m3 step.
    wq, ws = quantize_fp8(x)
    assert torch.equal(ws[:, None], rs)
    step = torch.where(rq.float().abs() < 2**-6, 2**-9, rq.float().abs() * 2**-3)
    assert ((wq.float() - rq.float()).abs() <= step).all()
    if dtype == torch.float32:
        assert torch.equal(q[7].float(), x[7])  # every e4m3 value, unchanged
    assert (q[6].view(torch.uint8) == 0).all() and (s[6] > 0).all()  # zero row: finite scale
    gu = torch.randn(3, 2 * k, device=DEV).to(dtype) * 3
    q, s = F8.quantize_rows_fp8(gu, silu_mul=True)
    rq, rs = reference.quantize_rows_fp8(T.silu_and_mul(gu))
    assert torch.equal(s, rs) and torch.equal(q.view(torch.uint8), rq.view(torch.uint8))


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize(("m", "k", "dtype"), [(3, 256, torch.float32), (2, 300, BF16)])
def test_norm_quantize_rows_fp8(m, k, dtype, residual) -> None:
    """The pre-norm and the quantizer in one kernel give the bits of the norm kernel, then the
    quantizer: scales, e4m3 values and the new residual (written over ``residual``), with and
    without a residual, for a K that is not a power of two."""
    x = (torch.randn(m, k, device=DEV) * torch.logspace(-2, 2, m, device=DEV)[:, None]).to(dtype)
    r = torch.randn(m, k, device=DEV).to(dtype) if residual else None
    nw = (1 + 0.3 * torch.randn(k, device=DEV)).to(dtype)
    if r is None:
        h, want_res = T.rms_norm(x, nw, 1e-5), x
    else:
        h, want_res = T.fused_add_rms_norm(x.clone(), r.clone(), nw, 1e-5)
    want_q, want_s = F8.quantize_rows_fp8(h)
    r_in = None if r is None else r.clone()
    q, sc, res = F8.norm_quantize_rows_fp8(x, r_in, nw, 1e-5)
    assert torch.equal(sc, want_s) and torch.equal(res, want_res)
    assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8))
    if r is not None:
        assert res.data_ptr() == r_in.data_ptr()  # in place, as fused_add_rms_norm
    # Against the torch references, within an ulp (the interpreter truncates to bf16).
    ref_h, ref_res = reference._pre_norm(x, r, nw, 1e-5)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(res, ref_res, rtol=eps, atol=0)
    torch.testing.assert_close(sc, reference.quantize_rows_fp8(ref_h)[1], rtol=2 * eps, atol=0)
    empty = F8.norm_quantize_rows_fp8(x[:0], None if r is None else r[:0], nw, 1e-5)
    assert empty[0].shape == (0, k) and empty[1].shape == (0, 1)


def test_norm_is_quantized_where_w8a8_runs(monkeypatch) -> None:
    """Where the product runs W8A8, the composed norm + linear quantizes in the norm's kernel
    and hands the e4m3 rows to the W8A8 product: the result and residual equal the norm kernel,
    then ``fp8_linear`` (whose W8A8 quantizes ``h`` itself). W8A8 is taken on CUDA only, so
    here the glue runs with the dispatch's predicate and the product patched to the GEMV's
    W8A8 mode (the interpreter has the kernel, not cuBLAS)."""
    m, n, k = 17, 48, 64
    q, s = _weight(n, k, spread=0.5)
    x = torch.randn(m, k, device=DEV).half()
    r = torch.randn(m, k, device=DEV).half()
    nw = (1 + 0.1 * torch.randn(k, device=DEV)).half()
    cfg = GemvConfig(16, 32, 4, 2, split_k=2, swap_ab=True)
    monkeypatch.setattr(F8, "_takes_w8a8", lambda x, w, b: x.shape[0] > F8.FEW_ROWS_MAX)
    monkeypatch.setattr(F8, "fp8_w8a8_gemv_config", lambda m, n, k: cfg)
    y, res = F8.composed_add_rms_norm_linear(x, r.clone(), nw, 1e-5, q, s)
    h, want_res = T.fused_add_rms_norm(x.clone(), r.clone(), nw, 1e-5)
    assert torch.equal(res, want_res)
    assert torch.equal(y, F8.fp8_w8a8_gemv(h, q, s, None, cfg))
    y1, _ = F8.composed_add_rms_norm_linear(x[:2].clone(), r[:2].clone(), nw, 1e-5, q, s)
    want1 = F8.fp8_linear(T.fused_add_rms_norm(x[:2].clone(), r[:2].clone(), nw, 1e-5)[0], q, s)
    assert torch.equal(y1, want1)  # two rows: the GEMV, the norm on its own


def _cpu_scaled_mm_rowwise() -> bool:
    a = torch.zeros(16, 16, dtype=FP8_DTYPE)
    try:
        torch._scaled_mm(a, a.t(), torch.ones(16, 1), torch.ones(1, 16), out_dtype=BF16)
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    return True


@pytest.mark.parametrize("swap_ab", [False, True])
@pytest.mark.parametrize(
    ("m", "n", "k", "split_k"),
    [(1, 48, 64, 1), (5, 40, 200, 1), (17, 48, 256, 4)],  # one row; ragged N and K; split K
)
def test_fp8_w8a8_gemv_equals_the_emulation(m, n, k, split_k, swap_ab) -> None:
    """The GEMV's W8A8 mode (rows quantized per token, the dot on e4m3 operands, both scales
    after the fp32 sum) computes what ``reference.fp8_w8a8_linear`` does: equal up to the order
    of fp32 additions, one rounding of the output. With SiLU-and-mul in the quantizer too."""
    dtype = torch.float16  # the interpreter's bf16 dot is not trusted (above); e4m3 is exact
    q, s = _weight(n, k)
    x = torch.randn(m, k, device=DEV).to(dtype)
    b = torch.randn(n, device=DEV).to(dtype)
    cfg = GemvConfig(16, 32, 4, 2, split_k=split_k, swap_ab=swap_ab)
    eps = torch.finfo(dtype).eps
    for bias in (None, b):
        out = F8.fp8_w8a8_gemv(x, q, s, bias, cfg)
        assert out.dtype == dtype and out.shape == (m, n)
        want = reference.fp8_w8a8_linear(x, q, s, bias)
        xq, xs = reference.quantize_rows_fp8(x)
        mag = _mag(xq.double() * xs.double(), _deq(q, s), bias)
        tol = eps * (mag + want.double().abs()) + k * 2.0**-23 * mag
        _within(out, want, tol, f"w8a8 gemv m={m} split_k={split_k} swap={swap_ab}")
    gu = torch.randn(m, 2 * k, device=DEV).to(dtype)
    fused = F8.fp8_w8a8_gemv(gu, q, s, None, cfg, silu_mul=True)
    assert torch.equal(fused, F8.fp8_w8a8_gemv(T.silu_and_mul(gu), q, s, None, cfg))


def test_w8a8_off_cuda_takes_the_reference() -> None:
    """Off CUDA there is no W8A8 path: above the GEMV bound ``fp8_linear`` is the reference bit
    for bit. At or below it, the GEMV; a 3-D input is flattened; no rows, no launch."""
    q, s = _weight(48, 64)
    m = F8.FP8_GEMV_MAX_ROWS + 1
    x = torch.randn(m, 64, device=DEV)
    if DEV.type == "cpu":
        assert not F8.w8a8_supported(x.bfloat16(), q, None)
        assert torch.equal(F8.fp8_linear(x, q, s), reference.fp8_linear(x, q, s))
    few = x[:3]
    cfg = F8.fp8_gemv_config(3, 48, 64)
    assert torch.equal(F8.fp8_linear(few, q, s), F8.fp8_gemv(few, q, s, None, cfg))
    x3 = few.view(3, 1, 64)
    assert torch.equal(F8.fp8_linear(x3, q, s), F8.fp8_linear(few, q, s).view(3, 1, 48))
    assert F8.fp8_linear(torch.empty(0, 64, device=DEV), q, s).shape == (0, 48)


@pytest.mark.skipif(DEV.type == "cuda", reason="on CUDA, test_gpu_w8a8 checks the real kernel")
def test_w8a8_glue_on_cpu_scaled_mm() -> None:
    """The W8A8 call (quantizer, operand layout, row-wise scale shapes, bias) through torch's CPU
    ``_scaled_mm``, against the emulation in ``reference.fp8_w8a8_linear``: the same quantized
    operands, so only accumulation order and one output rounding differ."""
    if not _cpu_scaled_mm_rowwise():
        pytest.skip("this torch's CPU _scaled_mm has no row-wise scaling")
    m, n, k = 20, 48, 64
    q, s = _weight(n, k)
    x = torch.randn(m, k).bfloat16()
    b = torch.randn(n).bfloat16()
    for bias in (None, b):
        out = F8.w8a8_linear(x, q, s, bias)
        ref = reference.fp8_w8a8_linear(x, q, s, bias)
        xq, xs = reference.quantize_rows_fp8(x)
        mag = _mag(xq.double() * xs.double(), _deq(q, s), bias)
        _within(out, ref, torch.finfo(BF16).eps * (mag + ref.double().abs()), "w8a8 (cpu)")
    gu = torch.randn(m, 2 * k).bfloat16()
    out = F8.w8a8_linear(gu, q, s, silu_mul=True)
    assert torch.equal(out, F8.w8a8_linear(T.silu_and_mul(gu), q, s))


def test_w8a8_error_is_the_activation_rounding() -> None:
    """What the GPU test's 3% bound stands on: e4m3 activations with per-token scales put the
    product about 2.6% (relative, norm-wise) from the unquantized one on random inputs."""
    for m, n, k in [(64, 512, 256), (17, 1024, 1024)]:
        q, s = _weight(n, k, spread=0.0)
        x = torch.randn(m, k, device=DEV).bfloat16()
        ref = reference.fp8_linear(x.float(), q, s)
        err = (reference.fp8_w8a8_linear(x, q, s).float() - ref).norm() / ref.norm()
        assert 0.02 < err < 0.03


# ---- the seam: Ops bundles and the model's calls -------------------------------------------


def test_ops_bundles_bind_the_fp8_kernels() -> None:
    from graphrt.kernels.ops import make_ops
    from graphrt.models.fp8 import Fp8Weight, linear, silu_mul_linear

    tri, ref = make_ops("triton"), make_ops("torch")
    assert tri.fp8_linear is F8.fp8_linear and tri.fp8_silu_mul_linear is F8.silu_mul_linear
    assert ref.fp8_linear is reference.fp8_linear
    assert ref.fp8_silu_mul_linear is reference.fp8_silu_mul_linear
    w = Fp8Weight(48, 64, DEV)
    w.load_rows(None, *_weight(48, 64, spread=0.0))
    x = torch.randn(2, 64, device=DEV)
    gu = torch.randn(2, 128, device=DEV)
    for a, b in [(linear(tri, x, w), linear(ref, x, w)),
                 (silu_mul_linear(tri, gu, w), silu_mul_linear(ref, gu, w))]:  # fmt: skip
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # The torch bundle computes what it did before the fused entry existed.
    want = reference.fp8_linear(reference.silu_and_mul(gu), w.weight, w.weight_scale)
    assert torch.equal(silu_mul_linear(ref, gu, w), want)


def test_add_rms_norm_linear_fuses_one_row() -> None:
    """One row runs the one-pass kernel at ``fp8_norm_gemv_config``; two rows, or operands of
    another dtype, the norm kernel then ``fp8_linear``. Both stay within the composed
    reference's rounding, and the new residual is the reference's."""
    from graphrt.kernels import triton_gemv as G

    n, k = 48, 64
    q, s = _weight(n, k, spread=0.5)
    nw = 1 + 0.1 * torch.randn(k, device=DEV)
    calls: list[int] = []
    real = F8.norm_gemv_one_pass

    def spy(*a, **kw):
        calls.append(a[0].shape[0])
        return real(*a, **kw)

    mp = pytest.MonkeyPatch()
    mp.setattr(F8, "norm_gemv_one_pass", spy)
    try:
        for m in (1, 2):
            for res in (True, False):
                x = torch.randn(m, k, device=DEV)
                r = torch.randn(m, k, device=DEV) if res else None
                # The composed path's norm works in place (as in a layer): copies.
                y, new = F8.add_rms_norm_linear(
                    x.clone(), None if r is None else r.clone(), nw, 1e-6, q, s
                )
                ref_y, ref_new = reference.fp8_add_rms_norm_linear(x, r, nw, 1e-6, q, s)
                assert torch.equal(new, ref_new)
                torch.testing.assert_close(y, ref_y, atol=1e-4, rtol=1e-4)
        # Another dtype for the norm weight: composed, whatever the rows.
        x = torch.randn(1, k, device=DEV)
        F8.add_rms_norm_linear(x, None, nw.to(BF16), 1e-6, q, s)
    finally:
        mp.undo()
    assert calls == [1, 1]
    assert F8.fp8_norm_gemv_config(1, 28672, 4096) == F8.NORM_ONE_ROW_WIDE
    assert F8.fp8_norm_gemv_config(1, 6144, 4096) == F8.NORM_ONE_ROW
    assert F8.fp8_norm_gemv_config(1, 2048, 2048) == F8.NORM_ONE_ROW_NARROW
    assert F8.fp8_norm_gemv_config(1, 64, 64).block_k == 64
    assert F8.fp8_norm_gemv_config(2, 4096, 4096) is None
    assert F8.norm_gemv_one_pass is G.norm_gemv_one_pass


def test_ops_bundles_bind_the_fp8_norm_linear() -> None:
    from graphrt.kernels.ops import make_ops
    from graphrt.models.fp8 import Fp8Weight, add_rms_norm_linear

    assert make_ops("torch").fp8_add_rms_norm_linear is reference.fp8_add_rms_norm_linear
    # Fused by default ("auto": it measured faster over FP8 weights); "off" composes.
    assert make_ops("triton", fuse_norms="off").fp8_add_rms_norm_linear is (
        F8.composed_add_rms_norm_linear
    )
    fused = make_ops("triton")
    assert fused.fp8_add_rms_norm_linear is F8.add_rms_norm_linear
    assert make_ops("triton", fuse_norms="on").fp8_add_rms_norm_linear is F8.add_rms_norm_linear
    with pytest.raises(ValueError, match="fuse_norms"):
        make_ops("triton", fuse_norms=True)
    # The model-side entry sends an Fp8Weight to the FP8 op, a plain weight to the plain one.
    w = Fp8Weight(48, 64, DEV)
    w.load_rows(None, *_weight(48, 64, spread=0.0))
    x, r, nw = torch.randn(1, 64, device=DEV), torch.randn(1, 64, device=DEV), torch.ones(64)
    y, _ = add_rms_norm_linear(fused, x, r, nw, 1e-6, w)
    want, _ = reference.fp8_add_rms_norm_linear(x, r, nw, 1e-6, w.weight, w.weight_scale)
    torch.testing.assert_close(y, want, atol=1e-4, rtol=1e-4)
    plain = torch.randn(48, 64, device=DEV)
    y, _ = add_rms_norm_linear(fused, x, r, nw, 1e-6, plain)
    torch.testing.assert_close(y, reference.add_rms_norm_linear(x, r, nw, 1e-6, plain)[0],
                               atol=1e-4, rtol=1e-4)  # fmt: skip


# ---- GPU: real shapes, W8A8, PDL in a graph, a model's graphs against eager --------------------

# (N, K) of Llama-3.1-8B's qkv, o and down, Llama-3.2-1B's qkv and down.
REAL = [(6144, 4096), (4096, 4096), (4096, 14336), (3072, 2048), (2048, 8192)]


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2, 5, 16])
@pytest.mark.parametrize(("n", "k"), REAL)
def test_gpu_fp8_gemv_real_shapes(m, n, k) -> None:
    q, s = _weight(n, k, spread=1.0)
    x = torch.randn(m, k, device=DEV, dtype=BF16)
    b = torch.randn(n, device=DEV, dtype=BF16)
    out = F8.fp8_linear(x, q, s, b)
    assert torch.equal(out, F8.fp8_gemv(x, q, s, b, F8.fp8_gemv_config(m, n, k)))
    _check_linear(out, x, q, s, b, f"m={m} {n}x{k}")
    # Every config the table may pick for m rows, whichever it picks here. The one-row configs
    # are never picked for several rows: with tl.dot's 16-row tiles their block_k asks for more
    # shared memory than the H100 has (288 KB against 227 KB, run X1).
    multi = (F8.FEW_ROWS, F8.FEW_ROWS_WIDE, F8.MANY_ROWS)
    one = (F8.ONE_ROW_NARROW, F8.ONE_ROW_NARROW_SILU, F8.ONE_ROW_WIDE, F8.ONE_ROW_WIDE_SILU)
    cfgs = one if m == 1 else multi
    for cfg in cfgs:
        _check_linear(F8.fp8_gemv(x, q, s, None, cfg), x, q, s, None, f"{cfg}")
    gu = torch.randn(m, 2 * k, device=DEV, dtype=BF16)
    fused = F8.silu_mul_linear(gu, q, s)
    assert torch.equal(fused, F8.fp8_gemv(T.silu_and_mul(gu), q, s, None,
                                          F8.fp8_gemv_config(m, n, k, silu_mul=True)))  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("m", [17, 64])
@pytest.mark.parametrize(("n", "k"), REAL)
def test_gpu_fp8_gemv_split_k_real_shapes(m, n, k) -> None:
    """The GEMV past its row bound with split K (the sweep's candidates for 17-64 rows): within
    tolerance of the reference, the same bits at every run, also launched with PDL."""
    from graphrt.kernels.pdl import pdl_supported

    q, s = _weight(n, k, spread=1.0)
    x = torch.randn(m, k, device=DEV, dtype=BF16)
    for cfg in (
        GemvConfig(64, 128, 4, 3, split_k=4),
        GemvConfig(128, 64, 4, 3, split_k=2),
        GemvConfig(128, 64, 4, 3, split_k=2, swap_ab=True),
    ):
        out = F8.fp8_gemv(x, q, s, None, cfg)
        _check_linear(out, x, q, s, None, f"m={m} {n}x{k} {cfg}")
        pdl = F8.fp8_gemv(x, q, s, None, cfg, pdl=pdl_supported(DEV))
        assert torch.equal(out, pdl) and torch.equal(out, F8.fp8_gemv(x, q, s, None, cfg))


@pytest.mark.gpu
@pytest.mark.parametrize("m", [17, 64])
@pytest.mark.parametrize(
    ("n", "k"), [(28672, 4096), (16384, 2048), (4096, 14336), (6144, 4096), (2048, 8192)]
)
def test_gpu_fp8_w8a8_gemv_real_shapes(m, n, k) -> None:
    """The GEMV's W8A8 mode (the dispatch's for every layer at 17-64 rows) on the FP8 tensor
    cores, at the dispatched config and others: within one output rounding of the emulation,
    the same bits at every run."""
    q, s = _weight(n, k, spread=1.0)
    x = torch.randn(m, k, device=DEV, dtype=BF16)
    want = reference.fp8_w8a8_linear(x, q, s)
    xq, xs = reference.quantize_rows_fp8(x)
    mag = _mag(xq.double() * xs.double(), _deq(q, s), None)
    tol = torch.finfo(BF16).eps * (mag + want.double().abs()) + k * 2.0**-23 * mag
    for cfg in (F8.fp8_w8a8_gemv_config(m, n, k), F8.W8A8_WIDE, GemvConfig(128, 256, 4, 3, 2, True),
                GemvConfig(256, 128, 8, 3, 8, True)):  # fmt: skip
        out = F8.fp8_w8a8_gemv(x, q, s, None, cfg)
        _within(out, want, tol, f"w8a8 gemv m={m} {n}x{k} {cfg}")
        assert torch.equal(out, F8.fp8_w8a8_gemv(x, q, s, None, cfg))


@pytest.mark.gpu
@pytest.mark.parametrize("m", [17, 64, 65, 333])
@pytest.mark.parametrize(("n", "k"), [(6144, 4096), (16384, 2048), (2048, 8192), (512, 256)])
def test_gpu_w8a8(m, n, k) -> None:
    """W8A8: the quantizer gives the reference's bits; ``_scaled_mm`` matches the fp32
    emulation over the same quantized operands within bf16 rounding; the whole stays within 3%
    (norm-wise) of the unquantized product (the activations' e4m3 rounding, about 2.6%); and
    ``fp8_linear`` takes this path wherever the GEMV does not (past 64 rows, wide N past 16)."""
    q, s = _weight(n, k, spread=0.0)
    x = torch.randn(m, k, device=DEV, dtype=BF16)
    b = torch.randn(n, device=DEV, dtype=BF16)
    assert F8.w8a8_supported(x, q, b)
    xq, xs = F8.quantize_rows_fp8(x)
    rq, rs = reference.quantize_rows_fp8(x)
    assert torch.equal(xs, rs) and torch.equal(xq.view(torch.uint8), rq.view(torch.uint8))
    for bias in (None, b):
        out = F8.w8a8_linear(x, q, s, bias)
        emu = reference.fp8_w8a8_linear(x, q, s, bias)
        mag = _mag(rq.double() * rs.double(), _deq(q, s), bias)
        _within(out, emu, torch.finfo(BF16).eps * (mag + emu.double().abs()), "w8a8 vs emulation")
        ref = reference.fp8_linear(x.float(), q, s, None if bias is None else bias.float())
        assert (out.float() - ref).norm() / ref.norm() < 0.03
        wcfg = F8.fp8_w8a8_gemv_config(m, n, k)
        if wcfg is not None:  # 17-64 rows: the GEMV's W8A8 mode
            assert torch.equal(F8.fp8_linear(x, q, s, bias), F8.fp8_w8a8_gemv(x, q, s, bias, wcfg))
        elif F8.fp8_gemv_config(m, n, k) is None:
            assert torch.equal(F8.fp8_linear(x, q, s, bias), out)
    assert (F8.fp8_gemv_config(m, n, k) is None) == (m > 16)
    if F8.fp8_gemv_config(m, n, k, silu_mul=True) is None:
        gu = torch.randn(m, 2 * k, device=DEV, dtype=BF16)
        act = T.silu_and_mul(gu)
        wcfg = F8.fp8_w8a8_gemv_config(m, n, k)
        want = (
            F8.w8a8_linear(act, q, s) if wcfg is None else F8.fp8_w8a8_gemv(act, q, s, None, wcfg)
        )
        assert torch.equal(F8.silu_mul_linear(gu, q, s), want)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 4, 64])
def test_gpu_fp8_chain_in_graph_is_exact(rows) -> None:
    """gate/up, then the fused down projection, over FP8 weights, captured in a graph
    (with PDL where the GPU has it) and replayed on new inputs, give the eager results bit for
    bit: the kernels wait for their inputs, and nothing in them is sized by values."""
    from graphrt.kernels.pdl import pdl_supported

    pdl = pdl_supported(DEV)
    h, inter = 2048, 8192
    wgu, wdn = _weight(2 * inter, h, 0.5), _weight(h, inter, 0.5)
    x = torch.randn(rows, h, device=DEV, dtype=BF16)

    def chain(on: bool) -> list[torch.Tensor]:
        return [F8.silu_mul_linear(F8.fp8_linear(x, *wgu, pdl=on), *wdn, pdl=on)]

    _check_replays_exactly(chain, [x], pdl)


def _check_replays_exactly(chain, inputs: list[torch.Tensor], pdl: bool) -> None:
    """Capture ``chain(pdl)`` in a graph (compiled first, outside the capture); then, three
    times on new random ``inputs``, its replay equals ``chain(False)`` launched plainly, bit
    for bit."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        chain(pdl)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = chain(pdl)
    for _ in range(3):
        for t in inputs:
            t.copy_(torch.randn_like(t))
        want = chain(False)
        for o in outs:
            o.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        for o, w in zip(outs, want, strict=True):
            assert torch.equal(o, w)


def _layer_chain(rows: int):
    """A Llama-3.1-8B layer over FP8 weights on ``rows`` random rows: ``(chain, x, r, nw,
    (wqkv, wgu))``, where ``chain(pdl)`` runs qkv with its pre-norm, o, gate/up with its
    pre-norm, the SiLU-fused down projection and the next layer's qkv, and returns its outputs
    and last residual; it leaves ``x`` and ``r`` as they were (the norms may work in place)."""
    h, q, inter = 4096, 6144, 14336
    wqkv, wo = _weight(q, h, 0.5), _weight(h, h, 0.5)
    wgu, wdn = _weight(2 * inter, h, 0.5), _weight(h, inter, 0.5)
    nw = (1 + 0.1 * torch.randn(h, device=DEV)).to(BF16)
    x = torch.randn(rows, h, device=DEV, dtype=BF16)
    r = torch.randn(rows, h, device=DEV, dtype=BF16)

    def chain(on: bool) -> list[torch.Tensor]:
        qkv, s1 = F8.add_rms_norm_linear(x, r.clone(), nw, 1e-5, *wqkv, pdl=on)
        o = F8.fp8_linear(qkv[:, :h], *wo, pdl=on)
        gu, s2 = F8.add_rms_norm_linear(o, s1, nw, 1e-5, *wgu, pdl=on)
        d = F8.silu_mul_linear(gu, *wdn, pdl=on)
        nxt, s3 = F8.add_rms_norm_linear(d, s2, nw, 1e-5, *wqkv, pdl=on)
        return [qkv, gu, nxt, s3]

    return chain, x, r, nw, (wqkv, wgu)


@pytest.mark.gpu
def test_gpu_fp8_norm_chain_in_graph_is_exact() -> None:
    """A layer's one-row chain with the pre-norms folded into the FP8 GEMV (program 0 writes
    the new residual; the next fused kernel reads it, one launch later and two), with PDL in a
    captured graph: bit-identical to the chain launched plainly, on new inputs each replay."""
    from graphrt.kernels.pdl import pdl_supported

    chain, x, r, _, _ = _layer_chain(1)
    _check_replays_exactly(chain, [x, r], pdl_supported(DEV))


@pytest.mark.gpu
@pytest.mark.parametrize("k", [4096, 14336, 20480])
def test_gpu_quantize_rows_real_widths(k) -> None:
    """The quantizer at model widths, one pass (to 16K values) and two: the reference's bits,
    plain and with SiLU-and-mul on load."""
    x = torch.randn(64, k, device=DEV, dtype=BF16) * 4
    q, s = F8.quantize_rows_fp8(x)
    rq, rs = reference.quantize_rows_fp8(x)
    assert torch.equal(s, rs) and torch.equal(q.view(torch.uint8), rq.view(torch.uint8))
    gu = torch.randn(64, 2 * k, device=DEV, dtype=BF16) * 4
    q, s = F8.quantize_rows_fp8(gu, silu_mul=True)
    rq, rs = reference.quantize_rows_fp8(T.silu_and_mul(gu))
    assert torch.equal(s, rs) and torch.equal(q.view(torch.uint8), rq.view(torch.uint8))


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [17, 64, 100])
def test_gpu_fp8_norm_w8a8_chain_in_graph_is_exact(rows) -> None:
    """A layer's chain at W8A8 rows (the GEMV's W8A8 mode to 64, ``_scaled_mm`` past), the
    pre-norms quantizing in their kernels: captured with PDL and replayed on new inputs, bit for
    bit the chain launched plainly; and each norm + linear equals the norm kernel then
    ``fp8_linear``."""
    from graphrt.kernels.pdl import pdl_supported

    pdl = pdl_supported(DEV)
    chain, x, r, nw, (wqkv, wgu) = _layer_chain(rows)
    _check_replays_exactly(chain, [x, r], pdl)
    for w in (wqkv, wgu):
        y, res = F8.add_rms_norm_linear(x, r.clone(), nw, 1e-5, *w)
        hn, want_res = T.fused_add_rms_norm(x.clone(), r.clone(), nw, 1e-5)
        assert torch.equal(res, want_res) and torch.equal(y, F8.fp8_linear(hn, *w))


@pytest.mark.gpu
@pytest.mark.parametrize("fuse_norms", ["off", "auto"])
@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen2ForCausalLM"])
def test_gpu_fp8_model_graphs_equal_eager(tiny_model_factory, arch, fuse_norms) -> None:
    """An FP8 model (quantized at load) gives the same greedy ids from decode graphs as from
    eager steps, at batch sizes on every path (padded buckets included): the one-row GEMV, the
    few-row GEMV (3, 13, 16), and past 16 rows (21, 32) the split-K swapped GEMV beside W8A8
    for the gate/up projection (2 x 8192 columns: wide). Qwen2 adds the q/k/v bias."""
    from graphrt import Engine, SamplingParams
    from graphrt.models.fp8 import Fp8Weight

    d = tiny_model_factory(
        arch, initializer_range=0.3, hidden_size=256, intermediate_size=8192,
        num_attention_heads=4, head_dim=64,
    )  # fmt: skip
    buckets = (1, 2, 4, 8, 16, 24, 32)
    common = dict(show_progress=False, dtype="bfloat16", quantization="fp8", max_model_len=256,
                  overlap="off", fuse_norms=fuse_norms)  # fmt: skip
    graph = Engine(str(d), cuda_graph_batch_sizes=buckets, **common)
    eager = Engine(str(d), cuda_graph_max_bs=0, **common)
    try:
        assert graph.runner.ops.name == "triton" and graph.runner.graphs.captured
        assert isinstance(graph.runner.model.layers[0].down_proj, Fp8Weight)
        params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        g = torch.Generator().manual_seed(0)
        for n in (1, 3, 13, 16, 21, 32):
            prompts = [torch.randint(0, 256, (int(l),), generator=g).tolist()
                       for l in torch.randint(4, 60, (n,), generator=g)]  # fmt: skip
            before = graph.stats["graph_steps"]
            a = [o.outputs[0].token_ids for o in graph.generate(prompts, params)]
            b = [o.outputs[0].token_ids for o in eager.generate(prompts, params)]
            assert a == b, f"bs={n}"
            assert graph.stats["graph_steps"] > before
        assert eager.stats["graph_steps"] == 0
    finally:
        graph.shutdown()
        eager.shutdown()
