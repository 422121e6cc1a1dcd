"""``jax.eval_shape`` of every family's forward pass, with no weights allocated."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from model import api
from model.attention import AttentionMetadata, KVCache
from model.config import ModelConfig
from tests.model.tiny_hf import FAMILIES, hf_config


def _config(family: str) -> ModelConfig:
    cfg = hf_config(family).to_dict()
    cfg["architectures"] = [type(hf_config(family)).__name__.replace("TextConfig", "Config")
                            .replace("Config", "ForCausalLM")]
    return ModelConfig.from_hf(cfg)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_forward_eval_shape(family, dtype):
    config = _config(family)
    graphdef, state = api.abstract_model(config, dtype)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(state))
    num_tokens, num_seqs, pages_per_seq, page_size = 24, 4, 8, 4
    shape = (config.num_layers, 33, page_size, config.num_kv_heads, config.head_dim)
    cache = KVCache(jax.ShapeDtypeStruct(shape, jnp.dtype(dtype)),
                    jax.ShapeDtypeStruct(shape, jnp.dtype(dtype)))
    i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)  # noqa: E731
    md = AttentionMetadata(i32(num_seqs, pages_per_seq), i32(num_seqs), i32(num_seqs + 1),
                           i32(num_tokens), max_q_len=16)

    hidden, new_cache = jax.eval_shape(
        lambda s, ids, pos, c, m: api.forward(graphdef, s, ids, pos, c, m),
        state, i32(num_tokens), i32(num_tokens), cache, md)
    assert hidden.shape == (num_tokens, config.hidden_size)
    assert hidden.dtype == jnp.dtype(dtype)
    assert new_cache.k.shape == shape and new_cache.k.dtype == jnp.dtype(dtype)
    logits = jax.eval_shape(lambda s, h: api.compute_logits(graphdef, s, h), state, hidden)
    assert logits.shape == (num_tokens, config.vocab_size) and logits.dtype == jnp.float32


@pytest.mark.parametrize("hf", [
    dict(architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=4096,
         intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
         num_key_value_heads=8, rope_theta=500000.0,
         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    dict(architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", vocab_size=262144,
         hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
         num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=512,
         query_pre_attn_scalar=256, rope_local_base_freq=10000.0, rope_theta=1000000.0),
], ids=["llama3-8b", "gemma3-1b"])
def test_full_size_configs_build_abstractly(hf):
    config = ModelConfig.from_hf(hf)
    _, state = api.abstract_model(config, "bfloat16")
    num_params = sum(x.size for x in jax.tree.leaves(state))
    assert num_params > 5e8  # billions of parameters described, none allocated
