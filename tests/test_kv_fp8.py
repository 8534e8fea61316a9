"""The FP8 KV cache (``kv_cache_dtype="fp8_e4m3"``, issue #21's second part).

An e4m3 cache holds ``K / k_scale`` and ``V / v_scale`` with one fp32 scale per layer each. The
write (``rope_and_store_kv``) must give the bits of :func:`reference.quantize_kv`; the Triton
decode and extend kernels must equal the torch backend reading the same cache (both dequantize
the same values; only the order of fp32 arithmetic differs). On CPU the Triton kernels run
under ``TRITON_INTERPRET=1`` (set by conftest); the ``gpu`` tests run them compiled, in bf16, at
Llama-3.1-8B's heads and inside the engine's graphs.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

from graphrt import Engine, EngineConfig, SamplingParams
from graphrt.kernels import reference
from graphrt.kernels import torch_attention as ta
from graphrt.kernels import triton_attention as A
from graphrt.kernels import triton_ops as T
from graphrt.kernels.attention_backend import AttentionSpec, AttnInputs, get_backend_class

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FP8 = torch.float8_e4m3fn
SMALL_CFG = A.TritonAttentionConfig(
    decode_block_n=16, decode_block_n_fp8=16, extend_block_m=16, extend_block_n=16
)
# Scales that are not powers of two, so a scale applied twice, not at all, or to the wrong one of
# K and V shows.
KV_SCALE = (0.0173, 0.0411)


@pytest.fixture(autouse=True)
def _seed(request: pytest.FixtureRequest) -> None:
    torch.manual_seed(zlib.crc32(request.node.name.encode()))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


# ---- the write ----------------------------------------------------------------------------------


def test_quantize_kv_rounds_and_saturates() -> None:
    scale = torch.tensor(0.5)
    x = torch.tensor([0.0, 1.0, -3.3, 224.0, 1e4, -1e4, 2**-12])
    q = reference.quantize_kv(x, scale)
    assert q.dtype == FP8
    back = reference.dequantize_kv(q, scale)
    # Beyond +-448 * scale the value saturates (torch's cast alone would give NaN).
    assert back.tolist()[3:6] == [224.0, 224.0, -224.0]
    assert not back.isnan().any()
    # In e4m3's normal range the error is at most half an ulp: 2^-4 relative.
    y = torch.randn(4096) * 10
    err = (reference.dequantize_kv(reference.quantize_kv(y, scale), scale) - y).abs()
    assert bool((err <= y.abs() * 2**-4 + 2**-10).all())
    # A model-dtype cache is read as it is.
    assert torch.equal(reference.dequantize_kv(y, None), y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("hq", "hkv", "dim"), [(8, 2, 32), (7, 1, 24)])
def test_rope_and_store_kv_writes_e4m3_bits(hq, hkv, dim, dtype) -> None:
    """The Triton write stores quantize_kv of its own rotated K (which test_kernels checks
    against the reference's rope) and of V, bit for bit; the reference store does the same."""
    t, rows = 5, 64
    qkv = (torch.randn(t, (hq + 2 * hkv) * dim, device=DEV) * 3).to(dtype)
    q, k, v = (x.view(t, -1, dim) for x in qkv.split([hq * dim, hkv * dim, hkv * dim], dim=-1))
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2, device=DEV).float() / dim))
    freqs = torch.outer(torch.arange(512, device=DEV).float(), inv)
    cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
    pos = torch.randint(0, 512, (t,), device=DEV)
    locs = torch.randperm(rows, device=DEV)[:t]
    scale = torch.tensor(KV_SCALE, device=DEV)
    kc = torch.full((rows, hkv, dim), 0x7F, dtype=torch.uint8, device=DEV).view(FP8)  # NaN
    vc = kc.clone()
    _, k_out = T.rope_and_store_kv(q, k, v, pos, cos_sin, kc, vc, locs, scale)
    assert torch.equal(_bits(kc[locs]), _bits(reference.quantize_kv(k_out, scale[0])))
    assert torch.equal(_bits(vc[locs]), _bits(reference.quantize_kv(v, scale[1])))
    untouched = torch.ones(rows, dtype=torch.bool, device=DEV)
    untouched[locs] = False
    assert bool((_bits(kc[untouched]) == 0x7F).all()), "wrote outside its rows"
    # The reference writes the same bits from the same rotated K.
    kr, vr = torch.zeros_like(kc), torch.zeros_like(vc)
    reference.store_kv(k_out, v, kr, vr, locs, scale)
    assert torch.equal(_bits(kr[locs]), _bits(kc[locs]))
    assert torch.equal(_bits(vr[locs]), _bits(vc[locs]))


