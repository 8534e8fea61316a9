"""Qwen3 (dense): the Llama architecture with RMSNorm on each head of Q and K before rotary and,
unlike Qwen2, no bias on the projections. Shares Qwen2's config checks."""

from __future__ import annotations

import dataclasses

from graphrt.models.model_config import ModelConfig
from graphrt.models.qwen2 import Qwen2ForCausalLM


class Qwen3ForCausalLM(Qwen2ForCausalLM):
    @classmethod
    def adapt_config(cls, cfg: ModelConfig) -> ModelConfig:
        # Not Qwen2's: the bias follows config.json's attention_bias (false for Qwen3).
        return dataclasses.replace(cfg, qk_norm=True)
