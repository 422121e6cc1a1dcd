"""Two-process ``jax.distributed`` server on loopback (run by test_multihost.py).

Starts ``serving.main`` twice (``--nnodes 2``, ranks 0 and 1, one CPU device
each, gloo collectives, tp 2 over both), asks rank 0 for a greedy completion,
then kills the follower and checks the next request fails with a clear error
instead of hanging. Usage: ``multihost.py LOGDIR [MODEL]`` (default: the
embedded SmolLM2). Prints one JSON line:
``{"text": ..., "token_ids": [...], "after_kill": ...}``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from tests.sharding.helpers import PROMPTS  # noqa: E402

MAX_TOKENS = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(rank: int, coord: int, http: int, log: Path, model: str | None) -> subprocess.Popen:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(REPO)
    cmd = [sys.executable, "-m", "serving.main", "--nnodes", "2", "--node-rank", str(rank),
           "--dist-init-addr", f"127.0.0.1:{coord}", "--tp-size", "2", "--dtype", "float32",
           "--host", "127.0.0.1", "--port", str(http), "--max-model-len", "64",
           "--max-num-seqs", "4", "--max-num-batched-tokens", "16",
           "--num-gpu-blocks-override", "24", "--decode-buckets", "4", "--prefill-buckets", "16",
           "--compile-cache-dir", "", "--disable-precompile"]
    cmd += ["--model", model] if model else []
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT)


def main(logdir: Path, model: str | None = None) -> dict:
    coord, http = free_port(), free_port()
    procs = [start(r, coord, http, logdir / f"rank{r}.log", model) for r in (0, 1)]
    url = f"http://127.0.0.1:{http}"
    body = {"model": "default", "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS,
            "temperature": 0.0, "ignore_eos": True, "return_token_ids": True}
    try:
        deadline = time.monotonic() + 600
        while True:
            if any(p.poll() is not None for p in procs):
                raise RuntimeError("a node exited during start-up")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("server did not become ready")
            time.sleep(1)
        body["model"] = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
        r = httpx.post(url + "/v1/completions", json=body, timeout=300)
        r.raise_for_status()
        choice = r.json()["choices"][0]
        procs[1].kill()
        procs[1].wait()
        t0 = time.monotonic()
        r2 = httpx.post(url + "/v1/completions", json=body, timeout=300)
        after = {"status": r2.status_code, "body": r2.text[:500],
                 "seconds": time.monotonic() - t0, "leader_alive": procs[0].poll() is None}
        return {"text": choice["text"], "token_ids": choice.get("token_ids"),
                "after_kill": after}
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else None)),
          flush=True)
