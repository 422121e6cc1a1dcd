"""Native behaviours as the upstream projects serve them, through a real server.

Each test names the upstream behaviour it pins (``/tmp`` research notes were
made from LMDeploy, RTP-LLM, SGLang and vLLM sources): LMDeploy's
``session_id`` and ``/abort_request``, ``return_token_ids``, ``messages`` as a
string, LMDeploy ``/generate`` checks, stream framing and error shape; RTP-LLM's
health routes, error shape, stream framing, ``/tokenizer/encode`` and
``/chat/render``; vLLM's ``bad_words``, per-choice finish in an ``n=2`` stream,
unknown chat roles.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from tests.server.native_launch import assert_json_error, client, server  # noqa: F401

pytestmark = pytest.mark.slow
PROMPT = "The capital of France is"


def _events(resp: httpx.Response, prefix: str = "data: ") -> list[str]:
    return [line[len(prefix):] for line in resp.iter_lines() if line.startswith(prefix)]


def test_lmdeploy_session_id_stops_an_openai_stream(client, server):
    """LMDeploy: a stream started with ``session_id`` is stopped by
    ``/abort_request {"session_id"}``; a running session cannot be reused."""
    body = {"prompt": PROMPT, "max_tokens": 400, "temperature": 0, "ignore_eos": True,
            "stream": True, "session_id": 4242}
    seen: dict = {}

    def consume():
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=300) as r:
            seen["events"] = _events(r)

    t = threading.Thread(target=consume)
    t.start()
    time.sleep(1.5)  # the request is running
    busy = client.post("/v1/completions", json={**body, "stream": False, "max_tokens": 2})
    assert "The session_id 4242 is occupied." in assert_json_error(busy)["message"]
    stop = client.post("/abort_request", json={"session_id": 4242})
    assert stop.status_code == 200 and stop.content == b"", stop.text
    t.join(timeout=120)
    events = seen["events"]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == "abort" and sum(len(c["choices"][0]["text"]) for c in chunks) > 0
    assert len(chunks) < 400  # stopped early


def test_return_token_ids_completions_and_chat(client):
    """vLLM's ``prompt_token_ids``/``token_ids`` (per chunk when streaming, the
    prompt's in the first chunk) and LMDeploy's chat ``output_ids``."""
    req = {"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "return_token_ids": True}
    whole = client.post("/v1/completions", json=req).json()["choices"][0]
    prompt_ids = client.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    assert whole["prompt_token_ids"] == prompt_ids and len(whole["token_ids"]) == 6
    with client.stream("POST", "/v1/completions", json={**req, "stream": True}) as r:
        chunks = [json.loads(e) for e in _events(r)[:-1]]
    assert chunks[0]["choices"][0]["prompt_token_ids"] == prompt_ids
    assert all("prompt_token_ids" not in c["choices"][0] for c in chunks[1:])
    assert [t for c in chunks for t in c["choices"][0]["token_ids"]] == whole["token_ids"]
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
            "temperature": 0, "return_token_ids": True}
    out = client.post("/v1/chat/completions", json=chat).json()
    choice = out["choices"][0]
    assert choice["token_ids"] == choice["output_ids"] and len(choice["token_ids"]) == 5
    assert out["prompt_token_ids"]
    with client.stream("POST", "/v1/chat/completions", json={**chat, "stream": True}) as r:
        chunks = [json.loads(e) for e in _events(r)[:-1]]
    assert chunks[0]["prompt_token_ids"] == out["prompt_token_ids"]
    streamed = [t for c in chunks[1:] for t in c["choices"][0].get("output_ids", [])]
    assert streamed == choice["token_ids"]


def test_lmdeploy_messages_string_is_the_raw_prompt(client):
    """LMDeploy: ``messages`` as a string is the prompt itself, no chat template."""
    chat = client.post("/v1/chat/completions", json={
        "messages": PROMPT, "max_tokens": 6, "temperature": 0}).json()
    comp = client.post("/v1/completions", json={
        "prompt": PROMPT, "max_tokens": 6, "temperature": 0}).json()
    assert chat["choices"][0]["message"]["content"] == comp["choices"][0]["text"]
    assert chat["usage"]["prompt_tokens"] == comp["usage"]["prompt_tokens"]


@pytest.mark.parametrize("body,message", [
    ({"prompt": "a", "top_k": -1}, "The top_k -1 cannot be a negative integer."),
    ({"prompt": "a", "temperature": 3.0}, "The temperature 3.0 must be in [0, 2]"),
    ({"prompt": "a", "max_tokens": 0}, "The max_tokens 0 must be a positive integer."),
    ({"prompt": "a", "top_p": 0}, "The top_p 0.0 must be in (0, 1]."),
    ({"prompt": "", "max_tokens": 3}, "The prompt must not be an empty string"),
    ({"prompt": "a", "input_ids": [1], "max_tokens": 3},
     "You must specify exactly one of prompt or input_ids"),
])
def test_lmdeploy_generate_checks_and_error_shape(client, body, message):
    """LMDeploy's ``check_request`` messages, in its flat ErrorResponse."""
    resp = client.post("/generate", json=body)
    err = assert_json_error(resp)
    assert resp.json()["object"] == "error" and err["message"] == message
    assert err["type"] == "invalid_request_error" and err["code"] == 400