def test_fp8_cache_without_scales_is_refused() -> None:
    kc = torch.zeros(8, 1, 16, dtype=FP8, device=DEV)
    x = torch.randn(1, 1, 16, device=DEV)
    locs = torch.zeros(1, dtype=torch.int64, device=DEV)
    with pytest.raises(ValueError, match="kv_scale"):
        reference.store_kv(x, x, kc, kc.clone(), locs)
    with pytest.raises(ValueError, match="kv_scale"):
        A.paged_decode_attention(
            x, kc.view(8, 1, 1, 16), kc.view(8, 1, 1, 16),
            torch.zeros(1, 1, dtype=torch.int32, device=DEV),
            torch.ones(1, dtype=torch.int32, device=DEV), 0.25, 1,
        )  # fmt: skip


# ---- attention ----------------------------------------------------------------------------------


class Fp8Paged:
    """Rows of random K/V quantized into an e4m3 paged cache in shuffled pages; pages no row owns
    hold e4m3 NaN, and the dummy page 0 and the slots past each row's length large finite
    values (the references read them, masked)."""

    def __init__(self, seq_lens: list[int], hkv: int, dim: int, page_size: int) -> None:
        counts = [-(-n // page_size) for n in seq_lens]
        total = sum(counts) + 4
        self.width = max(max(counts), 1) + 1
        shape = (total, page_size, hkv, dim)
        self.k = torch.full(shape, 0x7F, dtype=torch.uint8, device=DEV).view(FP8)
        self.v = self.k.clone()
        self.scale = torch.tensor(KV_SCALE, device=DEV)
        self.k[0] = 448.0
        self.v[0] = -448.0
        perm = (torch.randperm(total - 1) + 1).tolist()
        self.page_rows = torch.zeros(len(seq_lens), self.width, dtype=torch.int32, device=DEV)
        for b, (n, c) in enumerate(zip(seq_lens, counts)):
            pages = torch.tensor([perm.pop() for _ in range(c)], dtype=torch.long, device=DEV)
            self.page_rows[b, :c] = pages.to(torch.int32)
            for cache, s in ((self.k, self.scale[0]), (self.v, self.scale[1])):
                vals = torch.randn(c * page_size, hkv, dim, device=DEV) * 200 * s
                vals[n:] = 1e4
                q = reference.quantize_kv(vals, s).view(c, page_size, hkv, dim)
                cache.view(torch.uint8)[pages] = q.view(torch.uint8)
        self.seq_lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEV)


def _close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert not out.isnan().any(), "output has unwritten (NaN) elements"
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


# The interpreter's bf16 tl.dot is wrong (tests/test_kernels.py), so CPU runs fp32 only.
DTYPES = [torch.float32] + ([torch.bfloat16] if DEV.type == "cuda" else [])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize(("hq", "hkv", "page_size"), [(8, 2, 16), (7, 1, 1)])
def test_decode_attention_over_fp8_cache(hq, hkv, page_size, splits, dtype) -> None:
    dim = 32
    paged = Fp8Paged([1, 37, 70], hkv, dim, page_size)
    q = torch.randn(3, hq, dim, device=DEV).to(dtype)
    ref = ta.paged_decode_attention(
        q, paged.k, paged.v, paged.page_rows, paged.seq_lens, paged.width * page_size,
        dim**-0.5, paged.scale,
    )  # fmt: skip
    out = A.paged_decode_attention(
        q, paged.k, paged.v, paged.page_rows, paged.seq_lens, dim**-0.5, splits,
        config=SMALL_CFG, kv_scale=paged.scale,
    )  # fmt: skip
    _close(out, ref, dtype)
    # Both scales are applied: the result is not the attention over the raw e4m3 values.
    raw = ta.paged_decode_attention(
        q, paged.k.float(), paged.v.float(), paged.page_rows, paged.seq_lens,
        paged.width * page_size, dim**-0.5,
    )  # fmt: skip
    assert not torch.allclose(out.float(), raw.float(), atol=1e-2)


EXTEND_ROWS = [(6, 6), (5, 41), (1, 19), (0, 3), (20, 22), (3, 150)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("hq", "hkv", "page_size"), [(8, 2, 16), (7, 1, 1)])
def test_extend_attention_over_fp8_cache(hq, hkv, page_size, dtype) -> None:
    dim = 32
    q_lens, seq_lens = [n for n, _ in EXTEND_ROWS], [s for _, s in EXTEND_ROWS]
    paged = Fp8Paged(seq_lens, hkv, dim, page_size)
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    q = torch.randn(int(cu[-1]), hq, dim, device=DEV).to(dtype)
    ref = ta.paged_extend_attention(
        q, paged.k, paged.v, paged.page_rows, seq_lens, cu.tolist(), dim**-0.5, paged.scale
    )
    cu_t = torch.from_numpy(cu).to(DEV)
    for max_q in (max(q_lens), None):  # the host-sized grid, and the static (capturable) one
        out = A.paged_extend_attention(
            q, paged.k, paged.v, paged.page_rows, paged.seq_lens, cu_t, max_q, dim**-0.5,
            config=SMALL_CFG, kv_scale=paged.scale,
        )  # fmt: skip
        _close(out, ref, dtype)


def test_triton_backend_reads_each_layers_scales() -> None:
    """Through the backend: layer 1's scales, not layer 0's, on the decode and mixed paths."""
    hq, hkv, dim, ps = 8, 2, 32, 16
    paged = Fp8Paged([33, 5, 90], hkv, dim, ps)
    scales = torch.tensor([[1.0, 1.0], list(KV_SCALE)], device=DEV)
    spec = AttentionSpec(hq, hkv, dim, ps, paged.width, dim**-0.5, torch.float32, DEV)
    be = A.TritonAttentionBackend(
        spec, [paged.k.clone(), paged.k], [paged.v.clone(), paged.v], scales, config=SMALL_CFG
    )
    bound = paged.width * ps
    q = torch.randn(3, hq, dim, device=DEV)
    ref = ta.paged_decode_attention(
        q, paged.k, paged.v, paged.page_rows, paged.seq_lens, bound, dim**-0.5, paged.scale
    )
    inputs = AttnInputs(True, paged.seq_lens, paged.page_rows, bound)
    _close(be.forward(q, 1, be.prepare_metadata(inputs)), ref, torch.float32)
    be.init_capture_graph(max_bs=4)
    cu = torch.arange(4, dtype=torch.int32, device=DEV)  # one token a row
    mixed = AttnInputs(False, paged.seq_lens, paged.page_rows, bound, cu_q=cu)
    _close(be.forward(q, 1, be.prepare_for_mixed(mixed, capture=True)), ref, torch.float32)


def test_backends_check_fp8_caches() -> None:
    spec = AttentionSpec(4, 2, 16, 16, 4, 0.25, torch.float32, DEV)
    k = [torch.zeros(4, 16, 2, 16, dtype=FP8, device=DEV)]
    with pytest.raises(ValueError, match=r"\[1, 2\] kv_scales"):
        A.TritonAttentionBackend(spec, k, k)
    # flashinfer refuses before it looks for its package.
    with pytest.raises(ValueError, match="cannot read an FP8 KV cache"):
        get_backend_class("flashinfer")(spec, k, k, torch.ones(1, 2, device=DEV))
    # A cache in the model's dtype ignores scales.
    bf = [torch.zeros(4, 16, 2, 16, device=DEV)]
    assert ta.TorchAttentionBackend(spec, bf, bf, torch.ones(1, 2)).kv_scale(0) is None


# ---- the setting and the engine -----------------------------------------------------------------


def test_kv_cache_dtype_setting() -> None:
    assert EngineConfig().kv_cache_dtype == "auto"
    assert EngineConfig(kv_cache_dtype="fp8").kv_cache_dtype == "fp8"
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        EngineConfig(kv_cache_dtype="fp8_e5m2")


def test_flashinfer_with_fp8_cache_refused_before_loading(tiny_model_factory) -> None:
    d = tiny_model_factory("LlamaForCausalLM")
    with pytest.raises(ValueError, match="kv_cache_dtype='fp8' needs attention_backend"):
        Engine(str(d), kv_cache_dtype="fp8", attention_backend="flashinfer", show_progress=False)


def _run(model_dir, prompts, **kw):
    eng = Engine(
        str(model_dir), show_progress=False, device="cpu", max_model_len=128,
        max_num_batched_tokens=32, max_num_seqs=4, **kw,
    )  # fmt: skip
    try:
        params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=2)
        outs = [o.outputs[0] for o in eng.generate(prompts, params)]
        return outs, eng.runner.kv_spec.bytes_per_page, eng.runner.kv.k[0].dtype, dict(eng.stats)
    finally:
        eng.shutdown()


