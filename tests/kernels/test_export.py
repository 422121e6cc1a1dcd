"""The kernels lower for TPU (Mosaic) and CUDA (Triton) from this CPU host.

Through the dispatch entry points, inside one jitted "layer step" (write the
new K/V, then attend), at SmolLM2 shapes (9 q heads, 3 kv heads, head_dim 64,
page 16) and a head_dim-128 config (32 q heads, 8 kv heads). Lowering runs
the Pallas Mosaic/Triton lowering (block-shape rules, unsupported ops); the
final Mosaic/Triton compile happens on the device and is not exercised here.
"""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import dispatch
from pallas_kernels.export_utils import TRITON_CUSTOM_CALL, export_for

CONFIGS = {  # name: (num_q_heads, num_kv_heads, head_dim, page_size)
    "smollm2": (9, 3, 64, 16),
    "hd128": (32, 8, 128, 16),
}
PLATFORMS = {"tpu": ("pallas_tpu", "tpu_custom_call"),
             "cuda": ("pallas_gpu", TRITON_CUSTOM_CALL)}


def _layer_step(backend, max_q_len):
    def step(q, k_new, v_new, k_cache, v_cache, layer, block_tables, seq_lens,
             query_start_loc, slot_mapping):
        k_cache, v_cache = dispatch.write_kv(k_cache, v_cache, layer, k_new, v_new,
                                             slot_mapping, backend=backend)
        out = dispatch.ragged_paged_attention(
            q, k_cache, v_cache, layer, block_tables, seq_lens, query_start_loc,
            max_q_len=max_q_len, sm_scale=q.shape[-1] ** -0.5, sliding_window=None,
            soft_cap=None, backend=backend)
        return out, k_cache, v_cache
    return jax.jit(step, donate_argnums=(3, 4))


@pytest.mark.parametrize("platform", sorted(PLATFORMS))
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_export_layer_step(platform, config):
    num_q_heads, num_kv_heads, head_dim, page_size = CONFIGS[config]
    num_tokens, num_seqs, pages_per_seq, num_pages, num_layers = 64, 8, 16, 256, 2
    s = jax.ShapeDtypeStruct
    cache = s((num_layers, num_pages, page_size, num_kv_heads, head_dim), jnp.bfloat16)
    args = (
        s((num_tokens, num_q_heads, head_dim), jnp.bfloat16),
        s((num_tokens, num_kv_heads, head_dim), jnp.bfloat16),
        s((num_tokens, num_kv_heads, head_dim), jnp.bfloat16),
        cache, cache,
        s((), jnp.int32),
        s((num_seqs, pages_per_seq), jnp.int32),
        s((num_seqs,), jnp.int32),
        s((num_seqs + 1,), jnp.int32),
        s((num_tokens,), jnp.int32),
    )
    backend, marker = PLATFORMS[platform]
    exported = export_for(_layer_step(backend, max_q_len=32), args, [platform])
    assert exported.platforms == (platform,)
    assert marker in exported.mlir_module()
    assert exported.out_avals[0].shape == (num_tokens, num_q_heads, head_dim)
    if importlib.util.find_spec("flatbuffers") is not None:
        assert exported.serialize()


def test_export_xla_backend_for_cpu():
    q = jax.ShapeDtypeStruct((4, 9, 64), jnp.float32)
    cache = jax.ShapeDtypeStruct((1, 8, 16, 3, 64), jnp.float32)
    bt, sl, qsl = (jax.ShapeDtypeStruct(sh, jnp.int32) for sh in ((2, 4), (2,), (3,)))
    exported = export_for(lambda q, k, v, bt, sl, qsl: dispatch.ragged_paged_attention(
        q, k, v, 0, bt, sl, qsl, max_q_len=4, sm_scale=0.125, backend="xla"),
        (q, cache, cache, bt, sl, qsl), ["cpu"])
    assert "custom_call" not in exported.mlir_module()