def test_lmdeploy_generate_stream_ends_with_done(client):
    body = {"prompt": PROMPT, "max_tokens": 4, "temperature": 0, "stream": True}
    with client.stream("POST", "/generate", json=body) as r:
        events = _events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(set(c["meta_info"]) >= {"prompt_tokens", "completion_tokens", "finish_reason",
                                       "output_token_logprobs", "routed_experts"}
               for c in chunks)
    assert [c["meta_info"]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "length"


def test_rtp_health_errors_and_stream_framing(client):
    """RTP-LLM: ``GET /`` and ``POST /health`` answer ``"ok"``; errors are
    ``{error_code, error_code_str, message}``; streams are ``data:{json}\\r\\n\\r\\n``
    ending with ``data:[done]``."""
    assert client.get("/").json() == "ok" and client.post("/health").json() == "ok"
    assert client.get("/health").status_code == 200  # vLLM's GET /health is unchanged
    err = assert_json_error(client.post("/", json={"prompt": 3}))
    assert err["error_code"] == 605 and err["error_code_str"] == "605_INVALID_PARAMS"
    body = {"prompt": PROMPT, "generate_config": {"max_new_tokens": 3, "temperature": 0,
                                                  "yield_generator": True}}
    with client.stream("POST", "/", json=body) as r:
        raw = r.read().decode()
    events = raw.split("\r\n\r\n")
    assert events[-1] == "" and events[-2] == "data:[done]"
    chunks = [json.loads(e[len("data:"):]) for e in events[:-2]]
    assert all(e.startswith("data:{") for e in events[:-2]) and chunks[-1]["finished"] is True
    assert chunks[-1]["aux_info"]["output_len"] == 3


def test_rtp_tokenizer_encode_and_chat_render_keys(client):
    enc = client.post("/tokenizer/encode", json={"prompt": "hello world"}).json()
    assert set(enc) == {"token_ids", "tokens", "error"} and enc["error"] == ""
    assert "".join(enc["tokens"]) == "hello world"  # decoded pieces, not BPE symbols
    off = client.post("/tokenizer/encode", json={"prompt": "hello world",
                                                 "return_offsets_mapping": True}).json()
    assert off["token_ids"] == enc["token_ids"] and off["tokens"] == []
    assert len(off["offset_mapping"]) == len(enc["token_ids"])
    render = client.post("/chat/render", json={
        "messages": [{"role": "user", "content": "hello?"}]}).json()
    assert {"input_prompt", "input_ids", "input_urls", "max_seq_len", "eos_token_id",
            "renderer_info", "output_ids"} <= set(render)
    assert "hello?" in render["input_prompt"]
    tok = client.post("/tokenize", json={"prompt": render["input_prompt"],
                                         "add_special_tokens": False}).json()
    assert tok["tokens"] == render["input_ids"]


def test_vllm_bad_words_are_never_generated(client):
    """vLLM's ``bad_words``: the greedy continuation's first word, banned, is not
    produced (alone or after a space) and the output changes."""
    req = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    free = client.post("/v1/completions", json=req).json()["choices"][0]["text"]
    word = free.split()[0]
    banned = client.post("/v1/completions", json={**req, "bad_words": [word]}).json()
    text = banned["choices"][0]["text"]
    assert text != free and word not in text.split(), (free, text)
    assert_json_error(client.post("/v1/completions", json={**req, "bad_words": [""]}))


def test_completion_stream_n2_reports_each_finish_once(client):
    """vLLM: each choice of an ``n=2`` stream gets exactly one finish chunk."""
    body = {"prompt": PROMPT, "max_tokens": 5, "n": 2, "temperature": 0.8, "seed": 3,
            "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as r:
        chunks = [json.loads(e) for e in _events(r)[:-1]]
    finishes = [(c["choices"][0]["index"], c["choices"][0]["finish_reason"])
                for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert sorted(finishes) == [(0, "length"), (1, "length")]


def test_unknown_chat_role_is_a_400(client):
    resp = client.post("/v1/chat/completions", json={
        "messages": [{"role": "wizard", "content": "hi"}], "max_tokens": 2})
    err = assert_json_error(resp)
    assert err["code"] == 400 and "wizard" in err["message"] and err["param"] == "messages"
