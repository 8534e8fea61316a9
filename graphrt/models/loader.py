"""Build a model and fill its weights from safetensors, or with random values ("dummy").

Only safetensors are read: pickle checkpoints (``*.bin``, ``*.pt``) can run code on load and are
refused. Every failure names the file and the tensor: a corrupt or truncated file, a missing or
unexpected tensor, a shape that disagrees with ``config.json``, or an unsupported dtype.

FP8 (:mod:`graphrt.models.fp8`): a float tensor bound for an FP8 weight is quantized as it
arrives, on the parameter's device, so at most one full-precision tensor is held at a time; an
e4m3 tensor is copied, and its ``<module>.weight_scale`` (or ``weight_scale_inv``) fills the
rows' scales. Which layers are FP8 is decided before loading (``fp8_checkpoint.fp8_plan``).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from graphrt.kernels.ops import Ops
from graphrt.models.fp8 import FP8_DTYPE, Fp8Weight, quantize_fp8
from graphrt.models.fp8_checkpoint import fp8_plan
from graphrt.models.model_config import ModelConfig
from graphrt.models.registry import resolve

logger = logging.getLogger(__name__)

_LOADABLE_DTYPES = {torch.float32, torch.float16, torch.bfloat16}
# FP8 checkpoints name a weight's scale after it: ``<module>.weight_scale`` (HF/vLLM fp8,
# compressed-tensors) or ``<module>.weight_scale_inv`` (DeepSeek-style; also a multiplier).
_SCALE_SUFFIXES = (".weight_scale", ".weight_scale_inv")
# An FP8 KV cache's per-layer scales, as vLLM and llm-compressor name them.
_KV_SCALE = re.compile(r"^model\.layers\.(\d+)\.self_attn\.([kv])_scale$")


class WeightLoadError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and tensor."""


def safetensors_files(model_dir: Path) -> list[Path]:
    """The checkpoint's safetensors files, from the shard index if there is one."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise WeightLoadError(f"{index}: not a valid shard index ({e})") from None
        files = sorted({model_dir / f for f in weight_map.values()})
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise WeightLoadError(f"{index}: shard file(s) missing: {[m.name for m in missing]}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in model_dir.glob("*.bin")) + sorted(
            p.name for p in model_dir.glob("*.pt")
        )
        hint = (
            f" It has pickle checkpoints ({', '.join(pickles[:3])}), which graphrt never loads "
            "because unpickling can run arbitrary code; convert them to safetensors."
            if pickles
            else ""
        )
        raise WeightLoadError(f"{model_dir}: no *.safetensors weights found.{hint}")
    return files


def build_model(
    cfg: ModelConfig,
    ops: Ops,
    dtype: torch.dtype,
    device: torch.device,
    max_positions: int,
    quantization: str | None = None,
) -> torch.nn.Module:
    """The model of ``cfg``, its weights allocated but not filled. Decoder linear layers are
    FP8 where ``quantization="fp8"`` or the checkpoint's ``quantization_config`` says so."""
    cls, cfg = resolve(cfg)
    plan = fp8_plan(cfg.raw, quantization)
    if plan is not None:
        logger.info("FP8 weights (%s)", plan.source)
    return cls(cfg, ops, dtype, device, max_positions, fp8=plan)


