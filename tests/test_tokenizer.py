"""Tests for graphrt.tokenizer: wrapper, incremental detokenization, stop strings.

All tokenizers are trained in-test with the ``tokenizers`` library; nothing is downloaded.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from graphrt.tokenizer import IncrementalDetokenizer, StopStringMatcher, Tokenizer

CORPUS = [
    "Hello world, this is a small corpus for testing the tokenizer.",
    "Café crème brûlée, déjà vu; naïve résumé à la carte.",
    "中文测试 文本 中文字符 你好世界",
    "Party time 🎉 hooray 🎉! Let's go 🚀.",
    "the quick brown fox jumps over the lazy dog",
    "  leading spaces and\ttabs\nand new lines  ",
] * 20

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Characters that hypothesis builds texts from: ASCII, multi-byte characters the tokenizers
# know and ones they only know as bytes.
ALPHABET = "abcdehlorw ,.!\n" + "éèà" + "中文你" + "🎉🚀" + "ü字"
SAMPLE_TEXT = "Hello wörld 🎉 中文 déjà 🚀!"

settings.register_profile(
    "graphrt-tokenizer",
    deadline=None,
    max_examples=150,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def _byte_level_raw() -> RawTokenizer:
    tok = RawTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # A small vocabulary leaves emoji as several byte-level tokens.
    trainer = trainers.BpeTrainer(
        vocab_size=330,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def _metaspace_raw() -> RawTokenizer:
    tok = RawTokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.UnigramTrainer(
        vocab_size=200,
        special_tokens=["<unk>", "<s>", "</s>"],
        unk_token="<unk>",
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def _llama2_raw() -> RawTokenizer:
    """SentencePiece-BPE layout of Llama-2: "▁" for spaces, byte fallback, Strip decoder."""
    ascii_corpus = [line for line in CORPUS if line.isascii()]
    tok = RawTokenizer(models.BPE(unk_token="<unk>"))
    # Train on words, as SentencePiece does, so that no merge spans a word boundary.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    tok.train_from_iterator(ascii_corpus, trainer)
    # Re-create the model with byte-fallback tokens so non-ASCII text encodes as <0xNN>.
    state = json.loads(tok.model.__getstate__())
    vocab = dict(state["vocab"])
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    tok.model = models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    tok.pre_tokenizer = None
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    return tok


def _has_byte_fallback(tok: Tokenizer) -> bool:
    """Whether decoding uses ByteFallback, which is not local on invalid UTF-8.

    ByteFallback turns a whole run of byte tokens into U+FFFDs when the run is not valid
    UTF-8, so a special token that interrupts a character retroactively replaces the
    complete characters before it in the same run; no streaming decoder can match that.
    """
    return "ByteFallback" in repr(tok.hf.backend_tokenizer.decoder)


@pytest.fixture(scope="module")
def byte_level_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    hf = PreTrainedTokenizerFast(
        tokenizer_object=_byte_level_raw(),
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
    )
    hf.chat_template = CHATML
    path = tmp_path_factory.mktemp("byte_level")
    hf.save_pretrained(str(path))
    # The second eos only appears in generation_config.json, as for many chat models.
    (path / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [hf.convert_tokens_to_ids("<|endoftext|>"), 2]})
    )
    return path


@pytest.fixture(scope="module")
def byte_level(byte_level_dir: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(byte_level_dir)


@pytest.fixture(scope="module")
def metaspace() -> Tokenizer:
    hf = PreTrainedTokenizerFast(
        tokenizer_object=_metaspace_raw(), bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    return Tokenizer(hf)


@pytest.fixture(scope="module")
def llama2() -> Tokenizer:
    hf = PreTrainedTokenizerFast(
        tokenizer_object=_llama2_raw(), bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    return Tokenizer(hf)


@pytest.fixture(scope="module", params=["byte_level", "metaspace", "llama2"])
def any_tok(request: pytest.FixtureRequest) -> Tokenizer:
    return request.getfixturevalue(request.param)


def _special_ids(tok: Tokenizer) -> list[int]:
    return sorted(set(tok.hf.all_special_ids))


def _chunks(ids: list[int], sizes: list[int]) -> list[list[int]]:
    out, i = [], 0
    for size in sizes:
        if i >= len(ids):
            break
        out.append(ids[i : i + size])
        i += size
    if i < len(ids):
        out.append(ids[i:])
    return out


def _common_prefix_len(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


# --- Tokenizer ---------------------------------------------------------------------------


def test_fixture_tokenizers_split_characters(
    byte_level: Tokenizer, llama2: Tokenizer, metaspace: Tokenizer
) -> None:
    # The detokenizer tests below are only meaningful if characters do get split.
    assert len(byte_level.encode("🎉", add_special_tokens=False)) > 1
    assert (
        byte_level.token_strings(byte_level.encode("🎉", add_special_tokens=False))[0] == "\ufffd"
    )
    ids = llama2.encode("中", add_special_tokens=False)
    assert llama2.convert_ids_to_tokens(ids)[-3:] == ["<0xE4>", "<0xB8>", "<0xAD>"]
    assert any(t.startswith("▁") for t in metaspace.convert_ids_to_tokens(metaspace.encode("a b")))


def test_from_pretrained(byte_level: Tokenizer, byte_level_dir: Path) -> None:
    assert byte_level.hf.is_fast
    assert byte_level.vocab_size == len(byte_level.hf)
    assert Tokenizer.from_pretrained(str(byte_level_dir)).vocab_size == byte_level.vocab_size


def test_from_pretrained_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        Tokenizer.from_pretrained(tmp_path / "nope")


def test_from_pretrained_rejects_slow_tokenizer(
    byte_level_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import transformers

    class Slow:
        is_fast = False

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: Slow())
    with pytest.raises(ValueError, match=r"byte_level.*not a fast"):
        Tokenizer.from_pretrained(byte_level_dir)


@pytest.mark.parametrize(
    "text", ["Hello world", SAMPLE_TEXT, "", "  spaces  ", "\n\ttab", "🎉🎉🎉"]
)
def test_encode_decode_roundtrip(
    any_tok: Tokenizer, text: str, request: pytest.FixtureRequest
) -> None:
    ids = any_tok.encode(text, add_special_tokens=False)
    assert all(isinstance(i, int) for i in ids)
    assert any_tok.decode(ids) == any_tok.hf.decode(ids, skip_special_tokens=True)
    if any_tok is not request.getfixturevalue("metaspace"):
        # (The Unigram fixture has no byte fallback and loses leading spaces.)
        assert any_tok.decode(ids) == text


def test_decode_special_tokens(byte_level: Tokenizer) -> None:
    end = byte_level.hf.convert_tokens_to_ids("<|im_end|>")
    ids = [*byte_level.encode("hi", add_special_tokens=False), end]
    assert byte_level.decode(ids) == "hi"
    assert byte_level.decode(ids, skip_special_tokens=False) == "hi<|im_end|>"
    assert byte_level.decode(tuple(ids)) == "hi"


def test_encode_special_tokens_in_text(byte_level: Tokenizer) -> None:
    ids = byte_level.encode("<|im_start|>user", add_special_tokens=False)
    assert ids[0] == byte_level.hf.convert_tokens_to_ids("<|im_start|>")


def test_convert_ids_to_tokens(byte_level: Tokenizer) -> None:
    ids = byte_level.encode("é", add_special_tokens=False)
    assert byte_level.convert_ids_to_tokens(ids) == ["Ã©"]


def test_token_strings(byte_level: Tokenizer, metaspace: Tokenizer, llama2: Tokenizer) -> None:
    ids = byte_level.encode("🎉", add_special_tokens=False)
    strings = byte_level.token_strings(ids)
    assert all(s and s == "\ufffd" * len(s) for s in strings)
    # Cached per id, same answer the second time.
    assert byte_level.token_strings(ids) == strings
    ids = byte_level.encode("Hello world", add_special_tokens=False)
    assert "".join(byte_level.token_strings(ids)) == "Hello world"
    end = byte_level.hf.convert_tokens_to_ids("<|im_end|>")
    assert byte_level.token_strings([end]) == ["<|im_end|>"]
    # SentencePiece-style decoders drop a lone token's leading space; token_strings keeps it.
    for tok in (metaspace, llama2):
        ids = tok.encode("hello world", add_special_tokens=False)
        strings = tok.token_strings(ids)
        assert "".join(strings) == " hello world"
        assert strings[0].startswith(" ")


def test_chat_template_ids_match_rendered_text(byte_level: Tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Salut, ça va? 🎉"},
    ]
    text = byte_level.chat_prompt_text(messages)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nSalut, ça va? 🎉<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = byte_level.apply_chat_template(messages)
    assert isinstance(ids, list)
    assert all(type(i) is int for i in ids)
    assert ids == byte_level.encode(text, add_special_tokens=False)
    assert byte_level.decode(ids, skip_special_tokens=False) == text

    no_prompt = byte_level.chat_prompt_text(messages, add_generation_prompt=False)
    assert not no_prompt.endswith("assistant\n")
    assert byte_level.apply_chat_template(messages, add_generation_prompt=False) == (
        byte_level.encode(no_prompt, add_special_tokens=False)
    )


def test_chat_template_override_and_template_kwargs(byte_level: Tokenizer) -> None:
    messages = [{"role": "user", "content": "hi"}]
    template = "{{ greeting }}{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    text = byte_level.chat_prompt_text(messages, chat_template=template, greeting="yo")
    assert text == "yo[hi]"
    ids = byte_level.apply_chat_template(messages, chat_template=template, greeting="yo")
    assert ids == byte_level.encode("yo[hi]", add_special_tokens=False)


def test_chat_template_rejects_return_shape_kwargs(byte_level: Tokenizer) -> None:
    with pytest.raises(TypeError, match="return_dict"):
        byte_level.apply_chat_template([{"role": "user", "content": "x"}], return_dict=True)


def test_missing_chat_template(metaspace: Tokenizer) -> None:
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(ValueError, match="model has no chat template"):
        metaspace.apply_chat_template(messages)
    with pytest.raises(ValueError, match="model has no chat template"):
        metaspace.chat_prompt_text(messages)


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([], "non-empty list.*empty list"),
        ("hello", "non-empty list.*str"),
        (None, "non-empty list"),
        (["hello"], r"messages\[0\] must be a dict"),
        ([{"role": "user", "content": "a"}, {"content": "b"}], r"messages\[1\] has no 'role'"),
        ([{"role": "user"}], r"messages\[0\] has no 'content'"),
        ([{"role": 3, "content": "x"}], r"messages\[0\]\['role'\] must be a str"),
        ([{"role": "user", "content": None}], r"messages\[0\]\['content'\] must be a str"),
    ],
)
def test_bad_messages(byte_level: Tokenizer, messages: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        byte_level.apply_chat_template(messages)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=match):
        byte_level.chat_prompt_text(messages)  # type: ignore[arg-type]


def test_eos_union(byte_level: Tokenizer) -> None:
    im_end = byte_level.hf.convert_tokens_to_ids("<|im_end|>")
    eot = byte_level.hf.convert_tokens_to_ids("<|endoftext|>")
    assert byte_level.hf.eos_token_id == im_end
    assert byte_level.eos_token_ids == frozenset({im_end, eot})
    assert isinstance(byte_level.eos_token_ids, frozenset)


@pytest.mark.parametrize(
    ("config", "extra"),
    [
        (None, set()),
        ({"eos_token_id": 0}, {0}),
        ({"eos_token_id": [0, 3]}, {0, 3}),
        ({"eos_token_id": None}, set()),
        ({"temperature": 0.7}, set()),
    ],
)
def test_eos_from_generation_config(
    byte_level_dir: Path, tmp_path: Path, config: dict | None, extra: set[int]
) -> None:
    for f in byte_level_dir.iterdir():
        if f.name != "generation_config.json":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    if config is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_pretrained(tmp_path)
    assert tok.eos_token_ids == frozenset({tok.hf.eos_token_id} | extra)


def test_bad_generation_config(byte_level_dir: Path, tmp_path: Path) -> None:
    for f in byte_level_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": "x"}')
    with pytest.raises(ValueError, match="eos_token_id"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"generation_config\.json"):
        Tokenizer.from_pretrained(tmp_path)


def test_explicit_generation_config_eos(metaspace: Tokenizer) -> None:
    tok = Tokenizer(metaspace.hf, generation_config_eos=[7, 8])
    assert tok.eos_token_ids == frozenset({metaspace.hf.eos_token_id, 7, 8})


# --- IncrementalDetokenizer --------------------------------------------------------------


def _stream(det: IncrementalDetokenizer, chunks: list[list[int]]) -> list[str]:
    return [det.step(chunk) for chunk in chunks]


@pytest.mark.parametrize("use_decode_stream", [True, False])
def test_detokenizer_emoji_split_across_tokens(
    byte_level: Tokenizer, use_decode_stream: bool
) -> None:
    ids = byte_level.encode("a🎉b", add_special_tokens=False)
    emoji = byte_level.encode("🎉", add_special_tokens=False)
    assert len(emoji) >= 2
    det = IncrementalDetokenizer(byte_level, use_decode_stream=use_decode_stream)
    deltas = _stream(det, [[i] for i in ids])
    assert "".join(deltas) == "a🎉b"
    assert "\ufffd" not in "".join(deltas)
    # The partial emoji tokens produce nothing; the last one produces the whole emoji.
    assert deltas.count("") == len(emoji) - 1
    assert "🎉" in deltas
    assert det.text == "a🎉b"
    assert det.token_ids == ids


@pytest.mark.parametrize("use_decode_stream", [True, False])
def test_detokenizer_byte_fallback_split(llama2: Tokenizer, use_decode_stream: bool) -> None:
    ids = llama2.encode("hello 中 world", add_special_tokens=False)
    det = IncrementalDetokenizer(llama2, use_decode_stream=use_decode_stream)
    deltas = _stream(det, [[i] for i in ids])
    assert "".join(deltas) == "hello 中 world"
    assert "\ufffd" not in "".join(deltas)


@pytest.mark.parametrize("use_decode_stream", [True, False])
@pytest.mark.parametrize("skip_special_tokens", [True, False])
@settings(settings.get_profile("graphrt-tokenizer"))
@given(
    text=st.text(alphabet=ALPHABET, max_size=40),
    specials=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 10**6)), max_size=4),
    sizes=st.lists(st.integers(1, 5), max_size=40),
)
def test_detokenizer_matches_full_decode(
    any_tok: Tokenizer,
    use_decode_stream: bool,
    skip_special_tokens: bool,
    text: str,
    specials: list[tuple[int, int]],
    sizes: list[int],
) -> None:
    ids = any_tok.encode(text, add_special_tokens=False)
    special_ids = _special_ids(any_tok)
    for pos, which in specials:
        ids.insert(pos % (len(ids) + 1), special_ids[which % len(special_ids)])
    expected = any_tok.decode(ids, skip_special_tokens=skip_special_tokens)
    assume(not expected.endswith("\ufffd"))
    if _has_byte_fallback(any_tok):
        assume("\ufffd" not in expected)
    det = any_tok.new_detokenizer([], skip_special_tokens=skip_special_tokens)
    if not use_decode_stream:
        det = IncrementalDetokenizer(
            any_tok, [], skip_special_tokens, use_decode_stream=use_decode_stream
        )
    deltas = _stream(det, _chunks(ids, sizes))
    assert "".join(deltas) == expected
    assert det.text == expected
    assert det.token_ids == ids
    assert det.flush() == ""
    if "\ufffd" not in expected:
        assert not any("\ufffd" in d for d in deltas)


@pytest.mark.parametrize("skip_special_tokens", [True, False])
@settings(settings.get_profile("graphrt-tokenizer"))
@given(data=st.data())
def test_detokenizer_random_ids(
    any_tok: Tokenizer, skip_special_tokens: bool, data: st.DataObject
) -> None:
    # Arbitrary id sequences, including invalid UTF-8 byte runs in the middle.
    ids = data.draw(st.lists(st.integers(0, any_tok.vocab_size - 1), max_size=30))
    sizes = data.draw(st.lists(st.integers(1, 4), max_size=30))
    expected = any_tok.decode(ids, skip_special_tokens=skip_special_tokens)
    if _has_byte_fallback(any_tok):
        assume("\ufffd" not in expected)
    for use_decode_stream in (True, False):
        det = IncrementalDetokenizer(
            any_tok, (), skip_special_tokens, use_decode_stream=use_decode_stream
        )
        deltas = _stream(det, _chunks(ids, sizes))
        tail = det.flush()
        assert "".join(deltas) + tail == expected
        if not expected.endswith("\ufffd"):
            assert tail == ""


def test_simple_token_texts_only_for_byte_level(
    byte_level: Tokenizer, metaspace: Tokenizer, llama2: Tokenizer
) -> None:
    assert metaspace.simple_token_texts(True) is None
    assert llama2.simple_token_texts(True) is None
    for skip in (True, False):
        texts = byte_level.simple_token_texts(skip)
        assert texts is not None and texts is byte_level.simple_token_texts(skip)
        for i, t in enumerate(texts):
            if t is not None:
                assert byte_level.decode([i], skip_special_tokens=skip) == t
    emoji = byte_level.encode("🎉", add_special_tokens=False)
    assert byte_level.simple_token_texts(True)[emoji[0]] is None  # part of a character
    eos = byte_level.hf.eos_token_id
    assert byte_level.simple_token_texts(True)[eos] == ""
    assert byte_level.simple_token_texts(False)[eos] == "<|im_end|>"


@pytest.mark.parametrize("use_decode_stream", [True, False])
@pytest.mark.parametrize("skip_special_tokens", [True, False])
@settings(settings.get_profile("graphrt-tokenizer"))
@given(data=st.data())
def test_detokenizer_fast_path_gives_the_same_deltas(
    byte_level: Tokenizer, use_decode_stream: bool, skip_special_tokens: bool, data: st.DataObject
) -> None:
    # The byte-level lookup must give exactly the deltas of decoding, token by token, for any
    # prompt and any ids: text, byte pieces of characters, special tokens, ids past the vocab.
    vocab = byte_level.vocab_size
    text = data.draw(st.text(alphabet=ALPHABET, max_size=30))
    ids = byte_level.encode(text, add_special_tokens=False)
    noise = data.draw(st.lists(st.tuples(st.integers(0, 60), st.integers(0, vocab + 5))))
    for pos, tid in noise:
        ids.insert(pos % (len(ids) + 1), tid)
    cut = data.draw(st.integers(0, len(ids)))
    prompt, gen = [t for t in ids[:cut] if t < vocab], ids[cut:]
    kw = dict(skip_special_tokens=skip_special_tokens, use_decode_stream=use_decode_stream)
    fast = IncrementalDetokenizer(byte_level, prompt, **kw)
    slow = IncrementalDetokenizer(byte_level, prompt, fast_path=False, **kw)
    assert [fast.step_one(t) for t in gen] == [slow.step_one(t) for t in gen]
    assert fast.text == slow.text and fast.token_ids == slow.token_ids
    assert fast.flush() == slow.flush()


def test_default_tokenizer_fast_path(default_model_dir: Path) -> None:
    tok = Tokenizer.from_pretrained(default_model_dir)
    assert tok.simple_token_texts(True) is not None  # SmolLM2: a byte-level decoder
    ids = tok.encode("Déjà vu 東京 🚀 <|im_end|> fin.\n", add_special_tokens=False)
    for skip in (True, False):
        fast = tok.new_detokenizer([1, 2, 3], skip)
        slow = IncrementalDetokenizer(tok, [1, 2, 3], skip, fast_path=False)
        assert [fast.step_one(t) for t in ids] == [slow.step_one(t) for t in ids]


@settings(settings.get_profile("graphrt-tokenizer"))
@given(text=st.text(alphabet=ALPHABET, min_size=1, max_size=40), data=st.data())
def test_detokenizer_decode_stream_and_window_agree(
    any_tok: Tokenizer, text: str, data: st.DataObject
) -> None:
    ids = any_tok.encode(text, add_special_tokens=False)
    sizes = data.draw(st.lists(st.integers(1, 3), max_size=40))
    chunks = _chunks(ids, sizes)
    a = IncrementalDetokenizer(any_tok, use_decode_stream=True)
    b = IncrementalDetokenizer(any_tok, use_decode_stream=False)
    assert _stream(a, chunks) == _stream(b, chunks)


@pytest.mark.parametrize("use_decode_stream", [True, False])
@settings(settings.get_profile("graphrt-tokenizer"))
@given(text=st.text(alphabet=ALPHABET, min_size=1, max_size=40), data=st.data())
def test_detokenizer_with_prompt_context(
    any_tok: Tokenizer, use_decode_stream: bool, text: str, data: st.DataObject
) -> None:
    ids = any_tok.encode(text, add_special_tokens=False)
    cut = data.draw(st.integers(0, len(ids)))
    prompt, gen = ids[:cut], ids[cut:]
    # Chat templates put special tokens right before the output.
    special_ids = _special_ids(any_tok)
    for pos in data.draw(st.lists(st.integers(0, 50), max_size=2)):
        prompt.insert(pos % (len(prompt) + 1), special_ids[pos % len(special_ids)])
    sizes = data.draw(st.lists(st.integers(1, 4), max_size=40))
    full = any_tok.decode(prompt + gen)
    assume(not full.endswith("\ufffd"))
    if _has_byte_fallback(any_tok):
        assume("\ufffd" not in full)
    # The output is what decoding prompt + output adds to the prompt's complete characters;
    # a character the prompt left unfinished belongs to the output.
    complete = len(prompt)
    while complete and any_tok.decode(prompt[:complete]).endswith("\ufffd"):
        complete -= 1
    prompt_text = any_tok.decode(prompt[:complete])
    assert full.startswith(prompt_text)
    expected = full[len(prompt_text) :]
    det = IncrementalDetokenizer(any_tok, prompt, use_decode_stream=use_decode_stream)
    assert "".join(_stream(det, _chunks(gen, sizes))) == expected


@pytest.mark.parametrize("use_decode_stream", [True, False])
def test_detokenizer_leading_space_after_prompt(
    metaspace: Tokenizer, llama2: Tokenizer, use_decode_stream: bool
) -> None:
    for tok in (metaspace, llama2):
        ids = tok.encode("hello world", add_special_tokens=False)
        tokens = tok.convert_ids_to_tokens(ids)
        cut = next(i for i in range(1, len(ids)) if tokens[i].startswith("▁"))
        prompt, gen = ids[:cut], ids[cut:]
        assert tok.decode(gen) == "world"  # a lone decode loses the space
        det = IncrementalDetokenizer(tok, prompt, use_decode_stream=use_decode_stream)
        assert "".join(det.step([i]) for i in gen) == " world"
        # Special tokens at the end of the prompt (chat templates) don't get in the way.
        bos = tok.hf.bos_token_id
        det = IncrementalDetokenizer(tok, [*prompt, bos], use_decode_stream=use_decode_stream)
        assert det.step(gen) == " world"


@pytest.mark.parametrize("use_decode_stream", [True, False])
def test_detokenizer_long_prompt_uses_tail(byte_level: Tokenizer, use_decode_stream: bool) -> None:
    prompt = byte_level.encode("the quick brown fox " * 50, add_special_tokens=False)
    gen = byte_level.encode("jumps 🎉", add_special_tokens=False)
    det = IncrementalDetokenizer(byte_level, prompt, use_decode_stream=use_decode_stream)
    assert det.step(gen) == "jumps 🎉"
    assert det.token_ids == gen


def test_detokenizer_recovers_from_decode_stream_error(
    any_tok: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import graphrt.tokenizer as mod

    real = mod.DecodeStream

    class Failing:
        """DecodeStream that gives up on its 4th step, as on an "invalid prefix"."""

        def __init__(self, **kw: object) -> None:
            self.inner = real(**kw)
            self.steps = 0

        def step(self, tokenizer: object, token_id: int) -> str | None:
            self.steps += 1
            if self.steps == 4:
                raise Exception("Invalid prefix encountered")
            return self.inner.step(tokenizer, token_id)

    monkeypatch.setattr(mod, "DecodeStream", Failing)
    text = "hello wörld 🎉 中文 déjà 🚀!"
    for prompt_text in ("", "say: "):
        prompt = any_tok.encode(prompt_text, add_special_tokens=False)
        ids = any_tok.encode(text, add_special_tokens=False)
        if prompt_text:
            ids = any_tok.encode(prompt_text + text, add_special_tokens=False)[len(prompt) :]
        expected = any_tok.decode(prompt + ids)[len(any_tok.decode(prompt)) :]
        det = IncrementalDetokenizer(any_tok, prompt)
        assert "".join(det.step([i]) for i in ids) == expected


@pytest.mark.parametrize("use_decode_stream", [True, False])
def test_detokenizer_flush_incomplete_character(
    byte_level: Tokenizer, use_decode_stream: bool
) -> None:
    ids = byte_level.encode("ok🎉", add_special_tokens=False)[:-1]
    det = IncrementalDetokenizer(byte_level, use_decode_stream=use_decode_stream)
    assert det.step(ids) == "ok"
    assert det.flush() == "\ufffd"
    assert det.text == byte_level.decode(ids) == "ok\ufffd"


def test_detokenizer_skips_or_keeps_special_tokens(byte_level: Tokenizer) -> None:
    end = byte_level.hf.convert_tokens_to_ids("<|im_end|>")
    ids = [*byte_level.encode("hi", add_special_tokens=False), end]
    assert byte_level.new_detokenizer([]).step(ids) == "hi"
    det = byte_level.new_detokenizer([], skip_special_tokens=False)
    assert det.step(ids) == "hi<|im_end|>"


def test_detokenizer_empty_step(byte_level: Tokenizer) -> None:
    det = byte_level.new_detokenizer(byte_level.encode("x"))
    assert det.step([]) == ""
    assert det.text == ""
    assert det.token_ids == []


# --- StopStringMatcher --------------------------------------------------------------------


def _feed_all(matcher: StopStringMatcher, deltas: list[str]) -> tuple[list[str], bool]:
    out = []
    for delta in deltas:
        text, stopped = matcher.feed(delta)
        out.append(text)
        if stopped:
            return out, True
    out.append(matcher.flush())
    return out, False


def _reference(text: str, stops: list[str], include: bool) -> tuple[str, str | None]:
    """Stop that ends first in the full text (ties: the longest); output before it."""
    best = None
    for s in stops:
        i = text.find(s)
        if i >= 0:
            key = (i + len(s), -len(s))
            if best is None or key < best[0]:
                best = (key, i, s)
    if best is None:
        return text, None
    _, i, s = best
    return text[: i + len(s)] if include else text[:i], s


def test_stop_spanning_deltas() -> None:
    m = StopStringMatcher(["STOP"])
    assert m.feed("abc ST") == ("abc ", False)
    assert m.feed("O") == ("", False)
    assert m.feed("P and more") == ("", True)
    assert m.matched == "STOP"
    assert m.stopped
    # Nothing after the stop, ever.
    assert m.feed("STOP again") == ("", True)
    assert m.flush() == ""


def test_stop_spanning_many_single_char_deltas() -> None:
    m = StopStringMatcher(["<|end|>"])
    out, stopped = _feed_all(m, list("x = 1<|end|>tail"))
    assert stopped
    assert "".join(out) == "x = 1"


def test_stop_include_in_output() -> None:
    m = StopStringMatcher(["STOP"], include_stop_str_in_output=True)
    assert m.feed("abc ST") == ("abc ", False)
    assert m.feed("OP xyz") == ("STOP", True)
    assert m.matched == "STOP"


def test_stop_false_start_is_released() -> None:
    m = StopStringMatcher(["STOP"])
    assert m.feed("a ST") == ("a ", False)
    assert m.feed("Ox") == ("STOx", False)
    assert m.feed("S") == ("", False)
    assert m.flush() == "S"
    assert m.matched is None
    assert not m.stopped


def test_stop_flush_releases_held_text() -> None:
    m = StopStringMatcher(["STOP"])
    assert m.feed("abc ST") == ("abc ", False)
    assert m.flush() == "ST"
    with pytest.raises(RuntimeError, match="after flush"):
        m.feed("OP")


def test_stop_overlapping_prefix() -> None:
    for deltas in (["ababc"], list("ababc"), ["ab", "abc"], ["a", "ba", "bcd"]):
        m = StopStringMatcher(["abc"])
        out, stopped = _feed_all(m, deltas)
        assert stopped
        assert "".join(out) == "ab"
    m = StopStringMatcher(["aab"])
    # The longest suffix that can still grow into "aab" is "aa"; older "a"s are released.
    assert _feed_all(m, list("aaaab")) == (["", "", "a", "a", ""], True)


def test_stop_multiple_candidates_earliest_wins() -> None:
    for deltas in (["hello world"], list("hello world")):
        m = StopStringMatcher(["world", "lo"])
        out, stopped = _feed_all(m, deltas)
        assert stopped
        assert "".join(out) == "hel"
        assert m.matched == "lo"
    # Two stops ending at the same place: the longer (earlier-starting) one wins.
    m = StopStringMatcher(["User:", "\nUser:"])
    assert m.feed("Sure.\nUser: hi") == ("Sure.", True)
    assert m.matched == "\nUser:"
    # A stop inside a longer one ends first, so it wins, however the text is chunked.
    for deltas in (["abcd"], list("abcd")):
        m = StopStringMatcher(["abcd", "bc"])
        out, stopped = _feed_all(m, deltas)
        assert "".join(out) == "a"
        assert m.matched == "bc"


def test_stop_no_stops_passes_through() -> None:
    m = StopStringMatcher([])
    assert m.feed("anything") == ("anything", False)
    assert m.flush() == ""


def test_stop_invalid() -> None:
    with pytest.raises(ValueError, match="empty"):
        StopStringMatcher(["ok", ""])
    with pytest.raises(TypeError):
        StopStringMatcher("STOP")
    with pytest.raises(TypeError):
        StopStringMatcher([1])  # type: ignore[list-item]


def test_stop_hold_back_is_bounded() -> None:
    stop = "x" * 49 + "y"
    m = StopStringMatcher([stop])
    emitted = 0
    fed = 0
    for _ in range(2000):
        text, stopped = m.feed("xx")
        fed += 2
        emitted += len(text)
        assert not stopped
        assert fed - emitted <= len(stop) - 1
    text, stopped = m.feed("y!")
    assert stopped
    assert emitted + len(text) == fed + 1 - len(stop)


def test_stop_unicode() -> None:
    m = StopStringMatcher(["🎉中"], include_stop_str_in_output=True)
    out, stopped = _feed_all(m, ["déjà 🎉", "🎉", "中文"])
    assert stopped
    assert "".join(out) == "déjà 🎉🎉中"


@settings(max_examples=400, deadline=None)
@given(
    text=st.text(alphabet="abc \n", max_size=40),
    stops=st.lists(st.text(alphabet="abc \n", min_size=1, max_size=4), max_size=3),
    cuts=st.lists(st.integers(0, 40), max_size=10),
    include=st.booleans(),
)
def test_stop_any_chunking_matches_reference(
    text: str, stops: list[str], cuts: list[int], include: bool
) -> None:
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    deltas = [text[a:b] for a, b in itertools.pairwise(bounds)]
    expected, expected_stop = _reference(text, stops, include)

    m = StopStringMatcher(stops, include_stop_str_in_output=include)
    max_len = max((len(s) for s in stops), default=1)
    emitted, fed, stopped = "", 0, False
    for delta in deltas:
        out, stopped = m.feed(delta)
        emitted += out
        fed += len(delta)
        # Never emit anything the final output won't have.
        assert expected.startswith(emitted)
        if stopped:
            break
        assert fed - len(emitted) <= max_len - 1
    if not stopped:
        emitted += m.flush()
    assert emitted == expected
    assert stopped == (expected_stop is not None)
    assert m.matched == expected_stop


# --- A real model's tokenizer, when a colleague has prepared it --------------------------

SMOLLM2 = Path("/root/.cache/graphrt/SmolLM2-135M-Instruct")


@pytest.mark.skipif(not SMOLLM2.is_dir(), reason=f"{SMOLLM2} not present")
def test_smollm2_tokenizer() -> None:
    tok = Tokenizer.from_pretrained(SMOLLM2)
    assert tok.hf.is_fast
    im_end = tok.hf.convert_tokens_to_ids("<|im_end|>")
    assert im_end in tok.eos_token_ids
    messages = [{"role": "user", "content": "Say 🎉 in 中文"}]
    text = tok.chat_prompt_text(messages)
    ids = tok.apply_chat_template(messages)
    assert ids == tok.encode(text, add_special_tokens=False)
    assert text.endswith("<|im_start|>assistant\n")
    answer = "Sure! 🎉 means 庆祝, déjà vu."
    gen = [*tok.encode(answer, add_special_tokens=False), im_end]
    det = tok.new_detokenizer(ids)
    assert "".join(det.step([i]) for i in gen) == answer == tok.decode(gen)
