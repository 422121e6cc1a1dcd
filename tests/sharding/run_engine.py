"""Subprocess script: greedy completions through ``AsyncEngine`` at a given tp/dp.

Run by ``tests/sharding`` tests with ``XLA_FLAGS`` already set in its
environment (the device count must be fixed before jax is imported). Prints
one JSON line: ``{"tokens": [[...], ...], "weight_bytes": .., "kv_bytes": ..}``
where the byte counts are the largest per-device footprint.

Usage: ``python tests/sharding/run_engine.py MODEL|default TP:DP [TP:DP ...]``
(one JSON line per configuration, in order).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys

PROMPTS = [[1, 504, 3458, 282, 4649, 314], [1, 2683, 549, 2016, 30, 216],
           [1, 416, 253, 1123, 24, 2, 7, 9, 31, 77], [1, 5248, 42, 12]]
MAX_TOKENS = 8


def engine_config(model, tp: int, dp: int):
    from serving.engine.config import EngineConfig

    return EngineConfig(model=model, dtype="float32", max_model_len=64, max_num_seqs=4,
                        max_num_batched_tokens=16, num_pages=24, precompile=False,
                        compile_cache_dir=None, decode_buckets=(4,), prefill_buckets=(16,),
                        tensor_parallel_size=tp, data_parallel_size=dp)


async def generate(engine, prompts) -> list[list[int]]:
    from serving.engine.types import SamplingParams

    async def one(i, prompt):
        params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
        last = None
        async for out in engine.generate(prompt, params, request_id=f"r{i}"):
            last = out
        assert last.error is None, last.error
        return list(last.outputs[0].token_ids)

    return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))


async def main(model, tp: int, dp: int) -> dict:
    from serving.engine.async_engine import AsyncEngine
    from sharding.memory import max_bytes_per_device

    engine = AsyncEngine(engine_config(model, tp, dp))
    await engine.start()
    try:
        tokens = await generate(engine, PROMPTS)
    finally:
        await engine.shutdown()
    core = getattr(engine.engine, "engines", [engine.engine])
    out = {"tokens": tokens,
           "weight_bytes": max_bytes_per_device(core[0].runner.state),
           "kv_bytes": max_bytes_per_device(core[0].runner.kv)}
    if len(core) > 1:
        out["steps_per_replica"] = [e.counters["steps"] for e in core]
        out["replica_devices"] = [[d.id for d in e.layout.mesh.devices.flat] for e in core]
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    model = None if sys.argv[1] == "default" else sys.argv[1]
    for spec in sys.argv[2:]:
        tp, dp = (int(x) for x in spec.split(":"))
        result = asyncio.run(main(model, tp, dp))
        result.update(tp=tp, dp=dp)
        print(json.dumps(result), flush=True)