def load_safetensors(
    model: torch.nn.Module, model_dir: Path, show_progress: bool = True
) -> dict[int, tuple[float, float]]:
    """Copy every checkpoint tensor into its (possibly fused) parameter, checking as we go.

    Returns the checkpoint's FP8 KV-cache scales, ``{layer: (k_scale, v_scale)}`` (empty when
    it has none; every layer's otherwise), for the engine to use with an FP8 cache."""
    files = safetensors_files(model_dir)
    expected = model.expected_weights()
    kv_scales: dict[tuple[int, str], float] = {}
    seen: set[str] = set()
    fp8_loaded: set[str] = set()  # weights that arrived in e4m3: each needs its scale
    scales_loaded: set[str] = set()  # the weight names whose scale arrived
    logger.info("loading weights from %d safetensors file(s) in %s", len(files), model_dir)
    bar = tqdm(
        total=len(expected), desc="Loading weights", unit="tensor", disable=not show_progress
    )
    for path in files:
        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
            names = list(handle.keys())
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise WeightLoadError(f"{path}: cannot read safetensors header ({e})") from None
        for name in names:
            kv = _KV_SCALE.match(name)
            if kv is not None:
                layer, which = int(kv.group(1)), kv.group(2)
                kv_scales[layer, which] = _read_kv_scale(
                    handle, path, name, layer, model.cfg.num_layers
                )
                continue
            if name.endswith(_SCALE_SUFFIXES):
                _load_scale(model, handle, path, name)
                scales_loaded.add(name[: name.rindex(".")] + ".weight")
                continue
            if name.endswith(".input_scale"):
                raise WeightLoadError(
                    f"{path}: tensor {name!r} is a static activation scale; graphrt runs FP8 "
                    "checkpoints with dynamic activation scales only"
                )
            try:
                target = model.target(name)
            except KeyError:
                raise WeightLoadError(
                    f"{path}: unexpected tensor {name!r} for {model.cfg.architecture} "
                    f"({model.cfg.num_layers} layers); config.json and weights disagree"
                ) from None
            if target is None:
                continue
            try:
                tensor = handle.get_tensor(name)
            except Exception as e:
                raise WeightLoadError(
                    f"{path}: cannot read tensor {name!r} (file corrupt or truncated?): {e}"
                ) from None
            if tensor.dtype == FP8_DTYPE:
                if not isinstance(target[0], Fp8Weight):
                    raise WeightLoadError(
                        f"{path}: tensor {name!r} is float8_e4m3fn, but the layer is not FP8 in "
                        "this model (config.json's quantization_config ignores it, or it is an "
                        "embedding, norm or lm_head, which graphrt keeps unquantized)"
                    )
                fp8_loaded.add(name)
            elif tensor.dtype not in _LOADABLE_DTYPES:
                raise WeightLoadError(
                    f"{path}: tensor {name!r} has dtype {tensor.dtype}; graphrt loads "
                    "float32, float16 and bfloat16 weights, and float8_e4m3fn ones with scales"
                )
            elif isinstance(target[0], Fp8Weight) and model.fp8.prequantized:
                raise WeightLoadError(
                    f"{path}: tensor {name!r} has dtype {tensor.dtype}, but config.json's "
                    "quantization_config says it is stored in FP8 (not in its ignore list)"
                )
            _copy_into(name, path, tensor, *target)
            seen.add(name)
            bar.update(1)
    bar.close()
    missing = sorted(expected - seen)
    if missing:
        raise WeightLoadError(
            f"{model_dir}: {len(missing)} tensor(s) missing from the checkpoint, e.g. {missing[:3]}"
        )
    if fp8_loaded - scales_loaded:
        no_scale = sorted(fp8_loaded - scales_loaded)
        raise WeightLoadError(
            f"{model_dir}: {len(no_scale)} FP8 weight(s) without a weight_scale, "
            f"e.g. {no_scale[:3]}"
        )
    if scales_loaded - fp8_loaded:
        extra = sorted(scales_loaded - fp8_loaded)
        raise WeightLoadError(
            f"{model_dir}: weight_scale given for weight(s) not stored in FP8, e.g. {extra[:3]}"
        )
    return _kv_scales_per_layer(kv_scales, model.cfg.num_layers, model_dir)


def _read_kv_scale(handle: Any, path: Path, name: str, layer: int, num_layers: int) -> float:
    """Layer ``layer``'s K or V cache scale: a positive, finite scalar of a layer that exists."""
    if layer >= num_layers:
        raise WeightLoadError(
            f"{path}: unexpected tensor {name!r}: the model has {num_layers} layers"
        )
    try:
        t = handle.get_tensor(name)
    except Exception as e:
        raise WeightLoadError(f"{path}: cannot read tensor {name!r}: {e}") from None
    if t.numel() != 1:
        raise WeightLoadError(
            f"{path}: tensor {name!r} has shape {tuple(t.shape)}; graphrt takes one KV-cache "
            "scale per layer (per-tensor), not per head or per channel"
        )
    value = float(t.float().reshape(()))
    if not (value > 0 and value < float("inf")):
        raise WeightLoadError(f"{path}: tensor {name!r} is {value}; a scale must be positive")
    return value


