"""The RMSNorm folded into the GEMV that reads it (``add_rms_norm_linear``) against the composed
references (``fused_add_rms_norm`` or ``rms_norm``, then ``linear``) and the unfused Triton
kernels; on CUDA, real shapes, a PDL chain in a graph, and a model's greedy ids.

On CPU the kernel runs under ``TRITON_INTERPRET=1`` (set before triton is imported, as in
``test_kernels.py``). Numerics, and so the tolerances below:

- the new residual ``x + residual`` is formed and rounded exactly as ``fused_add_rms_norm``
  forms it: bit for bit against the reference in fp32, and in bf16 on a GPU; the interpreter
  truncates fp32 -> bf16 casts where torch rounds to nearest, so on CPU bf16 it is compared bit
  for bit with the standalone Triton kernel (same casts) and within one ulp with the reference;
- the normed input ``h`` is rounded at the standalone kernels' two points, but each kernel sums
  the fp32 squares in its own order (blocks of ``BLOCK_K`` here, one block of the whole row
  there), which can move ``s * rsqrt(...)`` across a rounding boundary: an element of ``h`` is
  then one ulp off. With one K block both sums are the same and the results are identical;
- the GEMV is ``linear``'s kernel (same config, same per-column order of the fp32 sums), so
  with ``h`` identical the output is too; against torch's matmul the output differs by its
  final rounding (bf16: 2^-8 relative, the interpreter's truncation 2^-7) and by the fp32
  order of the sums (~1e-6 relative). bf16 uses ``_tol`` (2e-2 absolute and relative: about
  two truncation ulps of outputs up to ~4, whose ulp is 2^-6), fp32 1e-5.
"""

from __future__ import annotations

import importlib
import os
import sys
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from graphrt.kernels import reference

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _kernel_modules():
    """Import the Triton modules, reloading any imported before the interpreter was enabled."""
    mods = []
    for name, probe in (("triton_ops", "_rms_norm_kernel"), ("triton_gemv", "_norm_gemv_kernel")):
        full = f"graphrt.kernels.{name}"
        mod = sys.modules.get(full) or importlib.import_module(full)
        if INTERPRET and type(getattr(mod, probe)).__name__ != "InterpretedFunction":
            mod = importlib.reload(mod)
        mods.append(mod)
    return mods


T, GEMV = _kernel_modules()

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BF16 = torch.bfloat16
EPS = 1e-6


@pytest.fixture(autouse=True)
def _seed(request: pytest.FixtureRequest) -> None:
    torch.manual_seed(zlib.crc32(request.node.name.encode()))


def _tol(dtype: torch.dtype) -> tuple[float, float]:
    return (1e-5, 1e-5) if dtype == torch.float32 else (2e-2, 2e-2)


def _close(out: torch.Tensor, ref: torch.Tensor, atol: float, rtol: float) -> None:
    assert not out.isnan().any(), "output has unwritten (NaN) elements"
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)


def _case(m: int, n: int, k: int, dtype: torch.dtype, residual: bool):
    x = torch.randn(m, k, device=DEV).to(dtype)
    r = torch.randn(m, k, device=DEV).to(dtype) if residual else None
    nw = (1 + 0.1 * torch.randn(k, device=DEV)).to(dtype)
    w = (torch.randn(n, k, device=DEV) / k**0.5).to(dtype)
    b = torch.randn(n, device=DEV).to(dtype)
    return x, r, nw, w, b


def _unfused_triton(x, r, nw, w, b, cfg):
    """The two Triton kernels the fused one replaces, on copies (the norm works in place)."""
    if r is None:
        h, s = T.rms_norm(x, nw, EPS), x
    else:
        h, s = T.fused_add_rms_norm(x.clone(), r.clone(), nw, EPS)
    return GEMV.gemv(h, w, b, cfg), s


def _skip_interpreted_bf16_dot(m: int, dtype: torch.dtype) -> None:
    if m > 1 and dtype == BF16 and INTERPRET:
        pytest.skip("interpreter's bf16 tl.dot is wrong (the m > 1 path is a dot)")


