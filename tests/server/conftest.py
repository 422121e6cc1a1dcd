"""Fixtures that run a real server process on a free port and kill it afterwards.

Two back ends:
- ``real``: ``python -m serving.main`` with the real engine and the embedded
  default model, tiny settings (32 seqs, 512 context, few buckets). Marked slow.
- ``fake``: ``tests/server/fake_server.py``, the same app over FakeEngine, to
  check the HTTP layer alone in seconds.
"""

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
import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY_ARGS = ["--max-num-seqs", "32", "--max-model-len", "512", "--max-num-batched-tokens", "256",
             "--decode-buckets", "8,32", "--prefill-buckets", "64,256", "--num-gpu-blocks-override",
             "512", "--disable-log-requests", "--log-level", "warning"]
START_TIMEOUT = float(os.environ.get("JAX_SERVE_TEST_START_TIMEOUT", "600"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A running server process: ``url`` is ``http://127.0.0.1:PORT``."""

    def __init__(self, kind: str, url: str, proc: subprocess.Popen, log_path: str):
        self.kind, self.url, self.proc, self.log_path = kind, url, proc, log_path

    def log_tail(self, n: int = 4000) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-n:]

    def metric(self, name: str) -> float:
        """Sum of a metric's samples from /metrics (all label sets)."""
        text = httpx.get(f"{self.url}/metrics", timeout=30).text
        total, found = 0.0, False
        for line in text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                total += float(line.rsplit(" ", 1)[1])
                found = True
        if not found:
            raise KeyError(name)
        return total


@contextlib.contextmanager
def launch(kind: str, extra_args: list[str] = (), base_args: list[str] = TINY_ARGS):
    """Starts a server of ``kind`` ("real" or "fake"), waits for /health, kills it at exit.

    ``base_args`` (default ``TINY_ARGS``) come before ``extra_args``.
    """
    if kind == "real" and os.environ.get("JAX_SERVE_TEST_URL") and not extra_args:
        # development aid: reuse a server started by hand with TINY_ARGS
        yield Server(kind, os.environ["JAX_SERVE_TEST_URL"], None, os.devnull)
        return
    port = free_port()
    args = ["--port", str(port), "--host", "127.0.0.1", *base_args, *extra_args]
    module = "serving.main" if kind == "real" else "tests.server.fake_server"
    log = tempfile.NamedTemporaryFile("w", prefix=f"jax-serve-{kind}-", suffix=".log",
                                      delete=False)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", ""))
    env.pop("JAX_SERVE_API_KEY", None)
    proc = subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(kind, f"http://127.0.0.1:{port}", proc, log.name)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{module} exited with {proc.returncode}:\n{server.log_tail()}")
            try:
                if httpx.get(f"{server.url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{module} not ready in {START_TIMEOUT}s:\n{server.log_tail()}")
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


def backend_params():
    """``fake`` always; ``real`` marked slow."""
    return [pytest.param("fake", id="fake"),
            pytest.param("real", id="real", marks=pytest.mark.slow)]


@pytest.fixture(scope="module")
def client(server):
    """The official ``openai`` client on the module's ``server`` (modules may override)."""
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                         timeout=300)


@pytest.fixture(scope="module")
def model(client):
    """The served model name, from ``/v1/models``."""
    return client.models.list().data[0].id
