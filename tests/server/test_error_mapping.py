"""One error mapping: an engine-side failure gets the same status on every route family.

In-process (Quart test client) over FakeEngine variants: one whose requests
fail inside the engine (their last output carries ``error``), and ones whose
``add_request`` raises each error of ``serving.engine.errors``. Every
generating route answers the same status, in its dialect's error shape.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from serving.api.app import create_app
from serving.config import ServerConfig
from serving.engine import errors
from serving.engine.types import CompletionOutput, RequestOutput
from tests.server.fake_engine import FakeEngine, load_default_tokenizer

MSG = [{"role": "user", "content": "hi"}]
# (route, body, the shape its errors take)
ROUTES = [
    ("/v1/completions", {"prompt": "hi", "max_tokens": 3}, "openai"),
    ("/v1/chat/completions", {"messages": MSG, "max_tokens": 3}, "openai"),
    ("/generate", {"text": "hi", "sampling_params": {"max_new_tokens": 3}}, "openai"),
    ("/generate", {"prompt": "hi", "max_tokens": 3}, "lmdeploy"),
    ("/", {"prompt": "hi", "generate_config": {"max_new_tokens": 3}}, "rtp"),
    ("/v1/score", {"query": "a", "items": ["b"], "label_token_ids": [5]}, "openai"),
]


class FailingEngine(FakeEngine):
    """Every request fails inside the engine after one token (e.g. NaN logits)."""

    def add_request(self, request_id, prompt_token_ids, params):
        async def stream():
            await asyncio.sleep(0)
            out = CompletionOutput(index=0, token_ids=[7], finish_reason="error")
            yield RequestOutput(request_id, list(prompt_token_ids), [out], True,
                                error="injected fault")
        return stream()


class RaisingEngine(FakeEngine):
    def __init__(self, tokenizer, exc: Exception):
        super().__init__(tokenizer)
        self.exc = exc

    def add_request(self, request_id, prompt_token_ids, params):
        raise self.exc


@pytest.fixture(scope="module")
def tokenizer():
    return load_default_tokenizer()


def _post(app, path: str, body: dict, with_headers: bool = False):
    async def go():
        resp = await app.test_client().post(path, json=body)
        out = resp.status_code, json.loads(await resp.get_data(as_text=True))
        return out + (resp.headers,) if with_headers else out
    return asyncio.run(go())


def _message(shape: str, body: dict) -> str:
    if shape == "openai":
        return body["error"]["message"]
    if shape == "lmdeploy":
        assert body["object"] == "error" and set(body) >= {"type", "code", "param"}
        return body["message"]
    assert set(body) == {"error_code", "error_code_str", "message"}
    return body["message"]


@pytest.mark.parametrize("path,body,shape", ROUTES, ids=[f"{r[0]}-{r[2]}" for r in ROUTES])
def test_failure_inside_the_engine_is_500_everywhere(tokenizer, path, body, shape):
    app = create_app(FailingEngine(tokenizer), ServerConfig())
    status, out = _post(app, path, body)
    assert status == 500, out
    assert "injected fault" in _message(shape, out)


@pytest.mark.parametrize("exc,status", [
    (errors.ValidationError("temperature", "temperature is bad"), 400),
    (errors.UnsupportedOperationError("cannot do that"), 400),
    (errors.EngineOverloadedError("queue full"), 503),
    (errors.EngineNotReadyError("asleep"), 503),
    (errors.RequestFailedError("device lost"), 500),
], ids=lambda x: type(x).__name__ if isinstance(x, Exception) else str(x))
@pytest.mark.parametrize("path,body,shape", ROUTES, ids=[f"{r[0]}-{r[2]}" for r in ROUTES])
def test_engine_errors_map_to_one_status(tokenizer, path, body, shape, exc, status):
    app = create_app(RaisingEngine(tokenizer, exc), ServerConfig())
    got, out = _post(app, path, body)
    assert got == status, out
    assert str(exc) in _message(shape, out)
    if shape == "openai" and isinstance(exc, errors.ValidationError):
        assert out["error"]["param"] == "temperature"


def test_streamed_failure_ends_with_an_error_event(tokenizer):
    app = create_app(FailingEngine(tokenizer), ServerConfig())

    async def go():
        resp = await app.test_client().post("/v1/completions", json={
            "prompt": "hi", "max_tokens": 3, "stream": True})
        return resp.status_code, await resp.get_data(as_text=True)
    status, text = asyncio.run(go())
    events = [e for e in text.split("\n\n") if e]
    assert status == 200 and events[-1] == "data: [DONE]"
    err = json.loads(events[-2][len("data: "):])["error"]
    assert err["code"] == 500 and "injected fault" in err["message"]


@pytest.mark.parametrize("path,body,shape", ROUTES, ids=[f"{r[0]}-{r[2]}" for r in ROUTES])
def test_full_queue_is_503_with_retry_after_and_counted(tokenizer, path, body, shape):
    app = create_app(RaisingEngine(tokenizer, errors.EngineOverloadedError("queue full")),
                     ServerConfig())
    status, _, headers = _post(app, path, body, with_headers=True)
    assert status == 503 and headers["Retry-After"] == "1"

    async def metrics():
        resp = await app.test_client().get("/metrics")
        return await resp.get_data(as_text=True)
    line = [x for x in asyncio.run(metrics()).splitlines()
            if x.startswith("jax_serve:requests_rejected_total{")]
    assert line and float(line[0].rsplit(" ", 1)[1]) == 1.0, line


def test_too_many_logit_bias_entries_is_a_400(tokenizer):
    """OpenAI's cap of 300 entries (the sampler's table has a fixed width)."""
    app = create_app(FakeEngine(tokenizer), ServerConfig())
    bias = {str(t): 1.0 for t in range(301)}
    status, body = _post(app, "/v1/completions", {"prompt": "hi", "max_tokens": 2,
                                                  "logit_bias": bias})
    assert status == 400 and "at most 300" in body["error"]["message"], body
    status, _ = _post(app, "/v1/completions", {"prompt": "hi", "max_tokens": 2,
                                               "logit_bias": dict(list(bias.items())[:300])})
    assert status == 200
