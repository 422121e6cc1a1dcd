"""Data parallelism: N independent engine replicas behind one ``AsyncEngine``.

Each replica is a full ``LLMEngine`` (its own scheduler, block manager, KV
cache and ``ModelRunner``) on its own row of the ``(data, tensor)`` mesh.
``DataParallelEngine`` presents the same interface ``AsyncEngine`` drives on
one ``LLMEngine`` (``validate``/``submit``/``abort``/``has_work``/``step``/
``stats`` and the ``scheduler``/``runner``/``_inbox`` it peeks at), so the HTTP
layer is unchanged. New requests go to the least-loaded replica (fewest
running + waiting sequences); ``step()`` steps every busy replica on its own
thread, so their device work overlaps. The admin operations of ``AsyncEngine``
(sleep, wake-up, weight updates) reach each replica through ``engines``.

This module is duck-typed over the replicas and imports nothing from
``serving`` (layers point one way: ``serving`` uses ``sharding``).
"""

from __future__ import annotations

import collections
import logging
from concurrent.futures import ThreadPoolExecutor

logger = logging.getLogger(__name__)


class _Inbox:
    """``len()`` of every replica's inbox (AsyncEngine's queue-size check)."""

    def __init__(self, engines):
        self._engines = engines

    def __len__(self) -> int:
        return sum(len(e._inbox) for e in self._engines)


class _Schedulers:
    def __init__(self, engines):
        self._engines = engines

    @property
    def num_waiting(self) -> int:
        return sum(e.scheduler.num_waiting for e in self._engines)

    @property
    def num_running(self) -> int:
        return sum(e.scheduler.num_running for e in self._engines)

    def has_unfinished(self) -> bool:
        return any(e.scheduler.has_unfinished() for e in self._engines)

    def flush_prefix_cache(self) -> bool:
        return all([e.scheduler.flush_prefix_cache() for e in self._engines])


class _Runners:
    def __init__(self, engines):
        self._engines = engines

    def precompile(self) -> float:
        """Compiles every replica's buckets (replicas on distinct devices compile alike)."""
        return sum(e.runner.precompile() for e in self._engines)


class DataParallelEngine:
    """``LLMEngine``-shaped front of several replicas.

    Args:
      engines: the replicas (``LLMEngine``), each on its own device group.
    """

    def __init__(self, engines):
        if not engines:
            raise ValueError("DataParallelEngine needs at least one replica")
        self.engines = list(engines)
        first = self.engines[0]
        self.config = first.config
        self.tokenizer = first.tokenizer
        self.model_config = first.model_config
        self.max_model_len = first.max_model_len
        self.model_path = first.model_path
        self.vocab_size = first.vocab_size
        self.scheduler = _Schedulers(self.engines)
        self.runner = _Runners(self.engines)
        self._inbox = _Inbox(self.engines)
        self._owner: dict[str, int] = {}  # request id -> replica index
        self._pool = ThreadPoolExecutor(len(self.engines), thread_name_prefix="dp-replica")
        self.on_output = None

    def load(self, index: int) -> int:
        """Sequences replica ``index`` holds or will soon hold."""
        e = self.engines[index]
        return e.scheduler.num_running + e.scheduler.num_waiting + len(e._inbox)

    def validate(self, prompt_token_ids, params):
        return self.engines[0].validate(prompt_token_ids, params)

    def submit(self, request_id: str, prompt_token_ids, params) -> None:
        """Queues a request on the least-loaded replica (any thread)."""
        index = min(range(len(self.engines)), key=self.load)
        self._owner[request_id] = index
        self.engines[index].submit(request_id, prompt_token_ids, params)

    def abort(self, request_id: str) -> None:
        index = self._owner.get(request_id)
        if index is not None:
            self.engines[index].abort(request_id)

    def has_work(self) -> bool:
        return any(e.has_work() for e in self.engines)

    def step(self) -> list:
        """Steps every busy replica concurrently; returns all their outputs."""
        busy = [e for e in self.engines if e.has_work()]
        if len(busy) == 1:
            outputs = busy[0].step()
        else:
            outputs = [o for f in [self._pool.submit(e.step) for e in busy] for o in f.result()]
        for out in outputs:
            if out.finished:
                self._owner.pop(out.request_id, None)
        return outputs

    def stats(self) -> dict:
        """Sums of the replicas' counters; ``kv_cache_usage`` is their mean."""
        per = [e.stats() for e in self.engines]
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
        total["data_parallel_size"] = len(self.engines)
        return total