PROMPTS = [list(range(3, 40)), [7, 8, 9], list(range(50, 70)), [11] * 5]


def test_engine_fp8_cache_triton_matches_torch_on_cpu(tiny_model_factory) -> None:
    """End to end with an FP8 cache: the model's writes and both backends' reads, with chunked
    prefills sharing steps with decode rows (32-token budget). The Triton backend (interpreted,
    the GPU's mixed path) and the torch backend read the same e4m3 values; fp32 greedy ids and
    logprobs must match. A page takes a quarter of the fp32 cache's bytes."""
    if DEV.type == "cuda":
        pytest.skip("on CUDA, test_gpu_engine_fp8_cache checks the captured graphs")
    d = tiny_model_factory("Qwen2ForCausalLM", num_attention_heads=4, num_key_value_heads=2)
    torch_out, page8, dt, _ = _run(d, PROMPTS, attention_backend="torch", kv_cache_dtype="fp8")
    tri_out, _, _, stats = _run(d, PROMPTS, attention_backend="triton", kv_cache_dtype="fp8")
    _, page32, dt32, _ = _run(d, PROMPTS[:1], attention_backend="torch")
    assert dt == FP8 and dt32 == torch.float32
    assert 4 * page8 == page32
    assert stats["mixed_graph_steps"] > 2
    for a, b in zip(tri_out, torch_out):
        assert a.token_ids == b.token_ids
        assert a.cumulative_logprob == pytest.approx(b.cumulative_logprob, abs=1e-4)