# ---- the kernel ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize(("n", "k", "block_n", "block_k"), [(64, 128, 8, 32), (40, 56, 16, 32)])
def test_norm_gemv(m, n, k, block_n, block_k, residual, dtype) -> None:
    """Even and ragged (masked N and K tails) shapes, with and without a residual and a bias.
    Outputs are poisoned and sit in buffers with poisoned rows after them: every element is
    written (the new residual by program 0 alone), nothing past the rows, inputs untouched."""
    _skip_interpreted_bf16_dot(m, dtype)
    x, r, nw, w, b = _case(m, n, k, dtype, residual)
    cfg = GEMV.GemvConfig(block_n=block_n, block_k=block_k, num_warps=4, num_stages=2)
    x0, r0 = x.clone(), (r.clone() if residual else None)
    for bias in (None, b):
        ref_y, ref_s = reference.add_rms_norm_linear(x, r, nw, EPS, w, bias)
        out = torch.full((m + 2, n), float("nan"), device=DEV, dtype=dtype)
        res = torch.full((m + 2, k), float("nan"), device=DEV, dtype=dtype)
        GEMV.launch_norm_gemv(x, r, nw, w, bias, out[:m], res[:m], EPS, cfg, False)
        _close(out[:m], ref_y, *_tol(dtype))
        assert out[m:].isnan().all()
        if residual:
            assert not res[:m].isnan().any() and res[m:].isnan().all()
            if dtype == torch.float32 or not INTERPRET:
                assert torch.equal(res[:m], ref_s)
            else:
                _close(res[:m], ref_s, 0, 2**-7)  # the interpreter truncates fp32 -> bf16
            assert torch.equal(res[:m], _unfused_triton(x, r, nw, w, bias, cfg)[1])
        else:
            assert res.isnan().all()  # nothing to write: the new residual is x
        y, s = GEMV.norm_gemv(x, r, nw, EPS, w, bias, cfg)
        assert torch.equal(y, out[:m])
        assert (s is x) if not residual else torch.equal(s, res[:m])
        assert torch.equal(x, x0) and (not residual or torch.equal(r, r0))


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("m", [1, 3])
def test_norm_gemv_equals_unfused_kernels(m, residual, dtype) -> None:
    """Against the norm kernel then the GEMV with the same config: with one K block both kernels
    sum the squares in the same order, so the results are identical bit for bit (which checks
    every rounding point); with several blocks the sums' order differs (the module docstring)."""
    _skip_interpreted_bf16_dot(m, dtype)
    n = 48
    for k, block_k in ((64, 64), (128, 32)):
        x, r, nw, w, b = _case(m, n, k, dtype, residual)
        cfg = GEMV.GemvConfig(block_n=16, block_k=block_k, num_warps=4, num_stages=2)
        y, s = GEMV.norm_gemv(x, r, nw, EPS, w, b, cfg)
        y_ref, s_ref = _unfused_triton(x, r, nw, w, b, cfg)
        assert torch.equal(s, s_ref)
        if k == block_k and INTERPRET:
            # Compiled, the order of a sum also depends on the warp count, which differs.
            assert torch.equal(y, y_ref)
        else:
            _close(y, y_ref, *_tol(dtype))


def test_norm_gemv_rejects_mismatched_shapes() -> None:
    x, r, nw, w, _ = _case(1, 32, 64, torch.float32, True)
    cfg = GEMV.GemvConfig(8, 32, 4, 2)
    with pytest.raises(ValueError, match="does not match"):
        GEMV.norm_gemv(x, r, nw[:32], EPS, w, None, cfg)
    with pytest.raises(ValueError, match="residual"):
        GEMV.norm_gemv(x, r.expand(2, 64), nw, EPS, w, None, cfg)


# ---- one pass: the norm's factor after the sum, bf16 or FP8 weights -----------------------------


def _one_pass_weight(w: torch.Tensor, kind: str):
    """(weight, row scales or None, the float64 weight the kernel multiplies by)."""
    if kind == "fp8":
        from graphrt.models.fp8 import quantize_fp8

        q, sc = quantize_fp8(w.float())
        return q, sc, q.double() * sc.double()[:, None]
    return w, None, w.double()


def _one_pass_exact(s, nw, w64, b):
    """float64 of ``norm_gemv_one_pass`` from its rounded new residual ``s`` (the interpreter
    truncates it, so it is taken from the kernel): the product over the exact normed row, and
    the magnitudes that bound its fp32 sums' rounding."""
    s64 = s.double()
    h = s64 * torch.rsqrt(s64.pow(2).mean(dim=1, keepdim=True) + EPS) * nw.double()
    bias = 0 if b is None else b.double()
    return h @ w64.T + bias, h.abs() @ w64.abs().T + (0 if b is None else b.double().abs())


