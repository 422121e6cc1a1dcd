"""Ragged paged attention on the CPU through a C++ XLA FFI kernel.

The kernel (``csrc/paged_attention_cpu.cc``, built by ``ffi.py``) reads KV
pages in place; the pure-jnp reference gathers them first, which XLA on the
CPU runs as an element loop followed by tiny batched matmuls (see the
kernel's header for numbers).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.cpu import ffi
from pallas_kernels.common import validate_attention_inputs

TARGET = ffi.TARGETS["PagedAttentionCpu"]
available = ffi.available
_CACHE_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.uint16))


def supports(q, k_cache) -> bool:
    """Whether the kernel takes these dtypes (q any float; cache f32 or bf16 bits)."""
    return jnp.dtype(k_cache.dtype) in _CACHE_DTYPES and jnp.issubdtype(q.dtype, jnp.floating)


def ragged_paged_attention_cpu(q, k_cache, v_cache, layer, block_tables, seq_lens,
                               query_start_loc, *, max_q_len, sm_scale,
                               sliding_window=None, soft_cap=None):
    """Causal ragged paged attention; same contract as the reference.

    Args:
      q: [num_tokens, num_q_heads, head_dim] (computed in float32).
      k_cache, v_cache: [num_layers, num_pages, page_size, num_kv_heads, head_dim]
        float32, bfloat16 or uint16 (bfloat16 bits).
      layer: int or int32 scalar; the layer to read.
      block_tables: [num_seqs, pages_per_seq] int32.
      seq_lens: [num_seqs] int32.
      query_start_loc: [num_seqs + 1] int32.
      max_q_len: static bound on query lengths (validated; the kernel reads
        the real lengths from ``query_start_loc``).
      sm_scale, sliding_window, soft_cap: as in the reference.

    Returns:
      [num_tokens, num_q_heads, head_dim] in q's dtype; padding rows are zero.
    """
    validate_attention_inputs(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                              max_q_len=max_q_len, sliding_window=sliding_window,
                              soft_cap=soft_cap)
    if not available():
        raise RuntimeError("the CPU attention kernel could not be built; see the log")
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32))
    out = call(q.astype(jnp.float32), k_cache, v_cache, jnp.asarray(layer, jnp.int32),
               block_tables.astype(jnp.int32), seq_lens.astype(jnp.int32),
               query_start_loc.astype(jnp.int32),
               sm_scale=np.float32(sm_scale), sliding_window=np.int64(sliding_window or 0),
               soft_cap=np.float32(soft_cap or 0.0))
    return out.astype(q.dtype)
