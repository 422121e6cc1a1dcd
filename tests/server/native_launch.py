"""Starts one real ``python -m serving.main`` for a test module (free port, killed after)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--max-num-seqs", "8", "--max-model-len", "512", "--max-num-batched-tokens", "128",
         "--decode-buckets", "8", "--prefill-buckets", "128", "--num-gpu-blocks-override", "128",
         "--disable-log-requests", "--log-level", "warning"]
START_TIMEOUT = float(os.environ.get("JAX_SERVE_TEST_START_TIMEOUT", "600"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, url: str, proc: subprocess.Popen, log_path: str):
        self.url, self.proc, self.log_path = url, proc, log_path

    def log_tail(self, n: int = 4000) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-n:]


@contextlib.contextmanager
def launch(args: list[str]):
    """Runs ``serving.main`` with ``args`` + small settings; yields a Server once /health is 200."""
    port = free_port()
    log = tempfile.NamedTemporaryFile("w", prefix="jax-serve-native-", suffix=".log",
                                      delete=False)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("JAX_SERVE_API_KEY", None)
    cmd = [sys.executable, "-m", "serving.main", "--host", "127.0.0.1", "--port", str(port),
           *SMALL, *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", proc, log.name)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log_tail()}")
            try:
                if httpx.get(f"{server.url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready in {START_TIMEOUT}s:\n{server.log_tail()}")
            time.sleep(0.5)
        yield server
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


def assert_json_error(resp: httpx.Response, lo: int = 400, hi: int = 499) -> dict:
    """The response is a 4xx (by default) with an OpenAI-shaped JSON error body."""
    assert lo <= resp.status_code <= hi, (resp.status_code, resp.text)
    body = resp.json()
    assert set(body["error"]) >= {"message", "type", "code"}, body
    return body["error"]
