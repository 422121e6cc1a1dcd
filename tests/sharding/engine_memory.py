"""Subprocess script: per-device weight and KV-cache bytes of an engine at a tp/dp size.

Run by ``tests/sharding`` tests with ``XLA_FLAGS`` already set in its
environment (the device count must be fixed before jax is imported). Builds
``LLMEngine`` replicas (weights loaded into their shards, the KV cache
allocated sharded) without compiling or running a step, and prints one JSON
line per configuration: ``{"tp": .., "dp": .., "weight_bytes": .., "kv_bytes": ..}``
(the largest per-device footprint of replica 0).

Usage: ``python tests/sharding/engine_memory.py MODEL|default TP:DP [TP:DP ...]``
"""

from __future__ import annotations

import json
import logging
import sys


def measure(model, tp: int, dp: int) -> dict:
    from serving.engine.config import EngineConfig
    from serving.engine.engine import build_core
    from sharding.memory import max_bytes_per_device

    config = EngineConfig(model=model, dtype="float32", max_model_len=64, max_num_seqs=4,
                          max_num_batched_tokens=16, num_pages=24, precompile=False,
                          compile_cache_dir=None, decode_buckets=(4,), prefill_buckets=(16,),
                          tensor_parallel_size=tp, data_parallel_size=dp)
    engine = build_core(config)
    first = engine.replicas[0]
    return {"tp": tp, "dp": dp, "weight_bytes": max_bytes_per_device(first.state),
            "kv_bytes": max_bytes_per_device(first.runner.kv)}


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    model = None if sys.argv[1] == "default" else sys.argv[1]
    for spec in sys.argv[2:]:
        tp, dp = (int(x) for x in spec.split(":"))
        print(json.dumps(measure(model, tp, dp)), flush=True)
