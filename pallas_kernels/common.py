"""Shape validation and ragged-batch helpers shared by the Pallas kernels."""

from __future__ import annotations

import jax
import jax.numpy as jnp

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def validate_attention_inputs(q, k_cache, v_cache, block_tables, seq_lens,
                              query_start_loc, *, max_q_len, sliding_window,
                              soft_cap) -> None:
    """Raises ``ValueError`` naming the shapes when the inputs disagree.

    Args:
      q: [num_tokens, num_q_heads, head_dim].
      k_cache, v_cache: [num_layers, num_pages, page_size, num_kv_heads, head_dim].
      block_tables: [num_seqs, pages_per_seq] int32.
      seq_lens: [num_seqs] int32.
      query_start_loc: [num_seqs + 1] int32.
      max_q_len: static bound on any query length (>= 1).
      sliding_window: None or a positive int.
      soft_cap: None or a non-zero float.
    """
    if q.ndim != 3:
        raise ValueError(f"q must be [num_tokens, num_q_heads, head_dim], got {q.shape}")
    if k_cache.ndim != 5 or k_cache.shape != v_cache.shape:
        raise ValueError(
            "k_cache/v_cache must both be [num_layers, num_pages, page_size, "
            f"num_kv_heads, head_dim]; got {k_cache.shape} and {v_cache.shape}")
    _, num_q_heads, head_dim = q.shape
    _, _, _, num_kv_heads, head_dim_kv = k_cache.shape
    if head_dim != head_dim_kv:
        raise ValueError(f"head_dim of q {q.shape} != head_dim of k_cache {k_cache.shape}")
    if num_q_heads % num_kv_heads:
        raise ValueError(
            f"num_q_heads of q {q.shape} must be a multiple of num_kv_heads of "
            f"k_cache {k_cache.shape}")
    if block_tables.ndim != 2:
        raise ValueError(f"block_tables must be [num_seqs, pages_per_seq], got {block_tables.shape}")
    num_seqs = block_tables.shape[0]
    if seq_lens.shape != (num_seqs,):
        raise ValueError(f"seq_lens {seq_lens.shape} must be ({num_seqs},) to match "
                         f"block_tables {block_tables.shape}")
    if query_start_loc.shape != (num_seqs + 1,):
        raise ValueError(f"query_start_loc {query_start_loc.shape} must be ({num_seqs + 1},) "
                         f"to match block_tables {block_tables.shape}")
    for name, arr in (("block_tables", block_tables), ("seq_lens", seq_lens),
                      ("query_start_loc", query_start_loc)):
        if not jnp.issubdtype(arr.dtype, jnp.integer):
            raise ValueError(f"{name} must be integer, got {arr.dtype} with shape {arr.shape}")
    if max_q_len < 1:
        raise ValueError(f"max_q_len must be >= 1, got {max_q_len}")
    if sliding_window is not None and sliding_window <= 0:
        raise ValueError(f"sliding_window must be positive, got {sliding_window}")
    if soft_cap is not None and soft_cap == 0:
        raise ValueError("soft_cap must be non-zero")


def validate_write_inputs(k_cache, v_cache, k_new, v_new, slot_mapping) -> None:
    """Raises ``ValueError`` naming the shapes when the KV-write inputs disagree.

    Args:
      k_cache, v_cache: [num_layers, num_pages, page_size, num_kv_heads, head_dim].
      k_new, v_new: [num_tokens, num_kv_heads, head_dim].
      slot_mapping: [num_tokens] int32.
    """
    if k_cache.ndim != 5 or k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {k_cache.shape} and v_cache {v_cache.shape} must match and be 5-D")
    if k_new.ndim != 3 or k_new.shape != v_new.shape:
        raise ValueError(f"k_new {k_new.shape} and v_new {v_new.shape} must match and be 3-D")
    if k_new.shape[1:] != k_cache.shape[3:]:
        raise ValueError(f"k_new {k_new.shape} heads/head_dim must match k_cache {k_cache.shape}")
    if slot_mapping.shape != (k_new.shape[0],):
        raise ValueError(f"slot_mapping {slot_mapping.shape} must be ({k_new.shape[0]},) "
                         f"to match k_new {k_new.shape}")


def q_block_seq_ranges(query_start_loc: jax.Array, num_q_blocks: int,
                       queries_per_block: int) -> jax.Array:
    """First and last sequence whose queries overlap each block of query tokens.

    Args:
      query_start_loc: [num_seqs + 1] int32 cumulative query offsets.
      num_q_blocks: static number of blocks of ``queries_per_block`` tokens.
      queries_per_block: static tokens per block.

    Returns:
      [num_q_blocks, 2] int32 ``(first, last)``; ``last < first`` when the block
      holds only padding tokens.
    """
    qsl = query_start_loc.astype(jnp.int32)
    total = qsl[-1]
    starts = jnp.arange(num_q_blocks, dtype=jnp.int32) * queries_per_block  # [B]
    last_tok = jnp.minimum(starts + queries_per_block, total) - 1  # [B]
    first = jnp.searchsorted(qsl, starts, side="right").astype(jnp.int32) - 1
    last = jnp.searchsorted(qsl, last_tok, side="right").astype(jnp.int32) - 1
    num_seqs = qsl.shape[0] - 1
    first = jnp.clip(first, 0, num_seqs - 1)
    last = jnp.where(last_tok < starts, first - 1, jnp.minimum(last, num_seqs - 1))
    return jnp.stack([first, last], axis=1)
