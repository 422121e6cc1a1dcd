"""Pallas attention under ``shard_map``: tp forwards equal the single-device XLA forward.

One subprocess with 8 simulated CPU devices (``tp_forward.py``) runs a tiny
random Qwen3-style model (8 q heads) with the Pallas kernels in interpret mode
at tp 2 and 4, heads split (4 KV heads) and replicated (2 KV heads at tp 4),
and exports the tp steps for TPU (tp 4) and CUDA (tp 2): the Mosaic / Triton
kernels sit inside the manual (shard_map) computation and see the per-shard
cache.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sharding.specs import heads_split
from tests.sharding.helpers import HERE, REPO, device_env

CASES = ["pallas_gpu_interpret:2:8:4", "pallas_tpu_interpret:4:8:4", "pallas_tpu_interpret:4:8:2"]


@pytest.fixture(scope="module")
def results():
    proc = subprocess.run([sys.executable, str(HERE / "tp_forward.py"), *CASES, "export"],
                          env=device_env(8), cwd=REPO, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    return {r["case"]: r for r in lines}


@pytest.mark.parametrize("case", CASES)
def test_sharded_pallas_forward_matches_xla(results, case):
    r = results[case]
    assert r["argmax_equal"], r
    assert r["logits_err"] < 1e-4 and r["kv_err"] < 1e-4, r
    split = heads_split(8, int(case.split(":")[3]), int(case.split(":")[1]))
    assert r["kv_spec"] == ("P(None, None, None, 'tensor', None)" if split else "P()"), r


@pytest.mark.parametrize("case,platform,local_heads", [(CASES[0], "cuda", 2),
                                                        (CASES[1], "tpu", 1),
                                                        (CASES[2], "tpu", 2)])
def test_tp_step_exports(results, case, platform, local_heads):
    exp = results[case]["export"]
    assert exp["platform"] == platform and exp["kernel_calls"] > 0 and exp["manual"], exp
    assert exp["local_kv_heads"] == local_heads and exp["local_cache_type"], exp
    assert exp["nr_devices"] == int(case.split(":")[1])


def test_heads_split_rule():
    assert heads_split(16, 8, 4) and heads_split(16, 8, 8)
    assert not heads_split(9, 3, 2)  # SmolLM2: q heads do not divide
    assert not heads_split(16, 8, 16)  # KV heads fewer than tp: replicated
    assert not heads_split(16, 8, 1)