def test_engine_fp8_cache_prefix_hits_give_the_same_tokens(tiny_model_factory) -> None:
    """Pages of an FP8 cache are reused by the prefix cache like any other: a prompt whose
    prefix is cached continues as it does from scratch."""
    d = tiny_model_factory("LlamaForCausalLM")
    shared = list(range(5, 5 + 48))
    prompts = [[*shared, 100, 101], [*shared, 102]]
    kw = dict(attention_backend="torch", kv_cache_dtype="fp8_e4m3", page_size=16)
    cold, _, _, _ = _run(d, prompts, enable_prefix_caching=False, **kw)
    eng = Engine(str(d), show_progress=False, device="cpu", max_model_len=128, max_num_seqs=4, **kw)
    try:
        params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=2)
        first = eng.generate(prompts[:1], params)[0]
        second = eng.generate(prompts[1:], params)[0]
        assert second.num_cached_tokens >= 32
    finally:
        eng.shutdown()
    assert [first.outputs[0].token_ids, second.outputs[0].token_ids] == [c.token_ids for c in cold]


# ---- GPU ----------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [None, 1, 7])
@pytest.mark.parametrize(("hq", "hkv"), [(32, 8), (28, 4)])
def test_gpu_decode_over_fp8_cache_real_shapes(hq, hkv, splits) -> None:
    dim, ps = 128, 16
    paged = Fp8Paged([1, 300, 2000, 77], hkv, dim, ps)
    q = torch.randn(4, hq, dim, device=DEV, dtype=torch.bfloat16)
    ref = ta.paged_decode_attention(
        q, paged.k, paged.v, paged.page_rows, paged.seq_lens, paged.width * ps, dim**-0.5,
        paged.scale,
    )  # fmt: skip
    n = splits or A.choose_num_splits(4, hkv, paged.width * ps, 132, A.TritonAttentionConfig())
    out = A.paged_decode_attention(
        q, paged.k, paged.v, paged.page_rows, paged.seq_lens, dim**-0.5, n, kv_scale=paged.scale
    )
    _close(out, ref, torch.bfloat16)


