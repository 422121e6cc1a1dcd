"""Per-device memory accounting from arrays' shardings (``addressable_shards``)."""

from __future__ import annotations

import collections

import jax


def bytes_per_device(tree) -> dict[jax.Device, int]:
    """Bytes each (addressable) device holds for the jax arrays in ``tree``."""
    out: collections.Counter = collections.Counter()
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array):
            for shard in leaf.addressable_shards:
                out[shard.device] += shard.data.nbytes
    return dict(out)


def max_bytes_per_device(tree) -> int:
    """The largest per-device footprint of ``tree`` (0 for no arrays)."""
    return max(bytes_per_device(tree).values(), default=0)


def kv_page_bytes_per_device(config, page_size: int, dtype, plan=None) -> int:
    """Bytes one KV-cache page (K and V, every layer) takes on each device.

    The cache is ``[layers, pages, page_size, kv_heads, head_dim]`` twice; under
    tensor parallelism its head axis is split over the tensor axis when
    ``plan.kv_heads`` (``specs.kv_cache_spec``), so each device holds
    ``kv_heads / tp`` heads of every page. A per-device memory budget divided by
    this is the page count: tp 4 with 8 KV heads fits 4x the pages of tp 1.

    Args:
      config: the ``ModelConfig`` (``num_layers``, ``num_kv_heads``, ``head_dim``).
      page_size: tokens per page.
      dtype: the cache's dtype (anything ``numpy.dtype`` or ``jnp.dtype`` takes).
      plan: the replica's ``ShardingPlan``; None for one device.
    """
    import jax.numpy as jnp

    heads = config.num_kv_heads
    if plan is not None and plan.kv_heads:
        heads //= plan.tp
    return 2 * config.num_layers * page_size * heads * config.head_dim * jnp.dtype(dtype).itemsize
