"""EngineConfig: defaults, validation messages, unknown keys, and the CLI round trip."""

from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from graphrt.config import EngineConfig


def test_defaults_are_valid_and_frozen() -> None:
    cfg = EngineConfig()
    assert cfg.page_size == 16
    assert cfg.model is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.page_size = 32  # type: ignore[misc]


def test_valid_non_defaults_construct() -> None:
    cfg = EngineConfig(
        model="/m",
        dtype="float32",
        device="cpu",
        page_size=1,
        gpu_memory_utilization=0.5,
        num_pages=2,
        cpu_kv_cache_gb=2,  # an int where a float is expected is fine
        max_model_len=2,
        max_num_batched_tokens=16,
        max_logprobs=0,
        cuda_graph_max_bs=0,
        cuda_graph_batch_sizes=(1, 2, 4),
        overlap="off",
    )
    assert cfg.cuda_graph_batch_sizes == (1, 2, 4)


BAD_VALUES: list[tuple[str, Any, type[Exception]]] = [
    ("model", 5, TypeError),
    ("tokenizer", b"/t", TypeError),
    ("load_format", "pt", ValueError),
    ("dtype", "fp32", ValueError),
    ("device", "tpu", ValueError),
    ("device", None, ValueError),
    ("seed", "0", TypeError),
    ("seed", 1.5, TypeError),
    ("seed", True, TypeError),  # bool is an int subclass, but never a valid setting
    ("page_size", 0, ValueError),
    ("page_size", 24, ValueError),  # not a power of two
    ("page_size", 2048, ValueError),  # power of two, out of range
    ("page_size", 16.0, TypeError),
    ("page_size", None, TypeError),
    ("gpu_memory_utilization", 1.0, ValueError),
    ("gpu_memory_utilization", 0.0, ValueError),
    ("gpu_memory_utilization", math.nan, ValueError),
    ("gpu_memory_utilization", "0.5", TypeError),
    ("gpu_memory_utilization", False, TypeError),
    ("num_pages", 1, ValueError),
    ("num_pages", -3, ValueError),
    ("num_pages", 4.0, TypeError),
    ("cpu_kv_cache_gb", 0, ValueError),
    ("cpu_kv_cache_gb", -1.0, ValueError),
    ("cpu_kv_cache_gb", math.inf, ValueError),
    ("max_model_len", 1, ValueError),
    ("max_model_len", "4k", TypeError),
    ("max_num_seqs", 0, ValueError),
    ("max_num_batched_tokens", 8, ValueError),
    ("max_waiting_requests", 0, ValueError),
    ("max_logprobs", -1, ValueError),
    ("attention_backend", "cudnn", ValueError),
    ("cuda_graph_max_bs", -1, ValueError),
    ("cuda_graph_batch_sizes", (), ValueError),
    ("cuda_graph_batch_sizes", (1, 2, 2), ValueError),  # duplicates
    ("cuda_graph_batch_sizes", (4, -8), ValueError),
    ("cuda_graph_batch_sizes", (0,), ValueError),
    ("cuda_graph_batch_sizes", (1.5,), ValueError),
    ("cuda_graph_batch_sizes", (True, 2), ValueError),
    ("cuda_graph_batch_sizes", [1, 2], TypeError),  # only from_kwargs converts lists
    ("overlap", "both", ValueError),
]


@pytest.mark.parametrize(("name", "value", "exc"), BAD_VALUES)
def test_bad_value_raises_naming_field(name: str, value: Any, exc: type[Exception]) -> None:
    with pytest.raises(exc, match=name):
        EngineConfig(**{name: value})


def test_replace_validates_again() -> None:
    cfg = EngineConfig()
    assert cfg.replace(page_size=32).page_size == 32
    with pytest.raises(ValueError, match="page_size"):
        cfg.replace(page_size=3)


def test_from_kwargs_unknown_key_suggests_the_field() -> None:
    with pytest.raises(TypeError, match=r"'page_sise'.*did you mean 'page_size'"):
        EngineConfig.from_kwargs(page_sise=16)
    with pytest.raises(TypeError, match=r"'max_num_seq'.*did you mean 'max_num_seqs'"):
        EngineConfig.from_kwargs(max_num_seq=4)


