"""Ragged paged attention for TPU (Pallas / Mosaic).

Layout and schedule:

* The wrapper regroups queries per KV head: ``q [T, Hq, D] -> [Hkv, Tp * G, D]``
  (``G = Hq // Hkv``, ``Tp`` = tokens padded to a multiple of
  ``queries_per_block``), so one grid step owns a ``[queries_per_block * G, D]``
  tile of query rows of one KV head — a plain ``BlockSpec`` tile, pipelined
  by Pallas.
* Grid ``(Hkv, num_q_blocks)``. A block of query tokens may span several
  sequences (ragged batch); the wrapper precomputes, per block, the first and
  last overlapping sequence and passes it with the block tables, lengths,
  query offsets and the layer index as scalar-prefetch operands (SMEM).
* The stacked KV cache stays in HBM (``memory_space=ANY``): for each
  overlapping sequence the kernel loops over blocks of ``pages_per_block``
  pages, DMAs each page's ``[page_size, D]`` slice of this layer and KV head
  into a double-buffered VMEM tile (the next block's DMA is in flight while the
  current one is reduced), and runs an online softmax.

Why not jax's own ``ragged_paged_attention``: in jax 0.10.2 it fails in TPU
interpret mode with ``'ReshapeTransform' object has no attribute 'indices'``:
it loads through a reshaped *ref* (``cur_async_copy_kv.wait().reshape(...)``
then strided loads to split combined K/V heads), and the interpreter's ``get``
cannot index a ``ReshapeTransform`` (reproduced in
``tests/kernels/test_attention_kernels.py::test_jax_rpa_fails_in_interpret_mode``). This kernel never
reshapes or strides a ref: pages are DMA'd straight into ``pl.ds`` row ranges
of a ``[2, pages_per_block * page_size, D]`` buffer, and K and V are separate
caches, so every ref access is a plain slice.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import tiling
from pallas_kernels.common import MASK_VALUE, q_block_seq_ranges, validate_attention_inputs


def _cdiv(a, b: int):
    # Truncating division of non-negative ints: jnp's floor ``//`` and ``%``
    # lower through ``sign``, whose Mosaic rule needs a TPU to query.
    return lax.div(a + (b - 1), b)


def _rpa_kernel(
    # Scalar prefetch (SMEM).
    layer_ref,  # [1] int32
    block_tables_ref,  # [num_seqs * pages_per_seq] int32, flattened
    seq_lens_ref,  # [num_seqs] int32
    qsl_ref,  # [num_seqs + 1] int32
    seq_range_ref,  # [num_q_blocks * 2] int32: first/last sequence per q block
    # Inputs.
    q_ref,  # [rows, D] VMEM tile, rows = queries_per_block * G
    k_hbm,  # [L, P, page_size, Hkv, D] HBM
    v_hbm,  # [L, P, page_size, Hkv, D] HBM
    # Output.
    o_ref,  # [rows, D]
    # Scratch.
    k_buf,  # [2, pages_per_block * page_size, D] VMEM
    v_buf,  # [2, pages_per_block * page_size, D] VMEM
    sems,  # DMA semaphores [2 (k/v), 2 (slot)]
    *,
    group: int,
    queries_per_block: int,
    pages_per_block: int,
    page_size: int,
    pages_per_seq: int,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
):
    head = pl.program_id(0)
    q_blk = pl.program_id(1)
    rows, head_dim = q_ref.shape
    blk_tokens = pages_per_block * page_size
    layer = layer_ref[0]
    blk_start = q_blk * queries_per_block
    blk_end = blk_start + queries_per_block

    q = q_ref[...]  # [rows, D]
    row_tok = blk_start + lax.div(lax.broadcasted_iota(jnp.int32, (rows, 1), 0), group)  # [rows, 1]
    kv_iota = lax.broadcasted_iota(jnp.int32, (1, blk_tokens), 1)  # [1, K]
    kv_row_iota = lax.broadcasted_iota(jnp.int32, (blk_tokens, 1), 0)  # [K, 1]

    def page_copies(seq, kv_blk, slot, num_pages):
        copies = []
        for i in range(pages_per_block):
            page_idx = kv_blk * pages_per_block + i
            valid = page_idx < num_pages
            table_idx = seq * pages_per_seq + jnp.minimum(page_idx, pages_per_seq - 1)
            page = lax.select(valid, block_tables_ref[table_idx], 0)
            dst = pl.ds(i * page_size, page_size)
            copies.append(pltpu.make_async_copy(
                k_hbm.at[layer, page, :, head], k_buf.at[slot, dst], sems.at[0, slot]))
            copies.append(pltpu.make_async_copy(
                v_hbm.at[layer, page, :, head], v_buf.at[slot, dst], sems.at[1, slot]))
        return copies

    def seq_body(seq, carry):
        q_start = qsl_ref[seq]
        q_end = qsl_ref[seq + 1]
        kv_len = seq_lens_ref[seq]
        q_len = q_end - q_start
        num_pages = _cdiv(kv_len, page_size)
        row_in = (row_tok >= q_start) & (row_tok < q_end)  # [rows, 1]
        q_pos = kv_len - q_len + (row_tok - q_start)  # [rows, 1]
        first_tok = jnp.maximum(q_start, blk_start)
        last_tok = jnp.minimum(q_end, blk_end) - 1
        active = last_tok >= first_tok
        # Keys needed: causal up to the last query here; window from the first.
        kv_hi = _cdiv(kv_len - q_len + (last_tok - q_start) + 1, blk_tokens)
        if sliding_window is None:
            kv_lo = jnp.int32(0)
        else:
            first_pos = kv_len - q_len + (first_tok - q_start)
            kv_lo = lax.div(jnp.maximum(first_pos - sliding_window + 1, 0), blk_tokens)
        kv_hi = jnp.where(active, kv_hi, kv_lo)

        @pl.when(kv_lo < kv_hi)
        def _():
            for c in page_copies(seq, kv_lo, 0, num_pages):
                c.start()

        def kv_body(kv_blk, carry):
            m, l, acc = carry
            slot = lax.rem(kv_blk - kv_lo, 2)

            @pl.when(kv_blk + 1 < kv_hi)
            def _():
                for c in page_copies(seq, kv_blk + 1, 1 - slot, num_pages):
                    c.start()

            for c in page_copies(seq, kv_blk, slot, num_pages):
                c.wait()
            k = k_buf[slot]  # [K, D]
            v = v_buf[slot]  # [K, D]
            kv_start = kv_blk * blk_tokens
            v = jnp.where(kv_row_iota < kv_len - kv_start, v, jnp.zeros_like(v))
            s = lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32) * sm_scale  # [rows, K]
            if soft_cap is not None:
                s = soft_cap * jnp.tanh(s / soft_cap)
            kv_pos = kv_start + kv_iota  # [1, K]
            mask = row_in & (kv_pos <= q_pos) & (kv_pos < kv_len)  # [rows, K]
            if sliding_window is not None:
                mask &= q_pos - kv_pos < sliding_window
            s = jnp.where(mask, s, MASK_VALUE)
            m_next = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))  # [rows, 1]
            alpha = jnp.exp(m - m_next)
            p = jnp.where(mask, jnp.exp(s - m_next), 0.0)  # [rows, K]
            pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
            l_next = alpha * l + jnp.sum(p, axis=1, keepdims=True)
            return m_next, l_next, alpha * acc + pv

        return lax.fori_loop(kv_lo, kv_hi, kv_body, carry)

    init = (
        jnp.full((rows, 1), -jnp.inf, jnp.float32),  # running max
        jnp.zeros((rows, 1), jnp.float32),  # running denominator
        jnp.zeros((rows, head_dim), jnp.float32),  # running numerator
    )
    seq_lo = seq_range_ref[2 * q_blk]
    seq_hi = seq_range_ref[2 * q_blk + 1]
    _, l, acc = lax.fori_loop(seq_lo, seq_hi + 1, seq_body, init)
    o_ref[...] = (acc / jnp.where(l == 0.0, 1.0, l)).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=(
    "max_q_len", "sm_scale", "sliding_window", "soft_cap", "queries_per_block",
    "pages_per_block", "interpret"))
def ragged_paged_attention_tpu(
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
    interpret: bool = False,
) -> jax.Array:
    """Ragged paged attention as one Pallas TPU kernel.

    Args:
      q: [num_tokens, num_q_heads, head_dim] queries.
      k_cache: [num_layers, num_pages, page_size, num_kv_heads, head_dim] (HBM).
      v_cache: same shape as ``k_cache``.
      layer: int or int32 scalar; which layer of the stacked cache to read.
      block_tables: [num_seqs, pages_per_seq] int32 page ids.
      seq_lens: [num_seqs] int32 context lengths (incl. the new tokens).
      query_start_loc: [num_seqs + 1] int32 cumulative query offsets.
      max_q_len: static bound on any query length (validated, not used to tile).
      sm_scale: softmax scale.
      sliding_window: optional window; a query at p sees keys in (p - w, p].
      soft_cap: optional logit soft cap.
      queries_per_block: query tokens per grid step (multiple of 8); default
        from ``tiling.tpu_tiling``.
      pages_per_block: KV pages per online-softmax step; default from tiling.
      interpret: run the kernel body in Pallas TPU interpret mode (CPU). Tests
        use ``pltpu.force_tpu_interpret_mode()`` instead, which also covers the
        kernel when called through ``dispatch``.

    Returns:
      [num_tokens, num_q_heads, head_dim] in q's dtype; padding rows unspecified.

    Raises:
      ValueError: if the shapes disagree (the message names them).
    """
    validate_attention_inputs(q, k_cache, v_cache, block_tables, seq_lens,
                              query_start_loc, max_q_len=max_q_len,
                              sliding_window=sliding_window, soft_cap=soft_cap)
    num_tokens, num_q_heads, head_dim = q.shape
    _, _, page_size, num_kv_heads, _ = k_cache.shape
    num_seqs, pages_per_seq = block_tables.shape
    group = num_q_heads // num_kv_heads
    default = tiling.tpu_tiling(head_dim, page_size, k_cache.dtype)
    bq = queries_per_block or default.queries_per_block
    bk = min(pages_per_block or default.pages_per_block, pages_per_seq)
    if bq % 8:
        raise ValueError(f"queries_per_block must be a multiple of 8, got {bq}")
    if page_size % 8:
        raise ValueError(f"page_size of k_cache {k_cache.shape} must be a multiple of 8")

    num_q_blocks = pl.cdiv(num_tokens, bq)
    padded = num_q_blocks * bq
    rows = bq * group
    # [T, Hq, D] -> [Hkv, Tp * G, D]: each KV head's query rows, token-major.
    qg = q.reshape(num_tokens, num_kv_heads, group, head_dim)
    qg = jnp.pad(qg, ((0, padded - num_tokens), (0, 0), (0, 0), (0, 0)))
    qg = qg.transpose(1, 0, 2, 3).reshape(num_kv_heads, padded * group, head_dim)

    seq_ranges = q_block_seq_ranges(query_start_loc, num_q_blocks, bq).reshape(-1)
    scalars = (
        jnp.asarray(layer, jnp.int32).reshape(1),
        block_tables.astype(jnp.int32).reshape(-1),
        seq_lens.astype(jnp.int32),
        query_start_loc.astype(jnp.int32),
        seq_ranges,
    )
    kernel = functools.partial(
        _rpa_kernel, group=group, queries_per_block=bq, pages_per_block=bk,
        page_size=page_size, pages_per_seq=pages_per_seq, sm_scale=sm_scale,
        sliding_window=sliding_window, soft_cap=soft_cap)
    q_spec = pl.BlockSpec((None, rows, head_dim), lambda h, i, *_: (h, i, 0))
    kv_tile = pltpu.VMEM((2, bk * page_size, head_dim), k_cache.dtype)
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(scalars),
            grid=(num_kv_heads, num_q_blocks),
            in_specs=[q_spec, pl.BlockSpec(memory_space=pl.ANY),
                      pl.BlockSpec(memory_space=pl.ANY)],
            out_specs=q_spec,
            scratch_shapes=[kv_tile, kv_tile, pltpu.SemaphoreType.DMA((2, 2))],
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary")),
        out_shape=jax.ShapeDtypeStruct(qg.shape, q.dtype),
        interpret=interpret,
        name="jax_serve_ragged_paged_attention",
    )(*scalars, qg, k_cache, v_cache)
    out = out.reshape(num_kv_heads, padded, group, head_dim).transpose(1, 0, 2, 3)
    return out[:num_tokens].reshape(num_tokens, num_q_heads, head_dim)