@pytest.mark.gpu
def test_gpu_engine_fp8_cache(tiny_model_factory) -> None:
    """bf16 on CUDA: decode graphs (1-4 rows), graphed mixed steps and chunked prefill over an
    FP8 cache, Triton against the torch backend on the same cache; logprobs within bf16's
    tolerance, and where the greedy ids part, a near-tie."""
    d = tiny_model_factory("LlamaForCausalLM", hidden_size=256, intermediate_size=512,
                           num_attention_heads=8, num_key_value_heads=2)  # fmt: skip
    outs = {}
    for backend in ("torch", "triton"):
        eng = Engine(
            str(d), show_progress=False, device="cuda", dtype="bfloat16",
            attention_backend=backend, kv_cache_dtype="fp8", max_num_batched_tokens=64,
            cuda_graph_batch_sizes=(1, 2, 4), max_num_seqs=4, max_logprobs=20,
        )  # fmt: skip
        params = SamplingParams(temperature=0, max_tokens=24, logprobs=20, ignore_eos=True)
        outs[backend] = [o.outputs[0] for o in eng.generate(PROMPTS, params)]
        if backend == "triton":
            assert eng.stats["graph_steps"] > 0
        eng.shutdown()
    for r, o in zip(outs["torch"], outs["triton"]):
        for tr, to, lr, lo in zip(r.token_ids, o.token_ids, r.logprobs, o.logprobs):
            ref = dict(lr.top)
            got = dict(lo.top)
            assert got[to] == pytest.approx(ref.get(to, got[to]), abs=0.08)
            if tr != to:
                assert ref.get(to, -1e9) >= max(ref.values()) - 0.08
                break


# ---- scales from the checkpoint -----------------------------------------------------------------


