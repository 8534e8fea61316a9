"""Shared fixtures: tiny random Hugging Face checkpoints of each architecture, the default model,
and the ``gpu`` marker's skip."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

# Triton kernels run on CPU under the interpreter. The variable must be set before anything
# imports triton: triton's own @jit helpers (tl.cdiv, tl.max, ...) are built at import time, and
# compiled-mode helpers cannot be called from interpreted kernels. transformers imports triton
# when it is installed, so a module-level setting in one test file is too late.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
)

ARCHS = ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def hf_config(arch: str, **overrides: object):
    """A transformers config object for a tiny model of ``arch``."""
    import transformers

    kw = {**TINY, **overrides}
    if arch == "LlamaForCausalLM":
        kw.setdefault("tie_word_embeddings", False)
        return transformers.LlamaConfig(**kw)
    if arch == "MistralForCausalLM":
        kw.setdefault("sliding_window", None)
        return transformers.MistralConfig(**kw)
    if arch == "Qwen2ForCausalLM":
        kw.setdefault("tie_word_embeddings", True)
        return transformers.Qwen2Config(**kw)
    if arch == "Qwen3ForCausalLM":
        kw.setdefault("head_dim", 16)
        return transformers.Qwen3Config(**kw)
    raise ValueError(arch)


def save_tiny_model(path: Path, arch: str, seed: int = 0, **overrides: object) -> Path:
    """Random-weight HF checkpoint (fp32 safetensors) of ``arch`` written to ``path``."""
    import transformers

    torch.manual_seed(seed)
    cfg = hf_config(arch, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32)
    # HF initialises norms to 1 and biases to 0; perturb them so loading them is tested.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``factory(arch, **overrides) -> Path``; cached per (arch, overrides)."""
    cache: dict[tuple, Path] = {}

    def make(arch: str = "LlamaForCausalLM", **overrides: object) -> Path:
        key = (arch, repr(sorted(overrides.items())))
        if key not in cache:
            d = tmp_path_factory.mktemp(arch.replace("ForCausalLM", "").lower())
            cache[key] = save_tiny_model(d, arch, **overrides)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The prepared default model. Preparing it is set-up's job (see README); a test that
    needs it fails rather than downloading."""
    from graphrt.models.default_model import default_model_dir as where
    from graphrt.models.default_model import ensure_default_model

    d = where()
    if not (d / "graphrt_source.json").is_file() and not os.environ.get("GRAPHRT_ALLOW_DOWNLOAD"):
        pytest.fail(
            f"default model not prepared at {d}; run `python -m graphrt.models.default_model` "
            "first (the README's test command does)"
        )
    return ensure_default_model()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte as a printable character."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += range(ord("®"), ord("ÿ") + 1)
    chars = list(keep)
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, map(chr, chars), strict=True))


def save_byte_tokenizer(path: Path) -> Path:
    """A byte-level tokenizer with no merges into ``path``: ids 0-255 are the bytes, 256 is
    ``<s>`` and 257 ``</s>`` (eos). With a tiny model of ``vocab_size=258`` it makes a model
    that grammars can constrain, built without the network."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: b for b, c in _bytes_to_unicode().items()}
    vocab.update({"<s>": 256, "</s>": 257})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    hf.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_byte_model(tiny_model_factory: Callable[..., Path]) -> Path:
    """A tiny random Llama whose vocabulary is ``save_byte_tokenizer``'s, with that
    tokenizer: for structured outputs without the default model."""
    d = tiny_model_factory("LlamaForCausalLM", vocab_size=258, initializer_range=0.3)
    if not (d / "tokenizer.json").is_file():
        save_byte_tokenizer(d)
    return d
