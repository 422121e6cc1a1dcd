"""Attention metadata and the KV cache: the pytrees that cross into ``jit``."""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import Mesh


@partial(jax.tree_util.register_dataclass,
         data_fields=["block_tables", "seq_lens", "query_start_loc", "slot_mapping"],
         meta_fields=["max_q_len", "attention_backend", "mesh"])
@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    """Describes one ragged batch for the paged-attention kernels.

    Token-indexed arrays have length ``num_tokens`` (a bucket size; tokens past
    ``query_start_loc[-1]`` are padding). Sequence-indexed arrays have length
    ``num_seqs`` (a bucket size; padding sequences have zero query and context
    length).
    """

    block_tables: jax.Array  # [num_seqs, pages_per_seq] int32 page ids
    seq_lens: jax.Array  # [num_seqs] int32 context length incl. this step's tokens
    query_start_loc: jax.Array  # [num_seqs + 1] int32 cumulative query offsets
    slot_mapping: jax.Array  # [num_tokens] int32 flat cache slot per token (0 = scratch)
    max_q_len: int = 1  # static: bound on any sequence's query length this step
    attention_backend: str = "auto"  # static: "auto" | "xla" | Pallas backends
    # static: the replica's tensor-parallel mesh; attention then runs per shard under
    # shard_map (sharding/attention.py). Set inside the jitted step by
    # sharding.step.jit_step, so host-built metadata (and what multi-host followers
    # receive) never carries devices.
    mesh: Optional[Mesh] = None


@partial(jax.tree_util.register_dataclass, data_fields=["k", "v"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class KVCache:
    """The paged KV cache of every layer. Page 0 is the scratch page."""

    k: jax.Array  # [num_layers, num_pages, page_size, num_kv_heads, head_dim]
    v: jax.Array  # [num_layers, num_pages, page_size, num_kv_heads, head_dim]

    @classmethod
    def zeros(cls, num_layers: int, num_pages: int, page_size: int,
              num_kv_heads: int, head_dim: int, dtype=jnp.float32) -> "KVCache":
        shape = (num_layers, num_pages, page_size, num_kv_heads, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    @property
    def page_size(self) -> int:
        return self.k.shape[2]

    @property
    def num_pages(self) -> int:
        return self.k.shape[1]
