"""Architecture name (``config.json`` ``architectures[0]``) to model class."""

from __future__ import annotations

import importlib

from graphrt.models.model_config import ModelConfig

_REGISTRY: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("graphrt.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("graphrt.models.mistral", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("graphrt.models.qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("graphrt.models.qwen3", "Qwen3ForCausalLM"),
}


def supported_architectures() -> list[str]:
    return sorted(_REGISTRY)


def resolve(cfg: ModelConfig) -> tuple[type, ModelConfig]:
    """The model class for ``cfg`` and the config adapted to it (e.g. Qwen2's implied bias)."""
    if cfg.architecture not in _REGISTRY:
        raise ValueError(
            f"unsupported architecture {cfg.architecture!r}; graphrt supports "
            f"{', '.join(supported_architectures())}"
        )
    module, name = _REGISTRY[cfg.architecture]
    cls = getattr(importlib.import_module(module), name)
    adapt = getattr(cls, "adapt_config", None)
    if adapt is not None:
        cfg = adapt(cfg)
    cls.check_config(cfg)
    return cls, cfg