@pytest.mark.parametrize("kind", ["fp32", "bf16", "fp8"])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize(("n", "k", "block_n", "block_k"), [(64, 128, 8, 32), (40, 56, 16, 32)])
def test_norm_gemv_one_pass(n, k, block_n, block_k, residual, kind) -> None:
    """Against float64 over the rounded new residual: the output rounds once (one ulp: the
    interpreter truncates), the fp32 sums and the fp32 factor add ``K 2^-22`` of the
    magnitudes. The new residual is the standalone norm kernel's, bit for bit; the inputs are
    left as they were."""
    dtype = torch.float32 if kind == "fp32" else BF16
    x, r, nw, w, b = _case(1, n, k, dtype, residual)
    wt, scale, w64 = _one_pass_weight(w, kind)
    cfg = GEMV.GemvConfig(block_n, block_k, 4, 2)
    for bias in (None, b):
        x0, r0 = x.clone(), (None if r is None else r.clone())
        y, s = GEMV.norm_gemv_one_pass(x, r, nw, EPS, wt, scale, bias, cfg)
        assert torch.equal(x, x0) and (r is None or torch.equal(r, r0))
        assert y.dtype == dtype and y.shape == (1, n)
        if r is None:
            assert s is x
        else:
            assert torch.equal(s, T.fused_add_rms_norm(x.clone(), r.clone(), nw, EPS)[1])
        exact, mag = _one_pass_exact(s, nw, w64, bias)
        tol = torch.finfo(dtype).eps * exact.abs() + k * 2.0**-22 * mag
        excess = (y.double() - exact).abs() - tol
        assert not y.isnan().any() and (excess <= 0).all(), f"worst by {excess.max().item():.3g}"


def test_norm_gemv_one_pass_rejects_what_it_cannot_run() -> None:
    x, r, nw, w, _ = _case(2, 32, 64, torch.float32, True)
    cfg = GEMV.GemvConfig(8, 32, 4, 2)
    with pytest.raises(ValueError, match="one row"):
        GEMV.norm_gemv_one_pass(x, r, nw, EPS, w, None, None, cfg)
    with pytest.raises(ValueError, match="does not match"):
        GEMV.norm_gemv_one_pass(x[:1], r[:1], nw[:32], EPS, w, None, None, cfg)
    with pytest.raises(ValueError, match="residual"):
        GEMV.norm_gemv_one_pass(x[:1], r, nw, EPS, w, None, None, cfg)
    with pytest.raises(ValueError, match="row scales"):
        GEMV.norm_gemv_one_pass(x[:1], r[:1], nw, EPS, w, torch.ones(31), None, cfg)


# ---- the op and its dispatch --------------------------------------------------------------------


def test_add_rms_norm_linear_dispatch() -> None:
    """The fused kernel runs exactly where ``linear`` would run the GEMV (shapes and dtypes
    only); elsewhere the norm and ``linear`` run apart. Both equal the reference."""
    n, k = 512, 64
    x, r, nw, w, b = _case(1, n, k, torch.float32, True)
    cfg = GEMV.norm_gemv_config(x, r, nw, w, b)
    assert cfg is not None and cfg == GEMV.gemv_config(1, n, k)
    assert GEMV.norm_gemv_config(x, None, nw, w, None) == cfg
    assert GEMV.norm_gemv_config(x.expand(GEMV.GEMV_MAX_ROWS + 1, k), None, nw, w, b) is None
    assert GEMV.norm_gemv_config(x, r, nw.to(BF16), w, b) is None  # one dtype only
    assert GEMV.norm_gemv_config(x, r, nw, w, b.to(BF16)) is None
    assert GEMV.norm_gemv_config(x[None], r[None], nw, w, b) is None  # 2-D only
    assert GEMV.norm_gemv_config(x, r, nw, w[:64], b[:64]) is None  # too few columns
    assert GEMV.norm_gemv_config(x.expand(4, k), r.expand(4, k), nw, w, b) is None  # cuBLAS rows

    calls = []
    fused = GEMV.norm_gemv

    def spy(*a, **kw):
        calls.append(a[0].shape[0])
        return fused(*a, **kw)

    mp = pytest.MonkeyPatch()
    mp.setattr(GEMV, "norm_gemv", spy)
    try:
        for m in (1, 3, GEMV.GEMV_MAX_ROWS + 1):
            for res in (True, False):
                x, r, nw, w, b = _case(m, n, k, torch.float32, res)
                x0, r0 = x.clone(), (r.clone() if res else None)
                ref_y, ref_s = reference.add_rms_norm_linear(x0, r0, nw, EPS, w, b)
                y, s = GEMV.add_rms_norm_linear(x, r, nw, EPS, w, b)
                _close(y, ref_y, 1e-5, 1e-5)
                assert torch.equal(s, ref_s)
                if not res:
                    assert s is x
    finally:
        mp.undo()
    assert calls == [1, 1]  # one row: fused; 3 and 9 rows: the norm kernel, then cuBLAS


