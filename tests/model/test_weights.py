"""Load-time fusion (``model/fusion.py``) and partial weight updates into fused leaves."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from model.loader import load_model
from model.weights import (apply_update, checkpoint_from_state, hf_names, paths_from_hf_update,
                           pure_from_hf, state_from_hf)
from tests.model.tiny_hf import save_hf_model


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    """A tiny Qwen2 (q|k|v biases) as ``(LoadedModel, its HF tensors)``."""
    path = tmp_path_factory.mktemp("qwen2")
    save_hf_model("qwen2", path)
    return load_model(str(path), with_tokenizer=False), load_file(str(path / "model.safetensors"))


def _flat(state) -> dict:
    return {tuple(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


def test_fused_leaves_hold_each_part(qwen2):
    lm, tensors = qwen2
    c = lm.config
    g = c.num_heads // c.num_kv_heads
    flat = _flat(lm.state)
    qkv = flat[("layers", 0, "self_attn", "qkv_proj", "kernel")]
    assert qkv.shape == (c.hidden_size, c.num_kv_heads, g + 2, c.head_dim)
    q = tensors["model.layers.0.self_attn.q_proj.weight"].T  # [hidden, Hq * D]
    np.testing.assert_array_equal(qkv[:, :, :g].reshape(c.hidden_size, -1), q)
    v = tensors["model.layers.0.self_attn.v_proj.bias"]
    bias = flat[("layers", 0, "self_attn", "qkv_proj", "bias")]
    np.testing.assert_array_equal(bias[:, g + 1].reshape(-1), v)
    up = tensors["model.layers.1.mlp.up_proj.weight"].T
    np.testing.assert_array_equal(flat[("layers", 1, "mlp", "gate_up_proj", "kernel")][:, 1], up)
    assert not any("q_proj" in p or "gate_proj" in p for p in flat)


def test_checkpoint_layout_round_trips(qwen2):
    lm, tensors = qwen2
    pure = checkpoint_from_state(lm.config, lm.state)
    expected = pure_from_hf(lm.config, tensors)
    got = {k: v for k, v in jax.tree_util.tree_leaves_with_path(pure)}
    want = {k: v for k, v in jax.tree_util.tree_leaves_with_path(expected)}
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    assert set(hf_names(lm.config)) == set(tensors)


def test_update_of_one_part_changes_only_its_slice(qwen2):
    """Updating q alone (then up alone) equals loading the edited checkpoint."""
    lm, tensors = qwen2
    rng = np.random.default_rng(0)
    edits = {name: rng.standard_normal(tensors[name].shape).astype(np.float32)
             for name in ("model.layers.0.self_attn.q_proj.weight",
                          "model.layers.1.self_attn.k_proj.bias",
                          "model.layers.1.mlp.up_proj.weight", "model.norm.weight")}
    state = lm.state
    for name, value in edits.items():  # one tensor per call, as staged updates come
        state = apply_update(lm.config, state, paths_from_hf_update(lm.config, {name: value}))
    reference = state_from_hf(lm.config, {**tensors, **edits})
    got, want, before = _flat(state), _flat(reference), _flat(lm.state)
    for path in want:
        np.testing.assert_array_equal(got[path], want[path], err_msg=str(path))
    changed = {p for p in want if not np.array_equal(before[p], want[p])}
    assert changed == {("layers", 0, "self_attn", "qkv_proj", "kernel"),
                       ("layers", 1, "self_attn", "qkv_proj", "bias"),
                       ("layers", 1, "mlp", "gate_up_proj", "kernel"), ("norm", "weight")}
