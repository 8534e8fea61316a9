"""Build a model and fill its weights from safetensors, or with random values ("dummy").

Only safetensors are read: pickle checkpoints (``*.bin``, ``*.pt``) can run code on load and are
refused. Every failure names the file and the tensor: a corrupt or truncated file, a missing or
unexpected tensor, a shape that disagrees with ``config.json``, or an unsupported dtype.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from graphrt.kernels.ops import Ops
from graphrt.models.model_config import ModelConfig
from graphrt.models.registry import resolve

logger = logging.getLogger(__name__)

_LOADABLE_DTYPES = {torch.float32, torch.float16, torch.bfloat16}


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
) -> torch.nn.Module:
    cls, cfg = resolve(cfg)
    return cls(cfg, ops, dtype, device, max_positions)


def load_safetensors(model: torch.nn.Module, model_dir: Path, show_progress: bool = True) -> None:
    """Copy every checkpoint tensor into its (possibly fused) parameter, checking as we go."""
    files = safetensors_files(model_dir)
    expected = model.expected_weights()
    seen: set[str] = set()
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
            if tensor.dtype not in _LOADABLE_DTYPES:
                raise WeightLoadError(
                    f"{path}: tensor {name!r} has dtype {tensor.dtype}; graphrt loads "
                    "float32, float16 and bfloat16 weights only"
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


def _copy_into(
    name: str, path: Path, tensor: torch.Tensor, param: torch.Tensor, rows: tuple[int, int] | None
) -> None:
    dest = param.data if rows is None else param.data.narrow(0, rows[0], rows[1])
    if tuple(tensor.shape) != tuple(dest.shape):
        raise WeightLoadError(
            f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, but config.json implies "
            f"{tuple(dest.shape)}"
        )
    dest.copy_(tensor)


def init_dummy(model: torch.nn.Module, seed: int) -> None:
    """Random weights for benchmarks: small normal linears, unit norms (stable activations)."""
    for i, (name, p) in enumerate(model.named_parameters()):
        if "norm" in name:
            p.data.fill_(1.0)
            continue
        # A generator on the parameter's device: generating 8B values on the CPU takes minutes.
        gen = torch.Generator(device=p.device).manual_seed(seed * 100_003 + i)
        p.data.normal_(0.0, 0.02, generator=gen)
