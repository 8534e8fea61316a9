"""Parity with Hugging Face transformers: logits on tiny random checkpoints of every
architecture, and greedy tokens on the real default model."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS

from graphrt import Engine, SamplingParams

PROMPTS = [[5, 17, 99, 3, 200, 45, 7], [1, 2, 3], list(range(40, 90)), [250, 0, 128, 64]]


def _hf(model_dir, dtype=torch.float32, device="cpu"):
    import transformers

    m = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    return m.to(device).eval()


def _hf_logprobs(hf, ids: list[int], start: int) -> torch.Tensor:
    """log_softmax of HF's logits at positions ``start-1 .. len(ids)-2`` (each predicts the
    next token)."""
    with torch.no_grad():
        logits = hf(torch.tensor([ids], device=hf.device)).logits[0].float()
    return logits[start - 1 : len(ids) - 1].log_softmax(-1).cpu()


def _hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    """Greedy continuation that, like ``ignore_eos``, runs past EOS (HF's generate would stop,
    and its min_new_tokens would ban EOS instead)."""
    ids, past, out = torch.tensor([prompt]), None, []
    with torch.no_grad():
        for _ in range(n):
            res = hf(ids, past_key_values=past, use_cache=True)
            past = res.past_key_values
            nxt = int(res.logits[0, -1].argmax())
            out.append(nxt)
            ids = torch.tensor([[nxt]])
    return out


def _our_logprobs(out, vocab: int) -> torch.Tensor:
    rows = []
    for step in out.logprobs:
        row = torch.full((vocab,), float("-inf"))
        for tok, lp in step.top:
            row[tok] = lp
        rows.append(row)
    return torch.stack(rows)


DEVICES = [
    pytest.param("cpu", torch.float32, 2e-5, id="cpu-fp32"),
    pytest.param("cuda", torch.bfloat16, 0.08, id="cuda-bf16", marks=pytest.mark.gpu),
]


@pytest.mark.parametrize(("device", "dtype", "atol"), DEVICES)
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_hf_prefill_and_decode(tiny_model_factory, arch, device, dtype, atol) -> None:
    d = tiny_model_factory(arch)
    hf = _hf(d, dtype, device)
    vocab = hf.config.vocab_size
    name = str(dtype).removeprefix("torch.")
    eng = Engine(str(d), show_progress=False, max_logprobs=vocab, device=device, dtype=name)
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=vocab, ignore_eos=True)
    outs = eng.generate(PROMPTS, params)
    for prompt, out in zip(PROMPTS, outs):
        c = out.outputs[0]
        ours = _our_logprobs(c, vocab)
        # HF's distributions along *our* sequence (teacher forcing): row 0 is the prefill's,
        # the others come from decode steps (graph replays on CUDA).
        ref = _hf_logprobs(hf, prompt + c.token_ids, len(prompt))
        torch.testing.assert_close(ours, ref, atol=atol, rtol=1e-4 if atol < 1e-3 else 0.05)
        picked = ref.gather(1, torch.tensor(c.token_ids)[:, None])[:, 0]
        # Greedy picked HF's argmax, up to a near-tie within the dtype's tolerance.
        assert torch.all(picked >= ref.max(-1).values - (0 if atol < 1e-3 else atol))
    eng.shutdown()


def test_llama3_rope_scaling_matches_hf(tiny_model_factory) -> None:
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    d = tiny_model_factory("LlamaForCausalLM", rope_scaling=scaling, rope_theta=500000.0)
    hf = _hf(d)
    eng = Engine(str(d), show_progress=False, max_logprobs=256, overlap="off")
    prompt = list(range(1, 120))  # past original_max_position_embeddings
    out = eng.generate([prompt], SamplingParams(temperature=0, max_tokens=4, logprobs=256))[0]
    c = out.outputs[0]
    ref = _hf_logprobs(hf, prompt + c.token_ids, len(prompt))
    torch.testing.assert_close(_our_logprobs(c, 256), ref, atol=2e-5, rtol=1e-4)
    eng.shutdown()


def test_mistral_sliding_window_rejected(tiny_model_factory) -> None:
    d = tiny_model_factory("MistralForCausalLM", sliding_window=128)
    with pytest.raises(ValueError, match="sliding-window"):
        Engine(str(d), show_progress=False)


def test_unknown_architecture_lists_supported(tmp_path) -> None:
    import json

    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["GPT2LMHeadModel"], "hidden_size": 8})
    )
    with pytest.raises(ValueError, match=r"LlamaForCausalLM.*Qwen3ForCausalLM"):
        Engine(str(tmp_path), show_progress=False)


CHAT_PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"}],
    [{"role": "user", "content": "List three colors."}],
]
PLAIN_PROMPTS = [
    "The quick brown fox",
    "Once upon a time, in a land far away,",
    "def fibonacci(n):",
    "Les mots français: café, élève, où",
]


@pytest.fixture(scope="module")
def default_engine(default_model_dir):
    eng = Engine(str(default_model_dir), show_progress=False)
    yield eng
    eng.shutdown()


def test_default_model_greedy_matches_hf(default_engine, default_model_dir) -> None:
    hf = _hf(default_model_dir)
    tok = default_engine.tokenizer
    prompts = [tok.apply_chat_template(m) for m in CHAT_PROMPTS]
    prompts += [tok.encode(p) for p in PLAIN_PROMPTS]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    outs = default_engine.generate(prompts, params)
    for prompt, out in zip(prompts, outs):
        ref = _hf_greedy(hf, prompt, 32)
        assert out.outputs[0].token_ids == ref, tok.decode(prompt)


def test_default_model_knows_paris(default_engine) -> None:
    out = default_engine.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(temperature=0, max_tokens=24),
    )[0]
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop"
