"""KV-cache write for TPU (Pallas / Mosaic): one DMA per token and cache.

The caches stay in HBM (``memory_space=ANY``) and are aliased to the outputs
(``input_output_aliases``), so under a jit that donates them the write is in
place and moves only the new tokens' bytes: each token's ``[Hkv, D]`` slice
goes HBM -> HBM straight into ``cache[layer, slot // page_size,
slot % page_size]``. All DMAs are started before any is waited on, so they
overlap. Padding tokens write into the scratch page 0 (several may hit the same
slot; the scratch contents are never read).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common import validate_write_inputs


def _write_kernel(layer_ref, slots_ref,  # SMEM: [1], [num_tokens]
                  k_new_hbm, v_new_hbm,  # [T, Hkv, D]
                  k_in, v_in,  # aliased to the outputs; unused
                  k_out, v_out,  # [L, P, page_size, Hkv, D]
                  sems,  # DMA semaphores [2]
                  *, page_size: int):
    del k_in, v_in
    num_tokens = k_new_hbm.shape[0]
    layer = layer_ref[0]

    def copies(t):
        slot = slots_ref[t]
        page, off = lax.div(slot, page_size), lax.rem(slot, page_size)
        return (pltpu.make_async_copy(k_new_hbm.at[t], k_out.at[layer, page, off], sems.at[0]),
                pltpu.make_async_copy(v_new_hbm.at[t], v_out.at[layer, page, off], sems.at[1]))

    def start(t, c):
        for cp in copies(t):
            cp.start()
        return c

    def wait(t, c):
        for cp in copies(t):
            cp.wait()
        return c

    lax.fori_loop(0, num_tokens, start, 0)
    lax.fori_loop(0, num_tokens, wait, 0)


@functools.partial(jax.jit, static_argnames=("interpret",))
def write_kv_tpu(k_cache: jax.Array, v_cache: jax.Array, layer: int | jax.Array,
                 k_new: jax.Array, v_new: jax.Array, slot_mapping: jax.Array,
                 *, interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """Scatters new K/V into the stacked paged cache with DMAs.

    Args:
      k_cache, v_cache: [num_layers, num_pages, page_size, num_kv_heads, head_dim].
      layer: int or int32 scalar; layer to write.
      k_new, v_new: [num_tokens, num_kv_heads, head_dim].
      slot_mapping: [num_tokens] int32 flat slots ``page * page_size + offset``.
      interpret: run in Pallas TPU interpret mode (CPU).

    Returns:
      The updated ``(k_cache, v_cache)``; in place when the caller donates them.

    Raises:
      ValueError: if the shapes disagree (the message names them).
    """
    validate_write_inputs(k_cache, v_cache, k_new, v_new, slot_mapping)
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    return pl.pallas_call(
        functools.partial(_write_kernel, page_size=k_cache.shape[2]),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(1,),
            in_specs=[any_spec] * 4,
            out_specs=[any_spec] * 2,
            scratch_shapes=[pltpu.SemaphoreType.DMA((2,))],
        ),
        out_shape=[jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
                   jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype)],
        # Operand indices count the two scalar-prefetch operands.
        input_output_aliases={4: 0, 5: 1},
        interpret=interpret,
        name="jax_serve_write_kv",
    )(jnp.asarray(layer, jnp.int32).reshape(1), slot_mapping.astype(jnp.int32),
      k_new.astype(k_cache.dtype), v_new.astype(v_cache.dtype), k_cache, v_cache)
