"""Starts one real ``python -m serving.main`` for a test module (free port, killed after)."""

from __future__ import annotations

import contextlib

import httpx
import pytest

from tests.server.conftest import launch as _launch

SMALL = ["--max-num-seqs", "8", "--max-model-len", "512", "--max-num-batched-tokens", "128",
         "--decode-buckets", "8", "--prefill-buckets", "128", "--num-gpu-blocks-override", "128",
         "--disable-log-requests", "--log-level", "warning"]


@contextlib.contextmanager
def launch(args: list[str]):
    """Runs ``serving.main`` with ``SMALL`` + ``args``; yields a Server once /health is 200."""
    with _launch("real", list(args), base_args=SMALL) as server:
        yield server


@pytest.fixture(scope="module")
def server():
    """One real server per test module that imports this fixture."""
    with launch([]) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    """An httpx client on the module's server."""
    with httpx.Client(base_url=server.url, timeout=300) as c:
        yield c


def assert_json_error(resp: httpx.Response, lo: int = 400, hi: int = 499) -> dict:
    """The response is a 4xx (by default) with a JSON error body in one of the
    upstream shapes: OpenAI's ``{"error": {...}}``, LMDeploy's flat
    ``{"object": "error", ...}`` or RTP-LLM's ``{"error_code", "message"}``.
    Returns the error's fields (``message`` always)."""
    assert lo <= resp.status_code <= hi, (resp.status_code, resp.text)
    body = resp.json()
    if "error" in body:
        err = body["error"]
        assert set(err) >= {"message", "type", "code"}, body
    elif body.get("object") == "error":
        err = body
        assert set(err) >= {"message", "type", "code", "param"} and err["code"] == \
            resp.status_code, body
    else:
        err = body
        assert set(err) == {"error_code", "error_code_str", "message"}, body
        assert err["error_code_str"].startswith(str(err["error_code"])), body
    return err
