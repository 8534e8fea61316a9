"""Llama-family decoder (Llama 2/3/3.1/3.2, SmolLM2, TinyLlama), the base of the other families.

Q, K and V projections are fused into one matrix and gate/up into another at load time, so a
layer runs four GEMMs. Linear layers, norms, rotary+KV write and SiLU-and-mul come from the
``Ops`` bundle (linear layers through :mod:`graphrt.models.fp8`, which sends FP8 weights to
``ops.fp8_linear``); attention from the backend in the ``ForwardBatch``. Each pre-norm and the
projection reading it (qkv, gate/up) are one op, ``ops.add_rms_norm_linear`` or
``ops.fp8_add_rms_norm_linear`` (one fused kernel for a decode row where the bundle folds norms:
``make_ops``' ``fuse_norms``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from graphrt.forward_batch import ForwardBatch
from graphrt.kernels.ops import Ops
from graphrt.models.fp8 import Fp8Weight, add_rms_norm_linear, linear, silu_mul_linear
from graphrt.models.fp8_checkpoint import Fp8Plan
from graphrt.models.model_config import ModelConfig, rope_cos_sin


def _param(*shape: int, dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


def _linear_weight(
    out_features: int,
    in_features: int,
    modules: list[str],
    fp8: Fp8Plan | None,
    dtype: torch.dtype,
    device: torch.device,
) -> nn.Parameter | Fp8Weight:
    """The (possibly fused) weight of the HF ``modules``: FP8 where ``fp8`` says so."""
    if fp8 is None:
        return _param(out_features, in_features, dtype=dtype, device=device)
    flags = {fp8.quantizes(m) for m in modules}
    if len(flags) > 1:
        # They are one fused matrix here, with one dtype.
        raise ValueError(f"{modules} must be all FP8 or all unquantized; the checkpoint mixes them")
    if flags.pop():
        return Fp8Weight(out_features, in_features, device)
    return _param(out_features, in_features, dtype=dtype, device=device)


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        dtype: torch.dtype,
        device: torch.device,
        index: int = 0,
        fp8: Fp8Plan | None = None,
    ) -> None:
        super().__init__()
        h, q, kv, i = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size
        self.cfg = cfg
        p = f"model.layers.{index}."
        self.input_norm = _param(h, dtype=dtype, device=device)
        self.qkv_proj = _linear_weight(
            q + 2 * kv, h, [p + f"self_attn.{x}_proj" for x in "qkv"], fp8, dtype, device
        )
        self.qkv_bias = _param(q + 2 * kv, dtype=dtype, device=device) if cfg.qkv_bias else None
        self.q_norm = _param(cfg.head_dim, dtype=dtype, device=device) if cfg.qk_norm else None
        self.k_norm = _param(cfg.head_dim, dtype=dtype, device=device) if cfg.qk_norm else None
        self.o_proj = _linear_weight(h, q, [p + "self_attn.o_proj"], fp8, dtype, device)
        self.post_attn_norm = _param(h, dtype=dtype, device=device)
        self.gate_up_proj = _linear_weight(
            2 * i, h, [p + "mlp.gate_proj", p + "mlp.up_proj"], fp8, dtype, device
        )
        self.down_proj = _linear_weight(h, i, [p + "mlp.down_proj"], fp8, dtype, device)

    def forward(
        self,
        layer_idx: int,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        fb: ForwardBatch,
        cos_sin: torch.Tensor,
        ops: Ops,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        eps = cfg.rms_norm_eps
        qkv, residual = add_rms_norm_linear(
            ops, hidden, residual, self.input_norm, eps, self.qkv_proj, self.qkv_bias
        )
        t = qkv.shape[0]
        q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
        q = q.view(t, cfg.num_heads, cfg.head_dim)
        k = k.view(t, cfg.num_kv_heads, cfg.head_dim)
        v = v.view(t, cfg.num_kv_heads, cfg.head_dim)
        if self.q_norm is not None:
            q = ops.rms_norm(q, self.q_norm, eps)
            k = ops.rms_norm(k, self.k_norm, eps)
        backend = fb.attn_backend
        q, _ = ops.rope_and_store_kv(
            q,
            k,
            v,
            fb.positions,
            cos_sin,
            backend.k_caches[layer_idx].view(-1, cfg.num_kv_heads, cfg.head_dim),
            backend.v_caches[layer_idx].view(-1, cfg.num_kv_heads, cfg.head_dim),
            fb.kv_locs,
            backend.kv_scale(layer_idx),
        )
        attn = backend.forward(q, layer_idx, fb.attn_meta)
        hidden = linear(ops, attn.reshape(t, cfg.q_size), self.o_proj)
        gate_up, residual = add_rms_norm_linear(
            ops, hidden, residual, self.post_attn_norm, eps, self.gate_up_proj
        )
        hidden = silu_mul_linear(ops, gate_up, self.down_proj)
        return hidden, residual


class LlamaForCausalLM(nn.Module):
    """Decoder-only LM over a paged KV cache. Subclasses adjust config checks and weight names."""

    def __init__(
        self,
        cfg: ModelConfig,
        ops: Ops,
        dtype: torch.dtype,
        device: torch.device,
        max_positions: int,
        fp8: Fp8Plan | None = None,
    ) -> None:
        """``fp8``: which decoder linear layers hold FP8 weights (None: none do). Embeddings,
        norms and the lm_head always stay in ``dtype``."""
        super().__init__()
        self.check_config(cfg)
        self.cfg = cfg
        self.ops = ops
        self.dtype = dtype
        self.fp8 = fp8
        self.embed_tokens = _param(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(cfg, dtype, device, i, fp8) for i in range(cfg.num_layers)
        )
        self.norm = _param(cfg.hidden_size, dtype=dtype, device=device)
        self.lm_head = (
            self.embed_tokens
            if cfg.tie_word_embeddings
            else _param(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device)
        )
        self.register_buffer(
            "cos_sin", rope_cos_sin(cfg.rope, cfg.head_dim, max_positions, device), persistent=False
        )

    @classmethod
    def check_config(cls, cfg: ModelConfig) -> None:
        """Refuse configs this implementation would run wrongly."""

    def forward(self, fb: ForwardBatch) -> torch.Tensor:
        """Hidden states after the final norm, for the ``logits_rows`` tokens only (every token
        where it is None): ``[B, H]``."""
        hidden = F.embedding(fb.input_ids, self.embed_tokens)
        residual = None
        for i, layer in enumerate(self.layers):
            hidden, residual = layer(i, hidden, residual, fb, self.cos_sin, self.ops)
        # Only the sampled rows need the final norm and the lm_head (a decode step samples every
        # row: no gather, two kernels fewer in its graph).
        if fb.logits_rows is not None:
            hidden = hidden.index_select(0, fb.logits_rows)
            residual = residual.index_select(0, fb.logits_rows)
        hidden, _ = self.ops.fused_add_rms_norm(hidden, residual, self.norm, self.cfg.rms_norm_eps)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[B, V]`` logits in the model dtype; the sampler upcasts only when it must (greedy
        argmax does not: the bf16 -> fp32 cast is exact and monotone)."""
        return self.ops.linear(hidden, self.lm_head)

    # ---- weights -------------------------------------------------------------------------
    _LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
    _LAYER_MAP: ClassVar[dict[str, tuple[str, str | None]]] = {
        "input_layernorm.weight": ("input_norm", None),
        "post_attention_layernorm.weight": ("post_attn_norm", None),
        "self_attn.q_proj.weight": ("qkv_proj", "q"),
        "self_attn.k_proj.weight": ("qkv_proj", "k"),
        "self_attn.v_proj.weight": ("qkv_proj", "v"),
        "self_attn.q_proj.bias": ("qkv_bias", "q"),
        "self_attn.k_proj.bias": ("qkv_bias", "k"),
        "self_attn.v_proj.bias": ("qkv_bias", "v"),
        "self_attn.q_norm.weight": ("q_norm", None),
        "self_attn.k_norm.weight": ("k_norm", None),
        "self_attn.o_proj.weight": ("o_proj", None),
        "mlp.gate_proj.weight": ("gate_up_proj", "gate"),
        "mlp.up_proj.weight": ("gate_up_proj", "up"),
        "mlp.down_proj.weight": ("down_proj", None),
    }
    # Checkpoint entries that carry no weights we use (HF caches of rotary tables).
    _IGNORED = re.compile(r"rotary_emb\.inv_freq$")

    def _shard_rows(self, shard: str) -> tuple[int, int]:
        c = self.cfg
        q, kv, i = c.q_size, c.kv_size, c.intermediate_size
        return {
            "q": (0, q),
            "k": (q, kv),
            "v": (q + kv, kv),
            "gate": (0, i),
            "up": (i, i),
        }[shard]

    def target(self, name: str) -> tuple[torch.Tensor | Fp8Weight, tuple[int, int] | None] | None:
        """Map a checkpoint tensor name to (parameter, row range within it), or None to skip.
        The parameter is an :class:`Fp8Weight` for a quantized linear layer.

        Raises ``KeyError`` for names this model does not know.
        """
        if self._IGNORED.search(name):
            return None
        if name == "model.embed_tokens.weight":
            return self.embed_tokens, None
        if name == "model.norm.weight":
            return self.norm, None
        if name == "lm_head.weight":
            # Tied checkpoints sometimes still store the (identical) head; keep the embedding.
            return None if self.cfg.tie_word_embeddings else (self.lm_head, None)
        m = self._LAYER.match(name)
        if m and int(m.group(1)) < self.cfg.num_layers and m.group(2) in self._LAYER_MAP:
            attr, shard = self._LAYER_MAP[m.group(2)]
            param = getattr(self.layers[int(m.group(1))], attr)
            if param is None:
                raise KeyError(name)
            return param, (self._shard_rows(shard) if shard else None)
        raise KeyError(name)

    def expected_weights(self) -> set[str]:
        """Checkpoint names that must be present for the model to be complete."""
        names = {"model.embed_tokens.weight", "model.norm.weight"}
        if not self.cfg.tie_word_embeddings:
            names.add("lm_head.weight")
        for i in range(self.cfg.num_layers):
            for key, (attr, _) in self._LAYER_MAP.items():
                if getattr(self.layers[i], attr) is not None:
                    names.add(f"model.layers.{i}.{key}")
        return names

    def all_parameters(self) -> Iterable[tuple[str, torch.Tensor]]:
        return self.named_parameters()
