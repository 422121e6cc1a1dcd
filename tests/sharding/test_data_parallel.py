"""``DataParallelEngine`` routing and stats over stand-in replicas (no devices, milliseconds)."""

from __future__ import annotations

import collections
import types

from sharding.data_parallel import DataParallelEngine


class FakeReplica:
    """The ``LLMEngine`` surface ``DataParallelEngine`` uses; each step finishes one request."""

    def __init__(self):
        self._inbox = collections.deque()
        self.scheduler = types.SimpleNamespace(num_running=0, num_waiting=0)
        self.steps = 0
        for name in ("config", "tokenizer", "model_config", "max_model_len", "model_path",
                     "vocab_size"):
            setattr(self, name, None)

    def submit(self, request_id, prompt, params):
        self._inbox.append(request_id)

    def has_work(self):
        return bool(self._inbox)

    def step(self):
        self.steps += 1
        rid = self._inbox.popleft()
        return [types.SimpleNamespace(request_id=rid, finished=True)]

    def stats(self):
        return {"num_total_pages": 32, "page_size": 16, "kv_cache_usage": 0.5 * self.steps,
                "num_steps_total": self.steps, "last_step_seconds": 0.01,
                "requests_finished": {"stop": self.steps}}


def test_requests_go_to_the_least_loaded_replica():
    a, b = FakeReplica(), FakeReplica()
    dp = DataParallelEngine([a, b])
    for i in range(4):
        dp.submit(f"r{i}", [1, 2], None)
    assert list(a._inbox) == ["r0", "r2"] and list(b._inbox) == ["r1", "r3"]
    outs = dp.step()  # both busy: stepped concurrently
    assert sorted(o.request_id for o in outs) == ["r0", "r1"]
    assert a.steps == b.steps == 1
    dp.submit("r4", [1], None)  # equal load again: the first replica
    assert list(a._inbox) == ["r2", "r4"]


def test_stats_sum_the_replicas():
    a, b = FakeReplica(), FakeReplica()
    dp = DataParallelEngine([a, b])
    dp.submit("r0", [1], None)
    dp.step()
    s = dp.stats()
    assert s["num_total_pages"] == 64 and s["page_size"] == 16
    assert s["num_steps_total"] == 1 and s["kv_cache_usage"] == 0.25
    assert s["requests_finished"] == {"stop": 1} and s["data_parallel_size"] == 2
