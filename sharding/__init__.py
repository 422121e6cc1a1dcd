"""Tensor and data parallelism: meshes, partition specs, sharded jit and attention.

Where this package sits: ``pallas_kernels`` and ``sharding`` <- ``model`` <-
``serving``. ``sharding`` imports neither ``model`` nor ``serving`` (it reads a
``ModelConfig`` and the attention metadata by their attributes only), so the
model can wrap its attention in ``sharding.attention`` and the engine can lay
weights out with ``sharding.specs`` without a cycle;
``tests/model/test_layering.py`` checks it.

- ``axes``: the logical mesh axis names.
- ``mesh``: ``(data, tensor)`` device meshes.
- ``specs``: the partition spec of every weight and of the KV cache.
- ``layout``: one replica's mesh and ``ShardingPlan``.
- ``attention``: the per-shard ``shard_map`` around the attention kernels.
- ``step``: jit with input/output shardings for the engine's step.
- ``memory``: per-device byte accounting.
- ``distributed``: multi-host start-up and step broadcasting.
- ``data_parallel``: several engine replicas behind one front (duck-typed).
"""
