"""Pure-jnp reference for ragged paged attention and the KV-cache write.

This is both the oracle the Pallas kernels are tested against and the XLA path
used on CPU. Layout conventions shared by every implementation:

* KV cache, stacked over layers: ``k_cache, v_cache: [num_layers, num_pages,
  page_size, num_kv_heads, head_dim]``. Page 0 is reserved by the engine as a
  scratch page: padding tokens write there and no sequence reads it.
* Ragged queries: ``q: [num_tokens, num_q_heads, head_dim]``; the tokens of
  sequence ``s`` are ``q[query_start_loc[s]:query_start_loc[s + 1]]`` and are the
  *last* ``q_len[s]`` tokens of a context of ``seq_lens[s]`` tokens (so the query
  at offset ``i`` sits at position ``seq_lens[s] - q_len[s] + i``). Padding
  sequences have ``q_len == 0`` and ``seq_lens == 0``; tokens past
  ``query_start_loc[-1]`` are padding and their outputs are unspecified.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

# A bfloat16 KV cache may be *stored* as uint16 bit patterns: XLA on CPU does
# not scatter into a donated bf16 buffer in place (it rewrites the whole cache,
# ~10 ms per layer for SmolLM2), while a uint16 scatter is in place. The
# engine picks this storage on the XLA/CPU path only; values are bit-identical.
BF16_STORAGE = jnp.uint16


def from_storage(x: jax.Array) -> jax.Array:
    """Cache values as numbers (uint16 storage is reinterpreted as bfloat16)."""
    if x.dtype == BF16_STORAGE:
        return jax.lax.bitcast_convert_type(x, jnp.bfloat16)
    return x


def to_storage(x: jax.Array, cache_dtype) -> jax.Array:
    """New keys/values in the cache's storage dtype."""
    if cache_dtype == BF16_STORAGE:
        return jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), BF16_STORAGE)
    return x.astype(cache_dtype)


def ragged_paged_attention_ref(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    layer: int | jax.Array,
    block_tables: jax.Array,
    seq_lens: jax.Array,
    query_start_loc: jax.Array,
    *,
    max_q_len: int,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
) -> jax.Array:
    """Causal attention of ragged queries over a paged KV cache.

    Args:
      q: [num_tokens, num_q_heads, head_dim] queries (already RoPE'd).
      k_cache: [num_layers, num_pages, page_size, num_kv_heads, head_dim].
      v_cache: same shape as ``k_cache``.
      layer: which layer of the stacked cache to read.
      block_tables: [num_seqs, pages_per_seq] int32 page ids per sequence.
      seq_lens: [num_seqs] int32 context length (cached + new tokens).
      query_start_loc: [num_seqs + 1] int32 cumulative query offsets.
      max_q_len: static upper bound on any sequence's query length.
      sm_scale: softmax scale applied to q·k.
      sliding_window: if set, a query at position p sees keys in (p - window, p].
      soft_cap: if set, scores become ``soft_cap * tanh(scores / soft_cap)``.

    Returns:
      [num_tokens, num_q_heads, head_dim] attention output in q's dtype.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    _, _, page_size, num_kv_heads, _ = k_cache.shape
    num_seqs, pages_per_seq = block_tables.shape
    group = num_q_heads // num_kv_heads
    ctx = pages_per_seq * page_size

    q_lens = query_start_loc[1:] - query_start_loc[:-1]  # [S]
    offs = jnp.arange(max_q_len, dtype=jnp.int32)  # [Qm]
    tok_idx = query_start_loc[:-1, None] + offs[None, :]  # [S, Qm]
    valid_q = offs[None, :] < q_lens[:, None]  # [S, Qm]
    qs = q[jnp.clip(tok_idx, 0, num_tokens - 1)]  # [S, Qm, Hq, D]
    qs = qs.reshape(num_seqs, max_q_len, num_kv_heads, group, head_dim)
    q_pos = seq_lens[:, None] - q_lens[:, None] + offs[None, :]  # [S, Qm]

    k = from_storage(k_cache[layer][block_tables]).reshape(num_seqs, ctx, num_kv_heads, head_dim)
    v = from_storage(v_cache[layer][block_tables]).reshape(num_seqs, ctx, num_kv_heads, head_dim)

    scores = jnp.einsum(
        "sqhgd,skhd->shgqk", qs.astype(jnp.float32), k.astype(jnp.float32)
    ) * sm_scale  # [S, Hkv, G, Qm, ctx]
    if soft_cap is not None:
        scores = soft_cap * jnp.tanh(scores / soft_cap)
    kv_pos = jnp.arange(ctx, dtype=jnp.int32)
    mask = (kv_pos[None, None, :] <= q_pos[:, :, None]) & (
        kv_pos[None, None, :] < seq_lens[:, None, None]
    )  # [S, Qm, ctx]
    if sliding_window is not None:
        mask &= q_pos[:, :, None] - kv_pos[None, None, :] < sliding_window
    scores = jnp.where(mask[:, None, None], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("shgqk,skhd->sqhgd", probs, v.astype(jnp.float32))
    out = out.reshape(num_seqs, max_q_len, num_q_heads, head_dim).astype(q.dtype)

    dest = jnp.where(valid_q, tok_idx, num_tokens)  # out-of-range -> dropped
    result = jnp.zeros_like(q)
    return result.at[dest.reshape(-1)].set(
        out.reshape(-1, num_q_heads, head_dim), mode="drop"
    )


def write_kv_ref(
    k_cache: jax.Array,
    v_cache: jax.Array,
    layer: int | jax.Array,
    k_new: jax.Array,
    v_new: jax.Array,
    slot_mapping: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Scatters new keys/values into their cache slots.

    Args:
      k_cache, v_cache: [num_layers, num_pages, page_size, num_kv_heads, head_dim].
      layer: layer index to write.
      k_new, v_new: [num_tokens, num_kv_heads, head_dim].
      slot_mapping: [num_tokens] int32 flat slot ``page * page_size + offset``;
        padding tokens point into the scratch page 0.

    Returns:
      The updated ``(k_cache, v_cache)`` (in place when the caller donates them).
    """
    page_size = k_cache.shape[2]
    page = slot_mapping // page_size
    off = slot_mapping % page_size
    k_cache = k_cache.at[layer, page, off].set(to_storage(k_new, k_cache.dtype))
    v_cache = v_cache.at[layer, page, off].set(to_storage(v_new, v_cache.dtype))
    return k_cache, v_cache
