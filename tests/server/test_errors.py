"""Malformed requests, auth, unknown models and request ids: status + OpenAI error shape."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.server.conftest import backend_params, launch

KEY = "sk-test-key-123"
LONG = "hello " * 600  # > 512 tokens

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module", params=backend_params())
def server(request):
    with launch(request.param, ["--api-key", KEY, "--enable-request-id-headers",
                                "--served-model-name", "tiny", "other-name"]) as s:
        yield s


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=120) as c:
        yield c


C, CH = "/v1/completions", "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]

# (name, method, path, body (dict -> JSON, str/bytes -> raw), status, param or None)
CASES = [
    ("malformed json", "POST", C, '{"prompt": "x",', 400, None),
    ("json array body", "POST", C, "[1, 2]", 400, None),
    ("json string body", "POST", C, '"prompt"', 400, None),
    ("empty body", "POST", C, "", 400, None),
    ("missing prompt", "POST", C, {"max_tokens": 3}, 400, "prompt"),
    ("missing messages", "POST", CH, {"max_tokens": 3}, 400, "messages"),
    ("prompt is a number", "POST", C, {"prompt": 12.5}, 400, "prompt"),
    ("max_tokens not int", "POST", C, {"prompt": "x", "max_tokens": "abc"}, 400, "max_tokens"),
    ("max_tokens negative", "POST", C, {"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ("max_tokens beyond context", "POST", C, {"prompt": "x", "max_tokens": 100000}, 400,
     "max_tokens"),
    ("max_tokens beyond int64", "POST", C, {"prompt": "x", "max_tokens": 2**70}, 400, None),
    ("prompt beyond context", "POST", C, {"prompt": LONG, "max_tokens": 4}, 400, "prompt"),
    ("chat beyond context", "POST", CH, {"messages": [{"role": "user", "content": LONG}]}, 400,
     "messages"),
    ("n zero", "POST", C, {"prompt": "x", "n": 0}, 400, "n"),
    ("n huge", "POST", C, {"prompt": "x", "n": 10**6}, 400, "n"),
    ("temperature negative", "POST", C, {"prompt": "x", "temperature": -1}, 400, "temperature"),
    ("top_p zero", "POST", C, {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("top_k negative", "POST", C, {"prompt": "x", "top_k": -5}, 400, "top_k"),
    ("min_p above one", "POST", C, {"prompt": "x", "min_p": 1.5}, 400, "min_p"),
    ("presence_penalty big", "POST", C, {"prompt": "x", "presence_penalty": 5}, 400,
     "presence_penalty"),
    ("repetition_penalty zero", "POST", C, {"prompt": "x", "repetition_penalty": 0}, 400,
     "repetition_penalty"),
    ("logprobs too many", "POST", C, {"prompt": "x", "logprobs": 100}, 400, "logprobs"),
    ("min_tokens above max", "POST", C, {"prompt": "x", "max_tokens": 2, "min_tokens": 5}, 400,
     "min_tokens"),
    ("suffix", "POST", C, {"prompt": "x", "suffix": "y"}, 400, "suffix"),
    ("seed beyond int64", "POST", C, {"prompt": "x", "seed": 2**70}, 400, "seed"),
    ("stop_token_ids negative", "POST", C, {"prompt": "x", "stop_token_ids": [-3]}, 400,
     "stop_token_ids"),
    ("logit_bias bad key", "POST", C, {"prompt": "x", "logit_bias": {"abc": 1}}, 400,
     "logit_bias"),
    ("logit_bias out of range", "POST", C, {"prompt": "x", "logit_bias": {"5": 500}}, 400,
     "logit_bias"),
    ("prompt ids out of vocab", "POST", C, {"prompt": [1, 99999999]}, 400, "prompt"),
    ("empty prompt list", "POST", C, {"prompt": []}, 400, "prompt"),
    ("allowed_token_ids empty", "POST", C, {"prompt": "x", "allowed_token_ids": []}, 400,
     "allowed_token_ids"),
    ("guided_json bad schema", "POST", C, {"prompt": "x", "guided_json": {"type": "nope"}},
     400, "guided_json"),
    ("guided_regex bad pattern", "POST", C, {"prompt": "x", "guided_regex": "(a"}, 400,
     "guided_regex"),
    ("two guides", "POST", C, {"prompt": "x", "guided_regex": "a", "guided_choice": ["a"]},
     400, "guided_choice"),
    ("response_format schema missing", "POST", CH, {
        "messages": MSG, "response_format": {"type": "json_schema"}}, 400, "response_format"),
    ("response_format unknown type", "POST", CH, {
        "messages": MSG, "response_format": {"type": "yaml"}}, 400, "response_format"),
    ("priority", "POST", C, {"prompt": "x", "priority": 3}, 400, "priority"),
    ("stream best_of", "POST", C, {"prompt": "x", "stream": True, "best_of": 3}, 400, "best_of"),
    ("stream_options wrong type", "POST", C, {"prompt": "x", "stream_options": 5}, 400,
     "stream_options"),
    ("empty messages", "POST", CH, {"messages": []}, 400, "messages"),
    ("messages not a list", "POST", CH, {"messages": 5}, 400, "messages"),
    ("message without role", "POST", CH, {"messages": [{"content": "hi"}]}, 400, "messages"),
    ("image part", "POST", CH, {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, 400, "messages"),
    ("top_logprobs without logprobs", "POST", CH, {"messages": MSG, "top_logprobs": 3}, 400,
     "top_logprobs"),
    ("continue + generation prompt", "POST", CH,
     {"messages": MSG + [{"role": "assistant", "content": "x"}],
      "continue_final_message": True}, 400, "continue_final_message"),
    ("tool_choice required without tools", "POST", CH,
     {"messages": MSG, "tool_choice": "required"}, 400, "tool_choice"),
    ("tool_choice unknown function", "POST", CH, {
        "messages": MSG, "tools": [{"type": "function", "function": {"name": "f"}}],
        "tool_choice": {"type": "function", "function": {"name": "g"}}}, 400, "tool_choice"),
    ("unknown model", "POST", C, {"model": "gpt-9", "prompt": "x"}, 404, "model"),
    ("unknown model chat", "POST", CH, {"model": "gpt-9", "messages": MSG}, 404, "model"),
    ("tokenize neither field", "POST", "/tokenize", {"add_special_tokens": True}, 400, "prompt"),
    ("detokenize strings", "POST", "/detokenize", {"tokens": ["a"]}, 400, "tokens"),
    ("detokenize out of vocab", "POST", "/detokenize", {"tokens": [10**9]}, 400, "tokens"),
    ("unknown route", "GET", "/v1/nope", None, 404, None),
    ("wrong method", "GET", C, None, 405, None),
    ("wrong method chat", "PUT", CH, None, 405, None),
]


def _check_error(resp: httpx.Response, status: int, param=None) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    assert err["code"] == status
    if param is not None:
        assert err["param"] == param, err
    return err


@pytest.mark.parametrize("name,method,path,body,status,param", CASES, ids=[c[0] for c in CASES])
def test_error_table(http, name, method, path, body, status, param):
    if isinstance(body, (str, bytes)):
        resp = http.request(method, path, content=body,
                            headers={"Content-Type": "application/json"})
    else:
        resp = http.request(method, path, json=body)
    err = _check_error(resp, status, param)
    if "context" in name:
        assert "maximum context length is 512 tokens" in err["message"]


def test_context_length_message_has_both_lengths(http):
    err = _check_error(http.post(C, json={"prompt": "hello", "max_tokens": 600}), 400)
    assert "512" in err["message"] and "600" in err["message"]


def test_api_key(server, http):
    assert httpx.post(f"{server.url}{C}", json={"prompt": "x"}).status_code == 401
    _check_error(httpx.post(f"{server.url}{C}", json={"prompt": "x"},
                            headers={"Authorization": "Bearer wrong"}), 401)
    _check_error(httpx.get(f"{server.url}/v1/models"), 401)
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/metrics").status_code == 200
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    good = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in good.models.list().data] == ["tiny", "other-name"]


def test_openai_client_errors(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError) as exc:
        client.completions.create(model="missing", prompt="x", max_tokens=1)
    assert "missing" in exc.value.message
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model="tiny", prompt="x", max_tokens=1, temperature=-2)
    assert exc.value.body["param"] == "temperature"
    r = client.completions.create(model="other-name", prompt="x", max_tokens=1)
    assert r.model == "tiny"


def test_request_id_header(http):
    r = http.post(C, json={"prompt": "x", "max_tokens": 1}, headers={"X-Request-Id": "abc-123"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "abc-123"
    assert r.json()["id"] == "cmpl-abc-123"
    with http.stream("POST", CH, json={"messages": MSG, "max_tokens": 2, "stream": True},
                     headers={"X-Request-Id": "stream-7"}) as s:
        assert s.headers["x-request-id"] == "stream-7"
        s.read()


def test_sse_format(http):
    with http.stream("POST", C, json={"prompt": "Hi", "max_tokens": 3, "stream": True,
                                      "ignore_eos": True,
                                      "stream_options": {"include_usage": True}}) as s:
        assert s.status_code == 200
        assert s.headers["content-type"].startswith("text/event-stream")
        raw = s.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    import json
    chunks = [json.loads(e[len("data: "):]) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]][-1] == "length"
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    with http.stream("POST", CH, json={"messages": MSG, "max_tokens": 3, "stream": True,
                                       "ignore_eos": True}) as s:
        raw = s.read().decode()
    chunks = [json.loads(e[6:]) for e in raw.split("\n\n") if e and e != "data: [DONE]"]
    assert raw.endswith("data: [DONE]\n\n")
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:])
    assert all(c["object"] == "chat.completion.chunk" and "created" in c for c in chunks)
