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