def test_ops_bundles_have_add_rms_norm_linear() -> None:
    from graphrt.kernels.ops import make_ops

    assert make_ops("torch").add_rms_norm_linear is reference.add_rms_norm_linear
    # The engine's default: the norm kernel, then linear (the fused kernel measured slower).
    assert make_ops("triton").add_rms_norm_linear is GEMV.composed_add_rms_norm_linear
    assert make_ops("triton", fuse_norms="off").add_rms_norm_linear is (
        GEMV.composed_add_rms_norm_linear
    )
    ops = make_ops("triton", fuse_norms="on")
    assert ops.add_rms_norm_linear is GEMV.add_rms_norm_linear
    x, r, nw, w, b = _case(1, 512, 64, torch.float32, True)
    y, s = ops.add_rms_norm_linear(x, r, nw, EPS, w, b)
    ref_y, ref_s = reference.add_rms_norm_linear(x, r, nw, EPS, w, b)
    _close(y, ref_y, 1e-5, 1e-5)
    assert torch.equal(s, ref_s)


def test_reference_composes_the_unfused_ops() -> None:
    """The torch bundle's op is exactly the two calls a layer made before it existed."""
    x, r, nw, w, b = _case(3, 40, 24, torch.float32, True)
    y, s = reference.add_rms_norm_linear(x, r, nw, EPS, w, b)
    h, s_ref = reference.fused_add_rms_norm(x, r, nw, EPS)
    assert torch.equal(s, s_ref) and torch.equal(y, reference.linear(h, w, b))
    y, s = reference.add_rms_norm_linear(x, None, nw, EPS, w, None)
    assert s is x and torch.equal(y, reference.linear(reference.rms_norm(x, nw, EPS), w))


# ---- a model ------------------------------------------------------------------------------------

# qkv (4 x 64 + 2 x 2 x 64 = 512 columns) and gate/up (1,024) are wide enough for the GEMV.
GEMV_MODEL = dict(
    hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
    head_dim=64, initializer_range=0.3,
)  # fmt: skip


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"])
def test_model_decode_through_fused_op_matches_torch_on_cpu(tiny_model_factory, arch) -> None:
    """The "triton" bundle's path end to end on CPU, interpreted (the runner picks "torch" off
    CUDA, so the test swaps the bundle in): one-row decode steps run every layer's two
    pre-norms through the fused kernel (Qwen2: with the qkv bias; Qwen3: with q/k norms after
    it), and fp32 greedy ids and logprobs equal the torch bundle's. The launch config is made
    wide so the interpreter runs few programs; the dispatch rule is the real one."""
    if DEV.type == "cuda":
        pytest.skip("on CUDA, test_gpu_model_fused_equals_unfused runs the real kernels")
    import graphrt.runner
    from graphrt import Engine, SamplingParams
    from graphrt.kernels import ops as ops_mod

    d = tiny_model_factory(arch, **GEMV_MODEL)
    real_config, real_fused = GEMV.norm_gemv_config, GEMV.norm_gemv
    rows = []

    def wide(*a):
        cfg = real_config(*a)
        return None if cfg is None else GEMV.GemvConfig(64, cfg.block_k, 4, 2)

    def spy(*a, **kw):
        rows.append(a[0].shape[0])
        return real_fused(*a, **kw)

    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=2)
    prompts = [[5, 17, 99, 3, 200, 45, 7], [1, 2, 3]]
    outs = {}
    mp = pytest.MonkeyPatch()
    mp.setattr(GEMV, "norm_gemv_config", wide)
    mp.setattr(GEMV, "norm_gemv", spy)
    try:
        for impl in ("torch", "triton"):
            mp.setattr(
                graphrt.runner,
                "make_ops",
                lambda _, pdl=False, fuse_norms="auto", i=impl: ops_mod.make_ops(
                    i, fuse_norms="on"
                ),
            )
            eng = Engine(
                str(d), show_progress=False, device="cpu", max_model_len=64, max_num_seqs=1
            )
            assert eng.runner.ops.name == impl
            outs[impl] = [o.outputs[0] for o in eng.generate(prompts, params)]
            eng.shutdown()
    finally:
        mp.undo()
    # Two prompts, one at a time: 3 one-row decode steps each, two fused ops per layer.
    assert rows == [1] * (2 * 3 * 2 * 2)
    for a, b in zip(outs["triton"], outs["torch"]):
        assert a.token_ids == b.token_ids
        assert a.cumulative_logprob == pytest.approx(b.cumulative_logprob, abs=1e-4)


