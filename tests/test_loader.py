"""Start-up checks: a broken checkpoint fails at load naming the file and the tensor."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from graphrt import Engine
from graphrt.models.loader import WeightLoadError


@pytest.fixture()
def model_copy(tiny_model_factory, tmp_path):
    src = tiny_model_factory("LlamaForCausalLM")
    dst = tmp_path / "m"
    shutil.copytree(src, dst)
    return dst


def _load(d):
    return Engine(str(d), show_progress=False)


def test_truncated_file_names_the_file(model_copy) -> None:
    f = model_copy / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightLoadError, match=r"model\.safetensors"):
        _load(model_copy)


def test_corrupt_header_names_the_file(model_copy) -> None:
    f = model_copy / "model.safetensors"
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header!!}" + b"\x00" * 64)
    with pytest.raises(WeightLoadError, match=r"model\.safetensors.*header"):
        _load(model_copy)


def _rewrite(d, fn) -> None:
    f = d / "model.safetensors"
    tensors = load_file(str(f))
    fn(tensors)
    save_file(tensors, str(f))


def test_missing_tensor_is_named(model_copy) -> None:
    _rewrite(model_copy, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(WeightLoadError, match=r"missing.*model\.layers\.1\.mlp\.down_proj"):
        _load(model_copy)


def test_shape_mismatch_names_tensor_and_shapes(model_copy) -> None:
    def shrink(t):
        t["model.layers.0.self_attn.q_proj.weight"] = t["model.layers.0.self_attn.q_proj.weight"][
            :8
        ]

    _rewrite(model_copy, shrink)
    with pytest.raises(WeightLoadError, match=r"q_proj\.weight.*\(8, 64\).*\(64, 64\)"):
        _load(model_copy)


def test_config_disagreeing_with_weights(model_copy) -> None:
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["num_hidden_layers"] = 1
    (model_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightLoadError, match=r"unexpected tensor 'model\.layers\.1\."):
        _load(model_copy)


def test_unsupported_dtype_is_named(model_copy) -> None:
    def to_int(t):
        t["model.norm.weight"] = t["model.norm.weight"].to(torch.int32)

    _rewrite(model_copy, to_int)
    with pytest.raises(WeightLoadError, match=r"model\.norm\.weight.*int32"):
        _load(model_copy)


def test_pickle_checkpoints_are_refused(model_copy) -> None:
    (model_copy / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, model_copy / "pytorch_model.bin")
    with pytest.raises(WeightLoadError, match="never loads"):
        _load(model_copy)


def test_sharded_checkpoint_with_index(model_copy) -> None:
    ref = _load(model_copy).generate([[1, 2, 3]])[0].outputs[0].token_ids
    tensors = load_file(str(model_copy / "model.safetensors"))
    (model_copy / "model.safetensors").unlink()
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"a.safetensors": names[:half], "b.safetensors": names[half:]}
    for fname, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(model_copy / fname))
    index = {"weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (model_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    assert _load(model_copy).generate([[1, 2, 3]])[0].outputs[0].token_ids == ref


def test_missing_shard_is_named(model_copy) -> None:
    index = {"weight_map": {"model.norm.weight": "gone.safetensors"}}
    (model_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightLoadError, match=r"gone\.safetensors"):
        _load(model_copy)


def test_bad_config_json(tmp_path) -> None:
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(ValueError, match=r"config\.json: invalid JSON"):
        _load(tmp_path)


def test_missing_model_dir() -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Engine("/nonexistent/model/dir", show_progress=False)


def test_dummy_weights_need_only_config(tmp_path, tiny_model_factory) -> None:
    shutil.copy(tiny_model_factory("Qwen3ForCausalLM") / "config.json", tmp_path / "config.json")
    eng = Engine(str(tmp_path), load_format="dummy", show_progress=False)
    out = eng.generate([[1, 2, 3]])[0].outputs[0]
    assert len(out.token_ids) == 16
    eng.shutdown()
