"""Tensor/data parallel greedy outputs equal single-device ones; tp 4 memory is ~1/4.

Each configuration runs in a subprocess with 8 simulated CPU devices (the
device count must be set before jax is imported), through ``AsyncEngine``.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.sharding.helpers import HERE, REPO, make_tiny_qwen3, run_engine

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return run_engine("default", ["1:1", "2:1", "4:1", "8:1", "1:2"])


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    folder = make_tiny_qwen3(tmp_path_factory.mktemp("qwen3"))
    return run_engine(str(folder), ["1:1", "2:1", "4:1", "8:1"])


@pytest.mark.parametrize("spec", ["2:1", "4:1", "8:1", "1:2"])
def test_smollm2_matches_single_device(smollm2, spec):
    assert smollm2[spec]["tokens"] == smollm2["1:1"]["tokens"]


def test_data_parallel_uses_both_replicas(smollm2):
    r = smollm2["1:2"]
    assert r["replica_devices"] == [[0], [1]]
    assert all(n > 0 for n in r["steps_per_replica"]), r["steps_per_replica"]


@pytest.mark.parametrize("spec", ["2:1", "4:1", "8:1"])
def test_qwen3_matches_single_device(qwen3, spec):
    assert qwen3[spec]["tokens"] == qwen3["1:1"]["tokens"]


def test_qwen3_tp4_memory_is_a_quarter(qwen3):
    one, four = qwen3["1:1"], qwen3["4:1"]
    assert four["kv_bytes"] == one["kv_bytes"] // 4  # 8 KV heads split 4 ways
    ratio = four["weight_bytes"] / one["weight_bytes"]
    assert 0.24 <= ratio <= 0.27, ratio  # only norms stay replicated


def test_multihost_two_processes_match_single_process(smollm2, tmp_path):
    """Two ``serving.main`` processes form one gloo mesh; then the follower is killed."""
    from model.loader import load_model

    proc = subprocess.run([sys.executable, str(HERE / "multihost.py"), str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    tok = load_model(None).tokenizer
    assert result["text"] == tok.decode(smollm2["1:1"]["tokens"][0])
    after = result["after_kill"]
    assert after["status"] >= 500 and "follower" in after["body"], after