def _kv_scales_per_layer(
    found: dict[tuple[int, str], float], num_layers: int, model_dir: Path
) -> dict[int, tuple[float, float]]:
    # All or nothing: a cache scaled in some layers and not others is a broken checkpoint.
    if not found:
        return {}
    want = {(layer, which) for layer in range(num_layers) for which in "kv"}
    missing = sorted(want - set(found))
    if missing:
        names = [f"model.layers.{layer}.self_attn.{w}_scale" for layer, w in missing[:3]]
        raise WeightLoadError(
            f"{model_dir}: KV-cache scales for some layers only; {len(missing)} missing, "
            f"e.g. {names}"
        )
    return {layer: (found[layer, "k"], found[layer, "v"]) for layer in range(num_layers)}


def _load_scale(model: torch.nn.Module, handle: Any, path: Path, name: str) -> None:
    """Fill the row scales of the FP8 weight that ``name`` (``<module>.weight_scale[_inv]``)
    belongs to: one value for the whole tensor, or one per output row."""
    weight_name = name[: name.rindex(".")] + ".weight"
    try:
        target = model.target(weight_name)
    except KeyError:
        target = None
    if target is None or not isinstance(target[0], Fp8Weight):
        raise WeightLoadError(f"{path}: unexpected tensor {name!r}: no FP8 weight {weight_name!r}")
    w, rows = target
    dest = w.weight_scale.data if rows is None else w.weight_scale.data.narrow(0, *rows)
    try:
        scale = handle.get_tensor(name)
    except Exception as e:
        raise WeightLoadError(f"{path}: cannot read tensor {name!r}: {e}") from None
    n = dest.shape[0]
    if scale.numel() == 1:  # per-tensor
        dest.copy_(scale.float().reshape(1).expand(n))
    elif tuple(scale.shape) in ((n,), (n, 1)):  # per-channel
        dest.copy_(scale.float().reshape(n))
    else:
        raise WeightLoadError(
            f"{path}: tensor {name!r} has shape {tuple(scale.shape)}; graphrt takes per-tensor "
            f"or per-channel ({n} rows) weight scales, not block or group scales"
        )
    if not bool(torch.isfinite(dest).all()) or bool((dest <= 0).any()):
        raise WeightLoadError(f"{path}: tensor {name!r} has non-positive or non-finite scales")


def _copy_into(
    name: str,
    path: Path,
    tensor: torch.Tensor,
    param: torch.Tensor | Fp8Weight,
    rows: tuple[int, int] | None,
) -> None:
    data = param.weight.data if isinstance(param, Fp8Weight) else param.data
    dest = data if rows is None else data.narrow(0, rows[0], rows[1])
    if tuple(tensor.shape) != tuple(dest.shape):
        raise WeightLoadError(
            f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, but config.json implies "
            f"{tuple(dest.shape)}"
        )
    if isinstance(param, Fp8Weight) and tensor.dtype != FP8_DTYPE:
        # Quantized on the parameter's device (fast on a GPU); only this tensor is ever held
        # there in full precision.
        param.load_rows(rows, *quantize_fp8(tensor.to(dest.device)))
        return
    dest.copy_(tensor)


def init_dummy(model: torch.nn.Module, seed: int) -> None:
    """Random weights for benchmarks: small normal linears, unit norms (stable activations).
    FP8 weights are drawn in fp32, one tensor at a time, and quantized."""
    fp8 = {id(m.weight): m for m in model.modules() if isinstance(m, Fp8Weight)}
    for i, (name, p) in enumerate(model.named_parameters()):
        if "norm" in name:
            p.data.fill_(1.0)
            continue
        if name.endswith(".weight_scale"):
            continue  # set with its weight
        # A generator on the parameter's device: generating 8B values on the CPU takes minutes.
        gen = torch.Generator(device=p.device).manual_seed(seed * 100_003 + i)
        if id(p) in fp8:
            w = torch.empty(p.shape, dtype=torch.float32, device=p.device)
            fp8[id(p)].load_rows(None, *quantize_fp8(w.normal_(0.0, 0.02, generator=gen)))
            continue
        p.data.normal_(0.0, 0.02, generator=gen)
