"""Data parallelism: N independent engine replicas behind one ``AsyncEngine``.

Each replica is a full ``LLMEngine`` (its own scheduler, block manager, KV
cache and ``ModelRunner``) on its own row of the ``(data, tensor)`` mesh.
``DataParallelEngine`` implements the same ``EngineCore`` contract
(``serving.engine.protocol``) as one ``LLMEngine``, by delegating to its
replicas, so ``AsyncEngine`` and the HTTP layer are unchanged. New requests
go to the least-loaded replica (fewest running + queued sequences);
``step()`` steps every busy replica on its own thread, so their device work
overlaps. The admin operations of ``AsyncEngine`` (sleep, wake-up, weight
updates) reach each replica through ``replicas``.

The contract is structural (a ``typing.Protocol``): this module imports
nothing from ``serving`` (layers point one way: ``serving`` uses ``sharding``).
"""

from __future__ import annotations

import collections
import logging
from concurrent.futures import ThreadPoolExecutor

logger = logging.getLogger(__name__)


class DataParallelEngine:
    """An ``EngineCore`` over several ``LLMEngine`` replicas.

    Args:
      engines: the replicas, each on its own device group; they serve the
        same checkpoint with the same config.
    """

    def __init__(self, engines):
        if not engines:
            raise ValueError("DataParallelEngine needs at least one replica")
        self._replicas = list(engines)
        first = self._replicas[0]
        self.config = first.config
        self.tokenizer = first.tokenizer
        self.model_config = first.model_config
        self.max_model_len = first.max_model_len
        self._owner: dict[str, int] = {}  # request id -> replica index
        self._pool = ThreadPoolExecutor(len(self._replicas), thread_name_prefix="dp-replica")

    @property
    def replicas(self) -> list:
        """The replicas (``LLMEngine``), for the admin operations that touch device state."""
        return list(self._replicas)

    @property
    def model_path(self) -> str:
        """Where the serving weights came from (a weight update changes every replica's)."""
        return self._replicas[0].model_path

    @property
    def hf_config(self) -> dict:
        return self._replicas[0].hf_config

    def load(self, index: int) -> int:
        """Sequences replica ``index`` holds or will soon hold."""
        e = self._replicas[index]
        return e.num_running() + e.num_queued()

    def validate(self, prompt_token_ids, params):
        return self._replicas[0].validate(prompt_token_ids, params)

    def submit(self, request_id: str, prompt_token_ids, params) -> None:
        """Queues a request on the least-loaded replica (any thread)."""
        index = min(range(len(self._replicas)), key=self.load)
        self._owner[request_id] = index
        self._replicas[index].submit(request_id, prompt_token_ids, params)

    def abort(self, request_id: str) -> None:
        index = self._owner.get(request_id)
        if index is not None:
            self._replicas[index].abort(request_id)

    def num_queued(self) -> int:
        return sum(e.num_queued() for e in self._replicas)

    def num_running(self) -> int:
        return sum(e.num_running() for e in self._replicas)

    def has_work(self) -> bool:
        return any(e.has_work() for e in self._replicas)

    def step(self) -> list:
        """Steps every busy replica concurrently; returns all their outputs."""
        busy = [e for e in self._replicas if e.has_work()]
        if len(busy) == 1:
            outputs = busy[0].step()
        else:
            outputs = [o for f in [self._pool.submit(e.step) for e in busy] for o in f.result()]
        for out in outputs:
            if out.finished:
                self._owner.pop(out.request_id, None)
        return outputs

    def precompile(self) -> float:
        """Compiles every replica's step programs; returns the seconds spent."""
        return sum(e.precompile() for e in self._replicas)

    def startup_report(self) -> dict:
        """Replica 0's phase times; programs summed over the replicas."""
        reports = [e.startup_report() for e in self._replicas]
        out = dict(reports[0])
        for key in ("programs", "programs_from_cache"):
            out[key] = sum(r[key] for r in reports)
        return out

    def flush_prefix_cache(self) -> bool:
        """Drops every replica's prefix cache; False if any refused (requests running)."""
        return all([e.flush_prefix_cache() for e in self._replicas])

    def stats(self) -> dict:
        """Sums of the replicas' counters; ``kv_cache_usage`` is their mean."""
        per = [e.stats() for e in self._replicas]
        total: dict = {}
        finished: collections.Counter = collections.Counter()
        for s in per:
            for k, v in s.items():
                if k == "requests_finished":
                    finished.update(v)
                elif k in ("page_size",):
                    total[k] = v
                elif isinstance(v, (int, float)):
                    total[k] = total.get(k, 0) + v
        total["kv_cache_usage"] = sum(s["kv_cache_usage"] for s in per) / len(per)
        total["last_step_seconds"] = max(s["last_step_seconds"] for s in per)
        total["requests_finished"] = dict(finished)
        total["data_parallel_size"] = len(self._replicas)
        return total
