"""Qwen3 (dense): the Llama architecture with RMSNorm on each head of Q and K before rotary."""

from __future__ import annotations

import dataclasses

from graphrt.models.llama import LlamaForCausalLM
from graphrt.models.model_config import ModelConfig


class Qwen3ForCausalLM(LlamaForCausalLM):
    @classmethod
    def adapt_config(cls, cfg: ModelConfig) -> ModelConfig:
        return dataclasses.replace(cfg, qk_norm=True)

    @classmethod
    def check_config(cls, cfg: ModelConfig) -> None:
        if cfg.raw.get("use_sliding_window") and cfg.sliding_window:
            raise ValueError(
                f"{cfg.architecture}: use_sliding_window=true is not supported by graphrt"
            )