# ---- GPU: real shapes, PDL in a graph, a model's greedy ids ------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("m", "n", "k", "cfg"),
    [
        (1, 3072, 2048, None),  # Llama-3.2-1B qkv, gate/up
        (1, 16384, 2048, None),
        (1, 6144, 4096, None),  # Llama-3.1-8B qkv, gate/up
        (1, 28672, 4096, None),
        (4, 32768, 2048, None),  # several rows: the dispatch fuses only this wide
        (3, 6144, 4096, GEMV.GemvConfig(16, 256, 4, 4)),
    ],
)
def test_gpu_norm_gemv_real_shapes(m, n, k, cfg) -> None:
    """Compiled bf16 rounds as torch does, so the new residual equals the reference bit for bit.
    Against the unfused kernels (norm, then the GEMV with the same config) an output moves only
    where an element of h moved by an ulp (about 2^-8 / sqrt(K) of the output, so it crosses a
    bf16 rounding boundary rarely) or where the sums' layout differs (fp32 order, rarer still):
    at least 90% of outputs are identical."""
    x, r, nw, w, b = _case(m, n, k, BF16, True)
    cfg = cfg or GEMV.norm_gemv_config(x, r, nw, w, b)
    assert cfg is not None
    for res in (r, None):
        ref_y, ref_s = reference.add_rms_norm_linear(x, res, nw, EPS, w, b)
        y, s = GEMV.norm_gemv(x, res, nw, EPS, w, b, cfg)
        assert torch.equal(s, ref_s)
        _close(y, ref_y, 2e-2, 2e-2)
        y_unfused, _ = _unfused_triton(x, res, nw, w, b, cfg)
        same = (y == y_unfused).float().mean().item()
        assert same >= 0.9, f"only {same:.1%} of outputs equal the unfused kernels'"


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["bf16", "fp8"])
@pytest.mark.parametrize(("n", "k"), [(3072, 2048), (16384, 2048), (6144, 4096), (28672, 4096)])
def test_gpu_norm_gemv_one_pass_real_shapes(n, k, kind) -> None:
    """The one-pass kernel at Llama-3.2-1B's and Llama-3.1-8B's qkv and gate/up shapes, at its
    dispatched FP8 config and the other one-row configs, against float64 over its rounded new
    residual (which equals the reference's bit for bit: compiled bf16 rounds as torch does).
    The output rounds once to nearest (half an ulp; one allowed) and the fp32 sums add
    ``K 2^-22`` of the magnitudes."""
    from graphrt.kernels import triton_fp8 as F8

    x, r, nw, w, b = _case(1, n, k, BF16, True)
    wt, scale, w64 = _one_pass_weight(w, kind)
    cfgs = {F8.fp8_norm_gemv_config(1, n, k), F8.NORM_ONE_ROW_NARROW, F8.NORM_ONE_ROW,
            F8.NORM_ONE_ROW_WIDE}  # fmt: skip
    for cfg in cfgs:
        for res, bias in ((r, None), (None, b)):
            y, s = GEMV.norm_gemv_one_pass(x, res, nw, EPS, wt, scale, bias, cfg, pdl=True)
            if res is not None:
                assert torch.equal(s, reference.fused_add_rms_norm(x, res, nw, EPS)[1])
            exact, mag = _one_pass_exact(s, nw, w64, bias)
            tol = torch.finfo(BF16).eps * exact.abs() + k * 2.0**-22 * mag
            excess = (y.double() - exact).abs() - tol
            assert not y.isnan().any() and (excess <= 0).all(), f"{cfg}: {excess.max().item():.3g}"
    if kind == "fp8":  # the dispatch runs the same kernel at its config
        y, _ = F8.add_rms_norm_linear(x, r, nw, EPS, wt, scale)
        cfg = F8.fp8_norm_gemv_config(1, n, k)
        assert torch.equal(y, GEMV.norm_gemv_one_pass(x, r, nw, EPS, wt, scale, None, cfg)[0])