def test_from_kwargs_unknown_key_without_close_match() -> None:
    with pytest.raises(TypeError, match="unknown engine setting") as e:
        EngineConfig.from_kwargs(zzzzzz=1)
    assert "did you mean" not in str(e.value)


def test_from_kwargs_accepts_known_keys_and_lists() -> None:
    cfg = EngineConfig.from_kwargs(page_size=8, cuda_graph_batch_sizes=[1, 8])
    assert cfg == EngineConfig(page_size=8, cuda_graph_batch_sizes=(1, 8))
    # Validation still applies after the key check.
    with pytest.raises(ValueError, match="page_size"):
        EngineConfig.from_kwargs(page_size=12)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    EngineConfig.add_cli_args(p)
    return p


def test_cli_defaults_equal_dataclass_defaults() -> None:
    args = _parser().parse_args([])
    for f in dataclasses.fields(EngineConfig):
        assert getattr(args, f.name) == f.default, f.name
    assert EngineConfig.from_cli_args(args) == EngineConfig()


def _to_argv(cfg: EngineConfig) -> list[str]:
    argv: list[str] = []
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if v is None:
            continue
        if isinstance(v, bool):  # --flag / --no-flag
            argv.append(("--" if v else "--no-") + f.name.replace("_", "-"))
            continue
        argv.append("--" + f.name.replace("_", "-"))
        argv.extend(str(x) for x in v) if isinstance(v, tuple) else argv.append(str(v))
    return argv


def test_cli_round_trip_of_non_default_config() -> None:
    cfg = EngineConfig(
        model="/models/x",
        tokenizer="/tok",
        load_format="dummy",
        dtype="bfloat16",
        device="cpu",
        quantization="fp8",
        kv_cache_dtype="fp8_e4m3",
        seed=7,
        page_size=64,
        gpu_memory_utilization=0.5,
        num_pages=1000,
        cpu_kv_cache_gb=0.25,
        max_model_len=4096,
        max_num_seqs=12,
        max_num_batched_tokens=512,
        admission_interval=4,
        max_waiting_requests=9,
        enable_prefix_caching=False,
        max_logprobs=5,
        attention_backend="triton",
        cuda_graph_max_bs=32,
        cuda_graph_batch_sizes=(1, 2, 4, 32),
        cuda_graph_max_tokens=256,
        cuda_graph_structured=False,
        grammar_threads=3,
        json_whitespace="flexible",
        fuse_norms="on",
        pdl=False,
        overlap="two_events",
        text_thread=False,
        gc_freeze=False,
    )
    # Every field differs from its default, so a flag that is dropped or mistyped shows.
    for f in dataclasses.fields(cfg):
        assert getattr(cfg, f.name) != f.default, f.name
    args = _parser().parse_args(_to_argv(cfg))
    assert EngineConfig.from_cli_args(args) == cfg


def test_cli_rejects_bad_literal_and_bad_number() -> None:
    p = _parser()
    with pytest.raises(SystemExit):
        p.parse_args(["--overlap", "both"])
    args = p.parse_args(["--page-size", "24"])
    with pytest.raises(ValueError, match="page_size"):
        EngineConfig.from_cli_args(args)


INT_FIELDS = [
    "seed",
    "page_size",
    "num_pages",
    "max_model_len",
    "max_num_seqs",
    "max_num_batched_tokens",
    "max_waiting_requests",
    "max_logprobs",
    "cuda_graph_max_bs",
    "grammar_threads",
]


@settings(max_examples=30, deadline=None)
@given(name=st.sampled_from(INT_FIELDS), value=st.integers(-(2**40), 2**40))
def test_random_ints_construct_or_raise_naming_field(name: str, value: int) -> None:
    try:
        cfg = EngineConfig(**{name: value})
    except ValueError as e:
        assert name in str(e)
    else:
        assert getattr(cfg, name) == value
