"""Attention under tensor parallelism: the cache write and the kernel run per shard.

The Pallas kernels are custom calls that GSPMD cannot partition, so on a mesh
the whole "write this step's K/V, then attend" block of a layer runs inside
``jax.shard_map`` over the ``TENSOR`` axis. Each device sees only its own
heads:

==================  ===============================  ==================================
argument            global shape                     spec when heads are split
==================  ===============================  ==================================
q                   [T, Hq, D]                       ``P(None, TENSOR, None)``
k, v (this step's)  [T, Hkv, D]                      ``P(None, TENSOR, None)``
k_cache, v_cache    [layers, pages, page, Hkv, D]    ``P(None, None, None, TENSOR, None)``
metadata arrays     tables, lengths, offsets, slots  replicated ``P()``
output              [T, Hq, D]                       ``P(None, TENSOR, None)``
==================  ===============================  ==================================

Heads are split iff both the q and the KV head counts divide tp
(``specs.heads_split``, the same rule that decides the KV cache's sharding, so
no resharding happens at the boundary). Otherwise every spec is ``P()``: the
cache is replicated and each device runs attention for every head (SmolLM2's
9 q / 3 KV heads at tp 2/4/8; a model whose KV heads are fewer than tp).
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
from jax.sharding import Mesh, PartitionSpec as P

from sharding.axes import TENSOR
from sharding.specs import heads_split

HEADS = P(None, TENSOR, None)  # [T, H, D] split by head
CACHE = P(None, None, None, TENSOR, None)  # [layers, pages, page_size, Hkv, D] split by KV head


def tensor_parallel_attention(local: Callable, mesh: Optional[Mesh], *, num_heads: int,
                              num_kv_heads: int, num_replicated: int) -> Callable:
    """Wraps a per-device attention block in ``jax.shard_map`` over ``mesh``'s tensor axis.

    Args:
      local: ``(q, k, v, k_cache, v_cache, *replicated) -> (out, k_cache, v_cache)``
        with the shapes in the module docstring (per shard when split).
      mesh: the replica's ``(data, tensor)`` mesh; None (or tp 1) returns ``local``.
      num_heads, num_kv_heads: the model's global q and KV head counts.
      num_replicated: how many trailing arguments are replicated metadata arrays.

    Returns:
      A function with ``local``'s signature on global arrays.
    """
    if mesh is None or mesh.shape[TENSOR] == 1:
        return local
    if heads_split(num_heads, num_kv_heads, mesh.shape[TENSOR]):
        heads, cache = HEADS, CACHE
    else:
        heads = cache = P()
    # check_vma=False: Pallas calls carry no varying-manual-axes rule; every
    # output is either split as declared or computed identically on all devices.
    return jax.shard_map(local, mesh=mesh,
                         in_specs=(heads, heads, heads, cache, cache) + (P(),) * num_replicated,
                         out_specs=(heads, cache, cache), check_vma=False)
