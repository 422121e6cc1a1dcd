"""After start-up, no request makes jax build a program.

A real server (SmolLM2, the small test settings) reports its start-up in
``/get_server_info``'s ``startup``; then one mixed workload runs at once —
greedy, sampled with every sampling parameter, logprobs up to the maximum,
prompt logprobs, n > 1, guided JSON, a prompt long enough to be chunked, chat
and completions side by side — and the server must have traced nothing new
(``compiles_after_ready`` counts jax's trace events after ready).
"""

from __future__ import annotations

import concurrent.futures
import json

import httpx
import pytest

from tests.server.native_launch import launch

pytestmark = pytest.mark.slow

LONG = "The history of the Roman Empire spans many centuries. " * 40  # > one chunk


def _requests(model: str) -> list[tuple[str, dict]]:
    comp = "/v1/completions"
    chat = "/v1/chat/completions"
    sampled = dict(temperature=0.7, top_p=0.9, top_k=40, min_p=0.05, seed=7,
                   presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.2,
                   logit_bias={"42": 5.0, "100": -100}, min_tokens=3, stop=["\n\n"],
                   bad_words=["Rome"])
    return [
        (comp, dict(prompt="Hello, my name is", max_tokens=12, temperature=0)),
        (comp, dict(prompt="Once upon a time", max_tokens=12, **sampled)),
        (comp, dict(prompt="The capital of France is", max_tokens=6, temperature=0.8,
                    logprobs=5)),
        (comp, dict(prompt="List three colors:", max_tokens=6, temperature=0,
                    prompt_logprobs=3, logprobs=20)),
        (comp, dict(prompt="A short poem:", max_tokens=8, n=3, temperature=1.0)),
        (comp, dict(prompt="Numbers:", max_tokens=8, temperature=0.5,
                    allowed_token_ids=[16, 17, 18, 19, 20, 28])),
        (comp, dict(prompt=LONG, max_tokens=8, temperature=0)),
        (chat, dict(messages=[{"role": "user", "content": "Give me a JSON object."}],
                    max_tokens=60, temperature=0,
                    response_format={"type": "json_schema", "json_schema": {
                        "name": "x", "schema": {"type": "object",
                                                "properties": {"a": {"type": "integer"}},
                                                "required": ["a"]}}})),
        (chat, dict(messages=[{"role": "user", "content": "Say hi."}], max_tokens=8,
                    temperature=0.9, top_p=0.5, logprobs=True, top_logprobs=3)),
        (chat, dict(messages=[{"role": "user", "content": "Count to five."}],
                    max_tokens=10, temperature=0, stream=True)),
    ]


def _send(url: str, path: str, body: dict) -> tuple[int, str]:
    with httpx.Client(base_url=url, timeout=300) as c:
        if body.get("stream"):
            with c.stream("POST", path, json=body) as r:
                return r.status_code, "".join(r.iter_text())
        r = c.post(path, json=body)
        return r.status_code, r.text


def test_mixed_workload_after_startup_compiles_nothing():
    with launch([]) as server:
        info = httpx.get(f"{server.url}/get_server_info", timeout=30).json()
        startup = info["startup"]
        assert startup["programs"] <= 16, startup
        assert startup["compiles_after_ready"] == 0, startup
        for key in ("load_s", "tokenizer_s", "trace_s", "compile_s", "ready_s"):
            assert startup[key] >= 0, startup
        model = httpx.get(f"{server.url}/v1/models", timeout=30).json()["data"][0]["id"]
        reqs = [(path, dict(body, model=model)) for path, body in _requests(model)]
        for _ in range(2):  # all at once (mixed batches), then again
            with concurrent.futures.ThreadPoolExecutor(len(reqs)) as pool:
                results = list(pool.map(lambda r: _send(server.url, *r), reqs))
            for (path, body), (status, text) in zip(reqs, results):
                assert status == 200, (path, body, text[:500])
        guided = json.loads(results[7][1])["choices"][0]["message"]["content"]
        assert isinstance(json.loads(guided)["a"], int)
        after = httpx.get(f"{server.url}/get_server_info", timeout=30).json()["startup"]
        assert after["compiles_after_ready"] == 0, server.log_tail()
