"""Which linear layers hold FP8 weights: from the engine's ``quantization`` setting and the
checkpoint's ``config.json`` ``quantization_config``.

Three sources, one layout (:mod:`graphrt.models.fp8`):

- ``quantization="fp8"`` on an unquantized checkpoint: every decoder linear layer (q/k/v/o,
  gate/up/down) is quantized at load time, one tensor at a time.
- HF / vLLM ``quant_method: "fp8"``: tensors ``<module>.weight`` in e4m3 and a per-tensor or
  per-channel ``<module>.weight_scale`` (``weight_scale_inv`` in DeepSeek-style checkpoints;
  both are the multiplier that dequantizes, ``w = q * s``). ``ignored_layers`` (vLLM) and
  ``modules_to_not_convert`` (transformers) name layers kept in high precision.
- compressed-tensors (``quant_method: "compressed-tensors"``, format ``float-quantized``):
  channel- or tensor-wise 8-bit float weights, dynamic per-token activations; ``ignore`` and
  each group's ``targets`` are matched by the compressed-tensors library itself, which is
  imported only for such a checkpoint (``pip install 'graphrt[fp8]'``).

Anything else (static activation scales, block or group scales, other bit widths, a KV-cache
scheme) is refused before any tensor is read, naming the ``quantization_config`` key.
A checkpoint with a ``quantization_config`` is loaded as such whatever ``quantization`` says,
as vLLM does: its tensors can be read no other way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from graphrt.config import QUANTIZATIONS

# The decoder's linear layers, as Hugging Face names their modules (``model.layers.<i>.`` +).
LINEAR_MODULES = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)

Fp8Source = Literal["load_time", "fp8", "compressed-tensors"]


class UnsupportedQuantization(ValueError):
    """A ``quantization_config`` graphrt cannot run; the message names the key."""


@dataclass(frozen=True)
class Fp8Plan:
    """Where a model's FP8 weights come from, and which linear modules have them.

    ``quantizes(name)`` takes a Hugging Face module name (``model.layers.3.mlp.down_proj``).
    """

    source: Fp8Source
    quantizes: Callable[[str], bool]

    @property
    def prequantized(self) -> bool:
        """The checkpoint stores e4m3 weights and scales (rather than being quantized here)."""
        return self.source != "load_time"


def fp8_plan(raw_config: dict[str, Any], quantization: str | None) -> Fp8Plan | None:
    """The plan for a checkpoint's ``config.json`` (``raw_config``) under the engine's
    ``quantization`` setting, or None for an unquantized model."""
    if quantization not in (None, *QUANTIZATIONS):
        raise ValueError(f"quantization must be None or one of {QUANTIZATIONS}: {quantization!r}")
    qc = raw_config.get("quantization_config")
    if qc is None:
        return Fp8Plan("load_time", lambda name: True) if quantization == "fp8" else None
    if not isinstance(qc, dict):
        raise UnsupportedQuantization("config.json quantization_config must be an object")
    method = qc.get("quant_method")
    if method == "fp8":
        return _hf_fp8_plan(qc)
    if method == "compressed-tensors":
        return _compressed_tensors_plan(qc)
    raise UnsupportedQuantization(
        f"config.json quantization_config.quant_method={method!r} is not supported; graphrt "
        "loads 'fp8' and 'compressed-tensors' (float-quantized) checkpoints"
    )


def _refuse(key: str, value: Any, why: str) -> UnsupportedQuantization:
    return UnsupportedQuantization(f"config.json quantization_config.{key}={value!r}: {why}")


def _hf_fp8_plan(qc: dict[str, Any]) -> Fp8Plan:
    scheme = qc.get("activation_scheme", "dynamic")
    if scheme != "dynamic":
        raise _refuse(
            "activation_scheme",
            scheme,
            "static activation scales are not supported (graphrt runs dynamic activations only)",
        )
    if qc.get("weight_block_size") is not None:
        raise _refuse(
            "weight_block_size",
            qc["weight_block_size"],
            "block-wise weight scales are not supported (per-tensor and per-channel only)",
        )
    fmt = qc.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise _refuse("fmt", fmt, "only e4m3 weights are supported")
    skipped = [*(qc.get("ignored_layers") or []), *(qc.get("modules_to_not_convert") or [])]
    return Fp8Plan("fp8", lambda name: not any(_names_module(s, name) for s in skipped))


def _names_module(entry: str, name: str) -> bool:
    """An ignore-list entry names a module if it is the module's name or a whole-component
    prefix or suffix of it (``lm_head``, ``model.layers.0``, ``mlp.down_proj``)."""
    return name == entry or name.startswith(entry + ".") or name.endswith("." + entry)


def _compressed_tensors_plan(qc: dict[str, Any]) -> Fp8Plan:
    try:
        import torch
        from compressed_tensors import CompressionFormat
        from compressed_tensors.quantization import (
            QuantizationConfig,
            QuantizationStrategy,
            QuantizationType,
        )
        from compressed_tensors.utils.match import is_match
    except ImportError:
        raise UnsupportedQuantization(
            "this checkpoint is in the compressed-tensors format (quantization_config."
            "quant_method='compressed-tensors'), which needs the compressed-tensors package: "
            "pip install 'graphrt[fp8]'"
        ) from None
    try:
        cfg = QuantizationConfig.model_validate(qc)
    except Exception as e:  # pydantic's ValidationError names the bad field
        raise UnsupportedQuantization(
            f"config.json quantization_config: not a valid compressed-tensors config: {e}"
        ) from None
    for key in ("sparsity_config", "transform_config"):
        if qc.get(key):
            raise _refuse(key, qc[key], "not supported (FP8 linear weights only)")
    if not cfg.config_groups:
        raise _refuse("config_groups", qc.get("config_groups"), "no quantization groups")
    float_quantized = CompressionFormat.float_quantized.value
    fp8 = {"num_bits": 8, "type": QuantizationType.FLOAT.value, "symmetric": True}
    if cfg.kv_cache_scheme is not None:
        _check_kv_cache_scheme(cfg.kv_cache_scheme, fp8)
    targets: list[Sequence[str]] = []
    for gname, scheme in cfg.config_groups.items():
        where = f"config_groups.{gname}"
        fmt = scheme.format or cfg.format
        if fmt != float_quantized:
            key = f"{where}.format" if scheme.format else "format"
            raise _refuse(key, fmt, f"only {float_quantized!r} is supported")
        w = scheme.weights
        if w is None:
            raise _refuse(f"{where}.weights", None, "unquantized weights are not supported")
        _check_fp8_args(w, f"{where}.weights", fp8)
        weight_strategies = (QuantizationStrategy.CHANNEL.value, QuantizationStrategy.TENSOR.value)
        if _value(w.strategy) not in weight_strategies:
            raise _refuse(
                f"{where}.weights.strategy",
                _value(w.strategy),
                "only channel- and tensor-wise weight scales are supported (not group or block)",
            )
        if w.dynamic:
            raise _refuse(f"{where}.weights.dynamic", w.dynamic, "weights must be stored quantized")
        a = scheme.input_activations
        if a is not None:
            if a.dynamic is not True:
                raise _refuse(
                    f"{where}.input_activations.dynamic",
                    a.dynamic,
                    "static activation scales are not supported (dynamic per-token only)",
                )
            if _value(a.strategy) != QuantizationStrategy.TOKEN.value:
                raise _refuse(
                    f"{where}.input_activations.strategy",
                    _value(a.strategy),
                    "only dynamic per-token activation scales are supported",
                )
            _check_fp8_args(a, f"{where}.input_activations", fp8)
        if scheme.output_activations is not None:
            raise _refuse(f"{where}.output_activations", "...", "not supported")
        targets.append(list(scheme.targets))
    ignore = list(cfg.ignore or [])
    # Targets may name a module class ("Linear") as well as names or "re:" patterns; every
    # module asked about here is a linear layer, so a meta-device Linear stands for it.
    proto = torch.nn.Linear(1, 1, bias=False, device="meta")
    return Fp8Plan(
        "compressed-tensors",
        lambda name: any(is_match(name, proto, t, ignore) for t in targets),
    )


def _check_kv_cache_scheme(kv: Any, fp8: dict[str, Any]) -> None:
    """A KV-cache scheme graphrt can honour: static per-tensor e4m3 scales, one each for K and V
    in every layer (``self_attn.k_scale``, ``self_attn.v_scale``), used when the engine runs
    ``kv_cache_dtype="fp8"``; any other is refused, naming its key."""
    from compressed_tensors.quantization import QuantizationStrategy

    _check_fp8_args(kv, "kv_cache_scheme", fp8)
    if _value(kv.strategy) != QuantizationStrategy.TENSOR.value:
        raise _refuse(
            "kv_cache_scheme.strategy",
            _value(kv.strategy),
            "only per-tensor KV-cache scales are supported",
        )
    if kv.dynamic:
        raise _refuse("kv_cache_scheme.dynamic", kv.dynamic, "needs static (calibrated) scales")


def _check_fp8_args(args: Any, where: str, want: dict[str, Any]) -> None:
    """Refuse compressed-tensors ``QuantizationArgs`` that are not symmetric 8-bit float."""
    for key, value in want.items():
        if _value(getattr(args, key)) != value:
            raise _refuse(f"{where}.{key}", _value(getattr(args, key)), f"needs {value!r}")


def _value(v: Any) -> Any:
    """An enum's value, anything else as is (compressed-tensors uses str enums)."""
    return getattr(v, "value", v)
