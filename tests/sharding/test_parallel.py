"""Tensor/data parallel through the HTTP server: greedy outputs equal the tp 1 server's.

Each configuration is one real ``python -m serving.main`` process whose jax
sees 8 simulated CPU devices (``XLA_FLAGS`` in its environment). Four
token-id prompts go to ``/v1/completions`` concurrently (greedy, 16 tokens,
``return_token_ids``); the sharded servers' token ids must equal the tp 1
server's. Settings keep each server to two compiled programs (one prefill and
one decode bucket, compiled on first use). SmolLM2 is the embedded GGUF
converted once to a float32 folder (each server then starts ~10 s sooner).

The KV budget is given per device (``--kv-cache-memory-bytes``, 33 pages'
worth at tp 1), so ``jax_serve:num_total_pages`` also checks the page plan:
the tiny Qwen3's cache is split over its 8 KV heads (tp-times the pages),
SmolLM2's 3 KV heads are replicated (the same pages at every tp).

Also here: per-device memory at tp 4 (engines built in a subprocess, no
step run) and a two-process ``jax.distributed`` server on loopback.
"""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.server.conftest import launch
from tests.sharding.helpers import (HERE, PROMPTS, REPO, convert_default_model, engine_memory,
                                    make_tiny_qwen3)

pytestmark = pytest.mark.slow

MAX_TOKENS = 16
MIN_PAGES = 33  # one 512-token sequence (32 pages) plus the scratch page
SERVER_ARGS = ["--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", "16",
               "--max-num-batched-tokens", "16", "--decode-buckets", "4",
               "--prefill-buckets", "16", "--disable-precompile", "--compile-cache-dir", "",
               "--disable-log-requests", "--log-level", "warning"]
# Bytes of one KV page at tp 1, float32: 2 (K, V) * layers * 16 tokens * KV heads * head_dim * 4
SMOLLM2_PAGE = 2 * 30 * 16 * 3 * 64 * 4
QWEN3_PAGE = 2 * 2 * 16 * 8 * 32 * 4
# SmolLM2's 3 KV heads split at tp 2 and 8 (neither divides them: the replicated
# heads path); tp 4 is Qwen3's sweep (8 KV heads), so SmolLM2 skips it.
SMOLLM2_SPECS = ["1:1", "2:1", "8:1", "1:2"]
QWEN3_SPECS = ["1:1", "2:1", "4:1", "8:1"]


def _complete(url: str, model: str, prompt: list[int]) -> list[int]:
    body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0.0,
            "ignore_eos": True, "return_token_ids": True}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=600)
    r.raise_for_status()
    return r.json()["choices"][0]["token_ids"]


def serve(model_args: list[str], spec: str, page_bytes: int) -> dict:
    """One server at ``tp:dp``: its greedy token ids and KV page count (or its error)."""
    tp, dp = spec.split(":")
    args = model_args + ["--tensor-parallel-size", tp, "--data-parallel-size", dp,
                         "--kv-cache-memory-bytes", str(MIN_PAGES * page_bytes)]
    try:
        with pytest.MonkeyPatch.context() as mp:  # the server's jax sees 8 devices
            mp.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
            mp.setenv("JAX_PLATFORMS", "cpu")
            with launch("real", args, base_args=SERVER_ARGS) as server:
                model = httpx.get(f"{server.url}/v1/models", timeout=30).json()["data"][0]["id"]
                with ThreadPoolExecutor(len(PROMPTS)) as pool:  # concurrent: dp spreads them
                    tokens = list(pool.map(lambda p: _complete(server.url, model, p), PROMPTS))
                return {"tokens": tokens, "pages": server.metric("jax_serve:num_total_pages")}
    except Exception as exc:  # reported by each config's own test
        return {"error": f"{type(exc).__name__}: {exc}"[-4000:]}


@pytest.fixture(scope="module")
def smollm2_folder(tmp_path_factory):
    return convert_default_model(tmp_path_factory.mktemp("smollm2"))


@pytest.fixture(scope="module")
def smollm2(smollm2_folder):
    return {spec: serve(["--model", str(smollm2_folder)], spec, SMOLLM2_PAGE)
            for spec in SMOLLM2_SPECS}


@pytest.fixture(scope="module")
def qwen3_folder(tmp_path_factory, smollm2_folder):
    return make_tiny_qwen3(tmp_path_factory.mktemp("qwen3"), tokenizer_from=smollm2_folder)


@pytest.fixture(scope="module")
def qwen3(qwen3_folder):
    return {spec: serve(["--model", str(qwen3_folder)], spec, QWEN3_PAGE)
            for spec in QWEN3_SPECS}


def _ok(results: dict, spec: str) -> dict:
    r = results[spec]
    assert "error" not in r, f"server {spec}: {r['error']}"
    return r


@pytest.mark.parametrize("spec", SMOLLM2_SPECS[1:])
def test_smollm2_server_matches_single_device(smollm2, spec):
    one, r = _ok(smollm2, "1:1"), _ok(smollm2, spec)
    assert all(len(t) == MAX_TOKENS for t in one["tokens"])
    assert r["tokens"] == one["tokens"]
    dp = int(spec.split(":")[1])
    # 3 KV heads never divide tp 2/4/8: the cache is replicated, the page count unchanged
    assert r["pages"] == dp * (MIN_PAGES - 1)


@pytest.mark.parametrize("spec", QWEN3_SPECS[1:])
def test_qwen3_server_matches_single_device(qwen3, spec):
    one, r = _ok(qwen3, "1:1"), _ok(qwen3, spec)
    assert r["tokens"] == one["tokens"]
    # 8 KV heads split over tp: each device holds 1/tp of every page, tp-times the pages
    tp = int(spec.split(":")[0])
    assert one["pages"] == MIN_PAGES - 1 and r["pages"] == tp * MIN_PAGES - 1


def test_qwen3_tp4_memory_is_a_quarter(qwen3_folder):
    mem = engine_memory(str(qwen3_folder), ["1:1", "4:1"])
    one, four = mem["1:1"], mem["4:1"]
    assert four["kv_bytes"] == one["kv_bytes"] // 4  # 8 KV heads split 4 ways
    ratio = four["weight_bytes"] / one["weight_bytes"]
    assert 0.24 <= ratio <= 0.27, ratio  # only norms stay replicated


def test_multihost_two_processes_match_single_process(smollm2, smollm2_folder, tmp_path):
    """Two ``serving.main`` processes form one gloo mesh; then the follower is killed."""
    proc = subprocess.run([sys.executable, str(HERE / "multihost.py"), str(tmp_path),
                           str(smollm2_folder)],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = _ok(smollm2, "1:1")["tokens"][0]
    assert result["token_ids"] == expected[:len(result["token_ids"])], result
    after = result["after_kill"]
    assert after["status"] >= 500 and "follower" in after["body"], after
