"""The architecture description of a checkpoint, read from its ``config.json``.

We read the JSON ourselves instead of going through ``transformers.AutoConfig``: it never runs
remote code, it works the same across transformers 4.x and 5.x (which renamed ``rope_theta`` /
``rope_scaling`` to ``rope_parameters``), and it fails early with messages that name the field.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

_DTYPES = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float": torch.float32,
    "fp32": torch.float32,
}


def parse_dtype(name: str, where: str = "dtype") -> torch.dtype:
    try:
        return _DTYPES[str(name).replace("torch.", "")]
    except KeyError:
        raise ValueError(
            f"{where}: unsupported dtype {name!r}; graphrt supports bfloat16, float16, float32"
        ) from None


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    kind: str = "default"  # default | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope: RopeConfig
    qkv_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    torch_dtype: torch.dtype = torch.bfloat16
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def num_params(self) -> int:
        """Parameter count as stored (tied embeddings counted once)."""
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        per_layer = h * (self.q_size + 2 * self.kv_size) + self.q_size * h + 3 * h * i + 2 * h
        if self.qkv_bias:
            per_layer += self.q_size + 2 * self.kv_size
        if self.qk_norm:
            per_layer += 2 * self.head_dim
        embed = v * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embed + h

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], where: str = "config.json") -> ModelConfig:
        archs = cfg.get("architectures") or []
        if not archs:
            raise ValueError(f"{where}: no 'architectures' entry; cannot tell the model type")
        arch = archs[0]
        from graphrt.models.registry import supported_architectures  # registry imports us

        if arch not in supported_architectures():
            raise ValueError(
                f"{where}: unsupported architecture {arch!r}; graphrt supports "
                f"{', '.join(supported_architectures())}"
            )

        def need(key: str) -> Any:
            if key not in cfg or cfg[key] is None:
                raise ValueError(f"{where}: missing required field {key!r} for {arch}")
            return cfg[key]

        hidden = int(need("hidden_size"))
        heads = int(need("num_attention_heads"))
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        if heads % kv_heads:
            raise ValueError(
                f"{where}: num_attention_heads ({heads}) must be a multiple of "
                f"num_key_value_heads ({kv_heads})"
            )
        if cfg.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(f"{where}: partial_rotary_factor != 1 is not supported")
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"{where}: hidden_act {act!r} is not supported (only 'silu')")
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        dtype_name = cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"
        window = cfg.get("sliding_window")
        if cfg.get("use_sliding_window") is False:
            window = None
        return cls(
            architecture=arch,
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=int(need("num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            vocab_size=int(need("vocab_size")),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            rope=_parse_rope(cfg, where),
            qkv_bias=bool(cfg.get("attention_bias", False)),
            sliding_window=int(window) if window else None,
            torch_dtype=parse_dtype(dtype_name, f"{where}: torch_dtype"),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            raw=dict(cfg),
        )

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{model_dir}: no config.json (is this a Hugging Face model?)")
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON: {e}") from None
        return cls.from_dict(cfg, where=str(path))


def _parse_rope(cfg: dict[str, Any], where: str) -> RopeConfig:
    # transformers 5 writes rope_parameters {rope_theta, rope_type, ...}; 4.x and the hub write
    # rope_theta plus an optional rope_scaling dict.
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    theta = cfg.get("rope_theta", params.get("rope_theta", 10000.0))
    spec = {**params, **scaling}
    kind = spec.get("rope_type", spec.get("type", "default")) or "default"
    if kind == "default":
        return RopeConfig(theta=float(theta))
    if kind == "linear":
        return RopeConfig(theta=float(theta), kind="linear", factor=float(spec["factor"]))
    if kind == "llama3":
        return RopeConfig(
            theta=float(theta),
            kind="llama3",
            factor=float(spec["factor"]),
            low_freq_factor=float(spec.get("low_freq_factor", 1.0)),
            high_freq_factor=float(spec.get("high_freq_factor", 4.0)),
            original_max_position=int(spec.get("original_max_position_embeddings", 8192)),
        )
    raise ValueError(
        f"{where}: rope scaling type {kind!r} is not supported (supported: default, linear, llama3)"
    )


def rope_inv_freq(rope: RopeConfig, dim: int) -> torch.Tensor:
    """Inverse frequencies in fp32, with linear or llama3 scaling applied as HF does."""
    inv = 1.0 / (rope.theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if rope.kind == "linear":
        return inv / rope.factor
    if rope.kind == "llama3":
        low_wavelen = rope.original_max_position / rope.low_freq_factor
        high_wavelen = rope.original_max_position / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / rope.factor, inv)
        smooth = (rope.original_max_position / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv


def rope_cos_sin(rope: RopeConfig, dim: int, max_pos: int, device: torch.device) -> torch.Tensor:
    """``[max_pos, dim]`` fp32 table: cos of each frequency in the first half, sin in the second."""
    inv = rope_inv_freq(rope, dim)
    pos = torch.arange(max_pos, dtype=torch.int64).float()
    freqs = torch.outer(pos, inv)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(device)
