"""Mistral: the Llama architecture, plus a sliding window that graphrt does not implement."""

from __future__ import annotations

from graphrt.models.llama import LlamaForCausalLM
from graphrt.models.model_config import ModelConfig


class MistralForCausalLM(LlamaForCausalLM):
    @classmethod
    def check_config(cls, cfg: ModelConfig) -> None:
        window = cfg.sliding_window
        if window is not None and window < cfg.max_position_embeddings:
            raise ValueError(
                f"{cfg.architecture}: this checkpoint uses sliding-window attention "
                f"(sliding_window={window}), which graphrt does not implement. Models with "
                "sliding_window null (Mistral v0.2 and later) are supported."
            )