def _with_kv_scales(src, dst, scales, quantization_config=None):
    """A copy of checkpoint ``src`` with ``model.layers.{i}.self_attn.{k,v}_scale`` tensors
    (``scales``: name -> tensor) and, with a quantization_config, its decoder's linear weights
    in e4m3 with per-channel scales."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from graphrt.models.fp8 import quantize_fp8

    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    if quantization_config is not None:
        for name in [n for n in tensors if n.endswith("_proj.weight")]:
            q, scale = quantize_fp8(tensors[name])
            tensors[name] = q
            tensors[name.removesuffix("weight") + "weight_scale"] = scale[:, None]
    tensors.update(scales)
    save_file(tensors, dst / "model.safetensors")
    if quantization_config is not None:
        cfg = json.loads((dst / "config.json").read_text())
        cfg["quantization_config"] = quantization_config
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _layer_scales(layers: int) -> dict[str, torch.Tensor]:
    out = {}
    for i in range(layers):
        out[f"model.layers.{i}.self_attn.k_scale"] = torch.tensor(0.05 * (i + 1))
        out[f"model.layers.{i}.self_attn.v_scale"] = torch.tensor([0.02 * (i + 1)])
    return out


def _ct_with_kv(**kv_changes) -> dict:
    pytest.importorskip("compressed_tensors")
    import json

    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        preset_name_to_scheme,
    )

    kv = dict(num_bits=8, type="float", strategy="tensor", dynamic=False, symmetric=True)
    kv.update(kv_changes)
    cfg = QuantizationConfig(
        config_groups={"group_0": preset_name_to_scheme("FP8_DYNAMIC", ["Linear"])},
        ignore=["lm_head"],
        format="float-quantized",
        quantization_status="frozen",
        kv_cache_scheme=QuantizationArgs(**kv),
    )
    return json.loads(cfg.model_dump_json())


def test_checkpoint_kv_scales_used_by_an_fp8_cache(tiny_model_factory, tmp_path) -> None:
    """Per-layer K/V scales in a checkpoint: an FP8 cache takes them, an 'auto' cache leaves
    them; the same in an FP8 compressed-tensors checkpoint whose config declares a static
    per-tensor kv_cache_scheme."""
    src = tiny_model_factory("LlamaForCausalLM")
    d = _with_kv_scales(src, tmp_path / "kv", _layer_scales(2))
    eng = Engine(str(d), device="cpu", kv_cache_dtype="fp8", show_progress=False)
    try:
        want = torch.tensor([[0.05, 0.02], [0.10, 0.04]])
        torch.testing.assert_close(eng.runner.kv_scales.cpu(), want)
        out = eng.generate([[1, 2, 3]], SamplingParams(max_tokens=3, ignore_eos=True))[0]
        assert len(out.outputs[0].token_ids) == 3
    finally:
        eng.shutdown()
    eng = Engine(str(d), device="cpu", show_progress=False)
    try:
        assert eng.runner.kv_scales is None and eng.runner.attn.kv_scale(0) is None
    finally:
        eng.shutdown()
    # The same scales under a compressed-tensors config that declares them.
    ct = _with_kv_scales(src, tmp_path / "ct", _layer_scales(2), _ct_with_kv())
    eng = Engine(str(ct), device="cpu", kv_cache_dtype="fp8", show_progress=False)
    try:
        torch.testing.assert_close(eng.runner.kv_scales.cpu(), want)
    finally:
        eng.shutdown()


@pytest.mark.parametrize(
    ("changes", "key"),
    [({"strategy": "channel"}, "kv_cache_scheme.strategy"), ({"num_bits": 4}, "num_bits")],
)
def test_unsupported_kv_cache_schemes_refused_naming_the_key(changes, key) -> None:
    from graphrt.models.fp8_checkpoint import UnsupportedQuantization, fp8_plan

    with pytest.raises(UnsupportedQuantization, match=key.replace(".", r"\.")):
        fp8_plan({"quantization_config": _ct_with_kv(**changes)}, None)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda s: s.pop("model.layers.1.self_attn.v_scale"), "some layers only"),
        (lambda s: s.update({"model.layers.0.self_attn.k_scale": torch.ones(4)}), "per-tensor"),
        (lambda s: s.update({"model.layers.1.self_attn.k_scale": torch.tensor(0.0)}), "positive"),
        (lambda s: s.update({"model.layers.7.self_attn.k_scale": torch.tensor(1.0)}), "2 layers"),
    ],
)
def test_bad_checkpoint_kv_scales_refused(tiny_model_factory, tmp_path, edit, match) -> None:
    from graphrt.models.loader import WeightLoadError

    scales = _layer_scales(2)
    edit(scales)
    d = _with_kv_scales(tiny_model_factory("LlamaForCausalLM"), tmp_path / "bad", scales)
    with pytest.raises(WeightLoadError, match=match):
        Engine(str(d), device="cpu", kv_cache_dtype="fp8", show_progress=False)
