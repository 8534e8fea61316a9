"""Qwen2 / Qwen2.5: the Llama architecture with a bias on the Q, K and V projections."""

from __future__ import annotations

import dataclasses

from graphrt.models.llama import LlamaForCausalLM
from graphrt.models.model_config import ModelConfig


class Qwen2ForCausalLM(LlamaForCausalLM):
    @classmethod
    def adapt_config(cls, cfg: ModelConfig) -> ModelConfig:
        # Qwen2 always has qkv bias; its config.json says so only through the architecture.
        # Its sliding window is off unless use_sliding_window is true (handled by the parser).
        return dataclasses.replace(cfg, qkv_bias=True)

    @classmethod
    def check_config(cls, cfg: ModelConfig) -> None:
        if cfg.raw.get("use_sliding_window") and cfg.sliding_window:
            raise ValueError(
                f"{cfg.architecture}: use_sliding_window=true is not supported by graphrt"
            )
