"""Ragged paged attention for GPU (Pallas with Triton lowering).

Layout and schedule:

* The wrapper regroups queries per KV head and pads the group to a power of
  two (Triton tiles are powers of two): ``q [T, Hq, D] -> [Hkv, Tp * Gp, D]``
  with ``Gp = next_pow2(Hq // Hkv)``; row ``t * Gp + g`` is token ``t``, head
  ``g`` of the group. GQA/MQA thus become one ``[queries_per_block * Gp, D]``
  tile per program, and K/V pages are loaded once per KV head.
* Grid ``(num_seqs, Hkv, cdiv(max_q_len, queries_per_block))``: one program
  per (sequence, KV head, query block). Its query rows start at
  ``query_start_loc[seq]``, so loads and stores are masked by the sequence's
  query length (ragged batch, no padding of sequences to ``max_q_len``).
* The cache is viewed (free reshape) as ``[L * P, page_size, Hkv, D]``; each
  step gathers ``pages_per_block`` pages by page id (``k_ref[page_ids, :,
  head]``), and runs an online softmax. The loop covers only the blocks the
  causal mask (and the sliding window) leave visible to this query block.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import tiling
from pallas_kernels.common import MASK_VALUE, validate_attention_inputs


def _rpa_kernel(
    layer_ref,  # [1] int32
    block_tables_ref,  # [num_seqs, pages_per_seq] int32
    seq_lens_ref,  # [num_seqs] int32
    qsl_ref,  # [num_seqs + 1] int32
    q_ref,  # [Hkv, Tp * Gp, D]
    k_ref,  # [L * P, page_size, Hkv, D]
    v_ref,  # [L * P, page_size, Hkv, D]
    o_ref,  # [Hkv, Tp * Gp, D]
    *,
    group: int,
    group_padded: int,
    queries_per_block: int,
    pages_per_block: int,
    num_pages_per_layer: int,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
):
    seq = pl.program_id(0)
    head = pl.program_id(1)
    q_blk = pl.program_id(2)
    _, page_size, _, head_dim = k_ref.shape
    rows = queries_per_block * group_padded
    blk_tokens = pages_per_block * page_size

    q_start = qsl_ref[seq]
    q_len = qsl_ref[seq + 1] - q_start
    kv_len = seq_lens_ref[seq]
    page_base = layer_ref[0] * num_pages_per_layer

    r = jnp.arange(rows, dtype=jnp.int32)
    tok_in_seq = q_blk * queries_per_block + r // group_padded  # [rows]
    row_valid = (tok_in_seq < q_len) & (r % group_padded < group)  # [rows]
    q_pos = kv_len - q_len + tok_in_seq  # [rows]
    row0 = (q_start + q_blk * queries_per_block) * group_padded

    first_tok = q_blk * queries_per_block
    last_tok = jnp.minimum(q_len, first_tok + queries_per_block) - 1
    kv_hi = jnp.where(last_tok >= first_tok,
                      pl.cdiv(kv_len - q_len + last_tok + 1, blk_tokens), 0)
    if sliding_window is None:
        kv_lo = jnp.int32(0)
    else:
        kv_lo = jnp.maximum(kv_len - q_len + first_tok - sliding_window + 1, 0) // blk_tokens
        kv_lo = jnp.minimum(kv_lo, kv_hi)

    @pl.when(kv_hi > kv_lo)
    def _():
        q = plgpu.load(q_ref.at[head, pl.ds(row0, rows), :],
                       mask=row_valid[:, None], other=0.0)  # [rows, D]
        kv_iota = jnp.arange(blk_tokens, dtype=jnp.int32)  # [K]

        def body(kv_blk, carry):
            m, l, acc = carry
            page_idx = kv_blk * pages_per_block + jnp.arange(pages_per_block, dtype=jnp.int32)
            pages = block_tables_ref[seq, pl.ds(kv_blk * pages_per_block, pages_per_block)]  # [bk]
            pages = jnp.where(page_idx * page_size < kv_len, pages, 0) + page_base
            k = k_ref[pages, :, head, :].reshape(blk_tokens, head_dim)  # [K, D]
            v = v_ref[pages, :, head, :].reshape(blk_tokens, head_dim)  # [K, D]
            kv_pos = kv_blk * blk_tokens + kv_iota  # [K]
            v = jnp.where((kv_pos < kv_len)[:, None], v, jnp.zeros_like(v))
            s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * sm_scale  # [rows, K]
            if soft_cap is not None:
                s = soft_cap * jnp.tanh(s / soft_cap)
            mask = ((kv_pos[None, :] <= q_pos[:, None]) & (kv_pos[None, :] < kv_len)
                    & row_valid[:, None])  # [rows, K]
            if sliding_window is not None:
                mask &= q_pos[:, None] - kv_pos[None, :] < sliding_window
            s = jnp.where(mask, s, MASK_VALUE)
            m_next = jnp.maximum(m, s.max(axis=1))  # [rows]
            alpha = jnp.exp(m - m_next)
            p = jnp.where(mask, jnp.exp(s - m_next[:, None]), 0.0)  # [rows, K]
            pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
            return m_next, alpha * l + p.sum(axis=1), alpha[:, None] * acc + pv

        init = (jnp.full((rows,), MASK_VALUE, jnp.float32),
                jnp.zeros((rows,), jnp.float32),
                jnp.zeros((rows, head_dim), jnp.float32))
        _, l, acc = lax.fori_loop(kv_lo, kv_hi, body, init)
        out = acc / jnp.where(l == 0.0, 1.0, l)[:, None]
        plgpu.store(o_ref.at[head, pl.ds(row0, rows), :], out.astype(o_ref.dtype),
                    mask=row_valid[:, None])


@functools.partial(jax.jit, static_argnames=(
    "max_q_len", "sm_scale", "sliding_window", "soft_cap", "queries_per_block",
    "pages_per_block", "num_warps", "num_stages", "interpret"))
def ragged_paged_attention_gpu(
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
    queries_per_block: int | None = None,
    pages_per_block: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Ragged paged attention as one Pallas (Triton) GPU kernel.

    Args:
      q: [num_tokens, num_q_heads, head_dim] queries.
      k_cache: [num_layers, num_pages, page_size, num_kv_heads, head_dim].
      v_cache: same shape as ``k_cache``.
      layer: int or int32 scalar; which layer of the stacked cache to read.
      block_tables: [num_seqs, pages_per_seq] int32 page ids.
      seq_lens: [num_seqs] int32 context lengths (incl. the new tokens).
      query_start_loc: [num_seqs + 1] int32 cumulative query offsets.
      max_q_len: static bound on any query length; sizes the query-block grid.
      sm_scale: softmax scale.
      sliding_window: optional window; a query at p sees keys in (p - w, p].
      soft_cap: optional logit soft cap.
      queries_per_block: query tokens per program (power of two); default from
        ``tiling.gpu_tiling``. Raised so that rows = tokens * Gp >= 16 (tl.dot).
      pages_per_block: pages per online-softmax step (power of two).
      num_warps, num_stages: Triton launch parameters.
      interpret: run the kernel body in Pallas interpret mode (CPU tests).

    Returns:
      [num_tokens, num_q_heads, head_dim] in q's dtype; padding rows unspecified.

    Raises:
      ValueError: if the shapes disagree (the message names them).
    """
    validate_attention_inputs(q, k_cache, v_cache, block_tables, seq_lens,
                              query_start_loc, max_q_len=max_q_len,
                              sliding_window=sliding_window, soft_cap=soft_cap)
    num_tokens, num_q_heads, head_dim = q.shape
    num_layers, num_pages, page_size, num_kv_heads, _ = k_cache.shape
    num_seqs, pages_per_seq = block_tables.shape
    group = num_q_heads // num_kv_heads
    group_padded = pl.next_power_of_2(group)
    default = tiling.gpu_tiling(head_dim, page_size, k_cache.dtype)
    bq = queries_per_block or default.queries_per_block
    bk = pages_per_block or default.pages_per_block
    bq = min(bq, pl.next_power_of_2(max_q_len))
    bq = max(bq, 16 // group_padded, 1)
    for name, val in (("queries_per_block", bq), ("pages_per_block", bk),
                      ("page_size", page_size), ("head_dim", head_dim)):
        if val & (val - 1):
            raise ValueError(f"{name} must be a power of two for Triton, got {val} "
                             f"(q {q.shape}, k_cache {k_cache.shape})")

    # Pad the table to whole page blocks (no out-of-bounds loads).
    table_cols = pl.cdiv(pages_per_seq, bk) * bk
    block_tables = jnp.pad(block_tables, ((0, 0), (0, table_cols - pages_per_seq)))
    padded = num_tokens + bq  # room for a full block past the last token
    qg = q.reshape(num_tokens, num_kv_heads, group, head_dim)
    qg = jnp.pad(qg, ((0, padded - num_tokens), (0, 0), (0, group_padded - group), (0, 0)))
    qg = qg.transpose(1, 0, 2, 3).reshape(num_kv_heads, padded * group_padded, head_dim)
    kv_shape = (num_layers * num_pages, page_size, num_kv_heads, head_dim)

    kernel = functools.partial(
        _rpa_kernel, group=group, group_padded=group_padded, queries_per_block=bq,
        pages_per_block=bk, num_pages_per_layer=num_pages, sm_scale=sm_scale,
        sliding_window=sliding_window, soft_cap=soft_cap)
    out = pl.pallas_call(
        kernel,
        grid=(num_seqs, num_kv_heads, pl.cdiv(max_q_len, bq)),
        out_shape=jax.ShapeDtypeStruct(qg.shape, q.dtype),
        compiler_params=plgpu.CompilerParams(
            num_warps=num_warps or default.num_warps,
            num_stages=num_stages or default.num_stages),
        interpret=interpret,
        name="jax_serve_ragged_paged_attention",
    )(jnp.asarray(layer, jnp.int32).reshape(1), block_tables.astype(jnp.int32),
      seq_lens.astype(jnp.int32), query_start_loc.astype(jnp.int32), qg,
      k_cache.reshape(kv_shape), v_cache.reshape(kv_shape))
    out = out.reshape(num_kv_heads, padded, group_padded, head_dim)[:, :num_tokens, :group]
    return out.transpose(1, 0, 2, 3).reshape(num_tokens, num_q_heads, head_dim)
