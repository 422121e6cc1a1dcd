"""Random ragged paged-attention inputs for kernel tests and benchmarks."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass
class AttentionCase:
    """One ragged batch over a random paged KV cache (see ``reference.py``)."""

    q: jax.Array  # [num_tokens, num_q_heads, head_dim]
    k_cache: jax.Array  # [num_layers, num_pages, page_size, num_kv_heads, head_dim]
    v_cache: jax.Array  # same as k_cache
    layer: int
    block_tables: jax.Array  # [num_seqs, pages_per_seq] int32
    seq_lens: jax.Array  # [num_seqs] int32
    query_start_loc: jax.Array  # [num_seqs + 1] int32
    max_q_len: int
    num_valid_tokens: int  # rows past this are padding


def make_attention_case(q_lens, kv_lens, *, page_size=16, num_kv_heads=2, group=1,
                        head_dim=64, dtype=jnp.float32, num_layers=2, layer=1,
                        pad_seqs=1, pad_tokens=3, pages_per_seq=None,
                        seed=0) -> AttentionCase:
    """Builds random inputs; sequence ``i`` has ``q_lens[i]`` new tokens of ``kv_lens[i]``.

    Pages are distinct, shuffled and never page 0 (the scratch page); padding
    sequences (q_len 0, seq_len 0) and padding tokens are appended.
    """
    assert all(0 < q <= k for q, k in zip(q_lens, kv_lens)), (q_lens, kv_lens)
    rng = np.random.default_rng(seed)
    need = [-(-k // page_size) for k in kv_lens]
    pages_per_seq = pages_per_seq or max(need)
    num_pages = 1 + sum(need) + 2
    perm = rng.permutation(np.arange(1, num_pages))
    num_seqs = len(q_lens) + pad_seqs
    tables = np.zeros((num_seqs, pages_per_seq), np.int32)
    cursor = 0
    for i, n in enumerate(need):
        tables[i, :n] = perm[cursor:cursor + n]
        cursor += n
    q_lens_all = list(q_lens) + [0] * pad_seqs
    seq_lens = np.array(list(kv_lens) + [0] * pad_seqs, np.int32)
    qsl = np.concatenate([[0], np.cumsum(q_lens_all)]).astype(np.int32)
    num_valid = int(qsl[-1])
    num_tokens = num_valid + pad_tokens
    num_q_heads = num_kv_heads * group
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    cache_shape = (num_layers, num_pages, page_size, num_kv_heads, head_dim)
    return AttentionCase(
        q=jax.random.normal(keys[0], (num_tokens, num_q_heads, head_dim), jnp.float32).astype(dtype),
        k_cache=jax.random.normal(keys[1], cache_shape, jnp.float32).astype(dtype),
        v_cache=jax.random.normal(keys[2], cache_shape, jnp.float32).astype(dtype),
        layer=layer,
        block_tables=jnp.asarray(tables),
        seq_lens=jnp.asarray(seq_lens),
        query_start_loc=jnp.asarray(qsl),
        max_q_len=max(q_lens),
        num_valid_tokens=num_valid,
    )
