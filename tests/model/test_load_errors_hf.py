"""Error paths of the Hugging Face loader and the format detection."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from model.config import SUPPORTED_ARCHITECTURES, ModelConfig, UnsupportedArchitectureError
from model.loader import detect_format, load_model
from model.weights import MissingWeightError, WeightShapeError
from tests.model.tiny_hf import hf_config, save_hf_model


def _write_config(path, **overrides):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(overrides)
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    save_hf_model("llama", path)
    return path


def test_missing_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_model(str(missing), with_tokenizer=False)


def test_folder_without_weights(tmp_path):
    hf_config("llama").save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors weights found in"):
        load_model(str(tmp_path), with_tokenizer=False)


def test_unsupported_architecture(tmp_path):
    save_file({"x": np.zeros(2, np.float32)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(
        {"architectures": ["FalconForCausalLM"], "model_type": "falcon"}))
    with pytest.raises(UnsupportedArchitectureError) as info:
        load_model(str(tmp_path), with_tokenizer=False)
    message = str(info.value)
    assert "FalconForCausalLM" in message
    assert all(arch in message for arch in SUPPORTED_ARCHITECTURES)
    assert isinstance(info.value, ValueError)


def test_unsupported_model_type_without_architectures():
    with pytest.raises(UnsupportedArchitectureError, match="phi3"):
        ModelConfig.from_hf({"model_type": "phi3"})


def test_tensor_shape_does_not_match_config(llama_dir, tmp_path):
    for f in llama_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    _write_config(tmp_path, intermediate_size=80)
    with pytest.raises(WeightShapeError) as info:
        load_model(str(tmp_path), with_tokenizer=False)
    message = str(info.value)
    name = info.value.name
    assert name.startswith("model.layers.0.mlp.") and name in message
    assert sorted(info.value.expected) == [64, 80] and sorted(info.value.actual) == [64, 96]
    assert str(info.value.expected) in message and str(info.value.actual) in message


def test_missing_tensor(llama_dir, tmp_path):
    tensors = load_file(str(llama_dir / "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((llama_dir / "config.json").read_text())
    with pytest.raises(MissingWeightError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight"):
        load_model(str(tmp_path), with_tokenizer=False)


def test_sharded_checkpoint_and_missing_shard(tmp_path):
    model = save_hf_model("qwen2", tmp_path / "ok", seed=1)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="60KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    loaded = load_model(str(tmp_path / "sharded"), with_tokenizer=False)
    reference = load_model(str(tmp_path / "ok"), with_tokenizer=False)
    for a, b in zip(*(map(np.asarray, __import__("jax").tree.leaves(m.state))
                      for m in (loaded, reference))):
        np.testing.assert_array_equal(a, b)
    (tmp_path / "sharded" / shards[-1]).unlink()
    with pytest.raises(FileNotFoundError, match=shards[-1]):
        load_model(str(tmp_path / "sharded"), with_tokenizer=False)


def test_detect_format(tmp_path, llama_dir):
    assert detect_format(llama_dir) == "hf"
    gguf = tmp_path / "one" / "m.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    assert detect_format(gguf) == "gguf"
    assert detect_format(gguf.parent) == "gguf"
    orbax = tmp_path / "conv"
    (orbax / "orbax").mkdir(parents=True)
    (orbax / "config.json").write_text("{}")
    assert detect_format(orbax) == "orbax"
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        detect_format(tmp_path / "empty")


@pytest.mark.parametrize("override, match", [
    (dict(num_key_value_heads=3), "multiple of"),
    (dict(hidden_act="relu6"), "hidden_act"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}), "yarn"),
])
def test_invalid_config_values(override, match):
    cfg = hf_config("llama").to_dict()
    cfg["architectures"] = ["LlamaForCausalLM"]
    cfg.update(override)
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf(cfg)


def test_orbax_folder_loads_same_weights(llama_dir, tmp_path):
    import jax

    from model.orbax_io import write_orbax
    from model.weights import checkpoint_from_state

    reference = load_model(str(llama_dir), with_tokenizer=False)
    write_orbax(tmp_path / "conv", reference.hf_config,
                checkpoint_from_state(reference.config, reference.state))
    loaded = load_model(str(tmp_path / "conv"), with_tokenizer=False)
    assert loaded.format == "orbax" and loaded.config == reference.config
    for a, b in zip(jax.tree.leaves(loaded.state), jax.tree.leaves(reference.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
