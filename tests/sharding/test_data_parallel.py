"""``DataParallelEngine`` routing and stats over stand-in replicas (no devices, milliseconds)."""

from __future__ import annotations

import collections
import types

from sharding.data_parallel import DataParallelEngine


class FakeReplica:
    """The ``LLMEngine`` surface ``DataParallelEngine`` uses; each step finishes one request."""

    def __init__(self):
        self._inbox = collections.deque()
        self.steps = 0
        self.flushed = 0
        for name in ("config", "tokenizer", "model_config", "max_model_len", "model_path"):
            setattr(self, name, None)
        self.hf_config = {}

    def submit(self, request_id, prompt, params):
        self._inbox.append(request_id)

    def num_queued(self):
        return len(self._inbox)

    def num_running(self):
        return 0

    def has_work(self):
        return bool(self._inbox)

    def precompile(self):
        return 1.5

    def flush_prefix_cache(self):
        self.flushed += 1
        return not self._inbox

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


def test_engine_core_members_delegate_to_every_replica():
    a, b = FakeReplica(), FakeReplica()
    dp = DataParallelEngine([a, b])
    assert dp.replicas == [a, b] and dp.hf_config == {}
    dp.submit("r0", [1], None)
    assert dp.num_queued() == 1 and dp.num_running() == 0
    assert dp.precompile() == 3.0
    assert dp.flush_prefix_cache() is False  # one replica is busy; both were asked
    assert a.flushed == b.flushed == 1
    a.model_path = "new/weights"  # a weight swap changes the replicas' path
    assert dp.model_path == "new/weights"


def test_no_facades_and_no_serving_imports():
    import subprocess
    import sys

    dp = DataParallelEngine([FakeReplica()])
    for name in ("scheduler", "runner", "_inbox", "engines", "on_output"):
        assert not hasattr(dp, name), name
    code = ("import sys; import sharding.data_parallel; "
            "assert not [m for m in sys.modules if m.startswith('serving')]")
    subprocess.run([sys.executable, "-c", code], check=True)