@pytest.mark.gpu
def test_gpu_norm_gemv_pdl_chain_in_graph_is_exact() -> None:
    """One decode row through a chain where fused norm + GEMV kernels write the residual (from
    program 0) and the very next kernel reads it (a norm, in place), and a later fused kernel
    reads a residual written two launches before, launched with PDL and replayed from a graph:
    bit-identical to the chain launched plainly. Each kernel's pdl_wait returns only once the
    whole grid before it has completed, so program 0's stores are visible."""
    from graphrt.kernels.pdl import pdl_supported

    if not pdl_supported(DEV):
        pytest.skip("PDL needs sm_90")
    h, q, inter, vocab = 2048, 3072, 8192, 32768
    g = torch.Generator(device=DEV).manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, device=DEV, generator=g) * scale).to(BF16)

    nw = (1 + 0.1 * torch.randn(h, device=DEV, generator=g)).to(BF16)
    w_qkv, w_o = rnd(q, h, scale=h**-0.5), rnd(h, h, scale=h**-0.5)
    w_gu, w_dn = rnd(2 * inter, h, scale=h**-0.5), rnd(h, inter, scale=inter**-0.5)
    w_lm = rnd(vocab, h, scale=h**-0.5)
    x, r, z = rnd(1, h), rnd(1, h), rnd(1, h)

    def chain(pdl: bool) -> list[torch.Tensor]:
        zc = z.clone()
        qkv, s1 = GEMV.add_rms_norm_linear(x, r, nw, EPS, w_qkv, pdl=pdl)
        hs, s1 = T.fused_add_rms_norm(zc, s1, nw, EPS, pdl=pdl)  # reads s1 right away
        o = GEMV.linear(qkv[:, :h], w_o, pdl=pdl)
        gu, s2 = GEMV.add_rms_norm_linear(o, s1, nw, EPS, w_gu, pdl=pdl)
        d = GEMV.silu_mul_linear(gu, w_dn, pdl=pdl)
        first, s3 = GEMV.add_rms_norm_linear(d, s2, nw, EPS, w_qkv, pdl=pdl)  # s2: 2 launches ago
        hs, _ = T.fused_add_rms_norm(GEMV.linear(first[:, :h], w_o, pdl=pdl), s3, nw, EPS, pdl=pdl)
        return [qkv, gu, first, hs, GEMV.linear(hs, w_lm, pdl=pdl)]

    ref = chain(False)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        chain(True)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = chain(True)
    for _ in range(3):
        for o in outs:
            o.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        for o, want in zip(outs, ref):
            assert torch.equal(o, want)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"])
def test_gpu_model_fused_equals_unfused(tiny_model_factory, monkeypatch, arch) -> None:
    """bf16, the real dispatch: one-row decode steps run the fused kernel, in graphs (with PDL
    where the GPU has it) and eagerly, and give the greedy ids of each other and of engines with
    the fused op swapped for the two kernels it replaces; logprobs stay within bf16 noise."""
    from graphrt import Engine, SamplingParams

    gemv = importlib.import_module("graphrt.kernels.triton_gemv")  # the module make_ops binds
    d = tiny_model_factory(arch, **GEMV_MODEL)
    rows: list[int] = []
    real_fused = gemv.norm_gemv

    def spy(*a, **kw):
        rows.append(a[0].shape[0])
        return real_fused(*a, **kw)

    monkeypatch.setattr(gemv, "norm_gemv", spy)
    # The engine leaves bf16 norms unfused by default ("auto"); "on" runs them fused.
    common = dict(show_progress=False, dtype="bfloat16", max_model_len=256, max_num_seqs=4)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)
    prompts = [[5, 17, 99, 3, 200, 45, 7], list(range(40, 100)), [1, 2, 3]]

    def run(**kw) -> list:
        eng = Engine(str(d), **common, **kw)
        # One prompt at a time (one-row decode steps), then all together (3 rows: unfused).
        outs = [o.outputs[0] for p in prompts for o in eng.generate([p], params)]
        outs += [o.outputs[0] for o in eng.generate(prompts, params)]
        eng.shutdown()
        return outs

    graph = run(cuda_graph_batch_sizes=(1, 2, 4), fuse_norms="on")
    eager = run(cuda_graph_max_bs=0, fuse_norms="on")
    assert rows and set(rows) == {1}
    rows.clear()
    unfused = run(cuda_graph_batch_sizes=(1, 2, 4))
    assert not rows
    for g, e, u in zip(graph, eager, unfused):
        assert g.token_ids == e.token_ids == u.token_ids
        assert g.cumulative_logprob == pytest.approx(u.cumulative_logprob, abs=0.08)
