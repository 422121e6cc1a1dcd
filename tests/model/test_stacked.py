"""The stacked form (``model/stacked.py``): layers as one loop over stacked weights.

Its forward equals the unrolled ``DecoderLM.__call__`` (hidden states and the
written KV cache) for a uniform model, Gemma 3's local/global pattern (a
period with and without leftover layers) and an int8-quantized model;
``unstack`` gives the module form back; tracing a step costs one period of
layers, not all of them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model import api, stacked
from model.attention import KVCache
from model.config import ModelConfig
from model.decoder import DecoderLM
from tests.sharding.tp_forward import NUM_PAGES as PAGES, PAGE_SIZE as PAGE, batch as tp_batch



def _config(kind: str, layers: int) -> ModelConfig:
    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=32, rms_norm_eps=1e-6, max_position_embeddings=128)
    if kind == "gemma3":
        return ModelConfig.from_hf(dict(
            common, architectures=["Gemma3ForCausalLM"], model_type="gemma3_text",
            rope_theta=1e6, rope_local_base_freq=1e4, sliding_window=4,
            query_pre_attn_scalar=32, sliding_window_pattern=3))
    return ModelConfig.from_hf(dict(common, architectures=["Qwen3ForCausalLM"],
                                    model_type="qwen3", rope_theta=1e4,
                                    tie_word_embeddings=False))


def _batch():
    """Query lengths 6, 3, 1 over contexts 6, 5, 5 (cached prefixes in the cache)."""
    return tp_batch("xla")


def _cache(config):
    shape = (config.num_layers, PAGES, PAGE, config.num_kv_heads, config.head_dim)
    k, v = jax.random.normal(jax.random.key(1), (2, *shape), jnp.float32) * 0.5
    return KVCache(k, v)


_forward = jax.jit(api.forward, static_argnums=0)


@pytest.mark.parametrize("kind,layers,period,groups,tail", [
    ("qwen3", 5, 1, 5, 0),      # uniform: one layer per trip
    ("gemma3", 6, 3, 2, 0),     # local, local, global x 2
    ("gemma3", 7, 3, 2, 1),     # ... plus one leftover layer, unrolled
])
def test_stacked_forward_equals_unrolled(kind, layers, period, groups, tail):
    config = _config(kind, layers)
    graphdef, state = nnx.split(DecoderLM(config, rngs=nnx.Rngs(0)))
    ids, pos, md = _batch()
    want_h, want_kv = _forward(graphdef, state, ids, pos, _cache(config), md)
    scan, params = stacked.stack(graphdef, state)
    assert (scan.period, scan.num_groups, len(scan.tail)) == (period, groups, tail)
    assert scan.num_layers == layers
    got_h, got_kv = _forward(scan, params, ids, pos, _cache(config), md)
    np.testing.assert_allclose(np.asarray(got_h), np.asarray(want_h), atol=2e-5)
    np.testing.assert_allclose(np.asarray(got_kv.k), np.asarray(want_kv.k), atol=2e-5)
    np.testing.assert_allclose(np.asarray(got_kv.v), np.asarray(want_kv.v), atol=2e-5)
    logits = jax.jit(api.compute_logits, static_argnums=0)
    np.testing.assert_allclose(np.asarray(logits(scan, params, got_h)),
                               np.asarray(logits(graphdef, state, want_h)), atol=1e-4)
    # and back to the module form, leaf for leaf
    graphdef2, state2 = stacked.unstack(scan, params)
    assert graphdef2 == graphdef
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(state2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("packed", [False, True])
def test_quantized_model_stacks(packed):
    """int8 modules stack too; the C++ kernel's packed weights (``InPlace``) stay
    whole stacks that the kernel reads at the loop index, not sliced copies."""
    from model.quant import quantize_model

    config = _config("qwen3", 4)
    graphdef, state = nnx.split(DecoderLM(config, rngs=nnx.Rngs(0)))
    graphdef, state = quantize_model(graphdef, state, "w8a8_int8", packed=packed)
    ids, pos, md = _batch()
    want_h, _ = _forward(graphdef, state, ids, pos, _cache(config), md)
    scan, params = stacked.stack(graphdef, state)
    assert scan.period == 1 and scan.num_groups == 4
    in_place = jax.tree.leaves(params["body"][0][0])
    assert bool(in_place) == packed and all(a.shape[0] == 4 for a in in_place)
    got_h, _ = _forward(scan, params, ids, pos, _cache(config), md)
    np.testing.assert_allclose(np.asarray(got_h), np.asarray(want_h), atol=2e-5)
    if packed:  # no slice of a stacked int8 weight is materialized for the kernel
        hlo = jax.jit(api.forward, static_argnums=0).lower(
            scan, params, ids, pos, _cache(config), md).as_text()
        assert "jax_serve_int8_matmul_cpu" in hlo
        int8_slices = [line for line in hlo.splitlines()
                       if "dynamic_slice" in line and "xi8>" in line.split("=")[-1]]
        assert not int8_slices, int8_slices[:2]


def test_tracing_costs_one_period_not_every_layer():
    """The jaxpr of a 12-layer stacked step is about as long as a 2-layer one."""
    ids, pos, md = _batch()

    def eqns(layers, stack):
        config = _config("qwen3", layers)
        graphdef, state = nnx.split(DecoderLM(config, rngs=nnx.Rngs(0)))
        if stack:
            graphdef, state = stacked.stack(graphdef, state)
        jaxpr = jax.make_jaxpr(lambda s, kv: api.forward(graphdef, s, ids, pos, kv, md))(
            state, _cache(config))
        return len(str(jaxpr))

    assert eqns(12, True) < 1.2 * eqns(2, True)
    assert eqns(12, False) > 4 * eqns(2, False)
