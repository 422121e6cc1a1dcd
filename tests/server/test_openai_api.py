"""The OpenAI API driven by the official ``openai`` client against a running server."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from tests.server.conftest import backend_params, launch

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module", params=backend_params())
def server(request):
    with launch(request.param) as s:
        yield s


def _count(server, text: str) -> int:
    return httpx.post(f"{server.url}/tokenize", json={"prompt": text}).json()["count"]


def test_models(client, server):
    models = client.models.list().data
    assert len(models) == 1 and models[0].object == "model"
    assert models[0].max_model_len == 512


def test_completion_str_prompt_usage(client, model, server):
    r = client.completions.create(model=model, prompt="The capital of France is", max_tokens=5,
                                  temperature=0, extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert len(r.choices) == 1 and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5
    assert r.usage.prompt_tokens == _count(server, "The capital of France is")
    assert r.usage.total_tokens == r.usage.prompt_tokens + 5


def test_completion_prompt_forms_and_n(client, model, server):
    ids = httpx.post(f"{server.url}/tokenize", json={"prompt": "Once upon a time"}).json()["tokens"]
    by_text = client.completions.create(model=model, prompt="Once upon a time", max_tokens=4,
                                        temperature=0)
    by_ids = client.completions.create(model=model, prompt=ids, max_tokens=4, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    batch = client.completions.create(model=model, prompt=["Hello", "Goodbye"], max_tokens=3,
                                      n=2, temperature=0.8, seed=1,
                                      extra_body={"ignore_eos": True})
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert batch.usage.completion_tokens == 12
    id_batch = client.completions.create(model=model, prompt=[ids, ids[:2]], max_tokens=2,
                                         temperature=0, extra_body={"ignore_eos": True})
    assert len(id_batch.choices) == 2 and id_batch.usage.prompt_tokens == len(ids) + 2
    assert id_batch.choices[0].text == by_text.choices[0].text[:len(id_batch.choices[0].text)]


def test_completion_echo_and_logprobs(client, model):
    r = client.completions.create(model=model, prompt="Hello world", max_tokens=3, echo=True,
                                  temperature=0, logprobs=2, extra_body={"ignore_eos": True})
    c = r.choices[0]
    assert c.text.startswith("Hello world")
    lp = c.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert lp.token_logprobs[0] is None  # the first prompt token has no logprob
    assert all(x <= 0 for x in lp.token_logprobs[1:])
    assert all(len(t) >= 1 for t in lp.top_logprobs[-3:])
    plain = client.completions.create(model=model, prompt="Hello world", max_tokens=3,
                                      temperature=0, logprobs=1, extra_body={"ignore_eos": True})
    assert len(plain.choices[0].logprobs.tokens) == 3
    assert "".join(plain.choices[0].logprobs.tokens) == plain.choices[0].text


def test_stop_string(client, model):
    base = client.completions.create(model=model, prompt="1, 2, 3, 4,", max_tokens=12,
                                     temperature=0, extra_body={"ignore_eos": True})
    text = base.choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    if not stop.strip():
        pytest.skip(f"no usable stop string in {text!r}")
    r = client.completions.create(model=model, prompt="1, 2, 3, 4,", max_tokens=12,
                                  temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert stop not in r.choices[0].text
    assert text.startswith(r.choices[0].text)


def test_seed_and_greedy_determinism(client, model):
    kw = dict(model=model, prompt="Write a word:", max_tokens=8, extra_body={"ignore_eos": True})
    a = client.completions.create(temperature=1.0, seed=1234, **kw).choices[0].text
    b = client.completions.create(temperature=1.0, seed=1234, **kw).choices[0].text
    assert a == b
    g = [client.completions.create(temperature=0, **kw).choices[0].text for _ in range(2)]
    assert g[0] == g[1]


def test_completion_stream(client, model):
    stream = client.completions.create(model=model, prompt="Count: one, two,", max_tokens=6,
                                       temperature=0, stream=True,
                                       stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    full = client.completions.create(model=model, prompt="Count: one, two,", max_tokens=6,
                                     temperature=0, extra_body={"ignore_eos": True})
    assert text == full.choices[0].text


def test_chat(client, model):
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Say hi"}], max_completion_tokens=5,
        temperature=0, n=2, logprobs=True, top_logprobs=2)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert [c.index for c in r.choices] == [0, 1]
    for c in r.choices:
        assert c.message.role == "assistant" and isinstance(c.message.content, str)
        assert c.finish_reason in ("stop", "length")
        assert len(c.logprobs.content) >= 1
        assert all(len(t.top_logprobs) == 2 for t in c.logprobs.content)
    assert r.choices[0].message.content == r.choices[1].message.content  # greedy
    assert r.usage.completion_tokens == sum(len(c.logprobs.content) for c in r.choices)


def test_chat_content_parts_and_continue(client, model):
    parts = [{"type": "text", "text": "Say"}, {"type": "text", "text": "hi"}]
    r1 = client.chat.completions.create(model=model, messages=[{"role": "user", "content": parts}],
                                        max_tokens=4, temperature=0)
    r2 = client.chat.completions.create(model=model,
                                        messages=[{"role": "user", "content": "Say\nhi"}],
                                        max_tokens=4, temperature=0)
    assert r1.choices[0].message.content == r2.choices[0].message.content
    r3 = client.chat.completions.create(
        model=model, max_tokens=4, temperature=0,
        messages=[{"role": "user", "content": "Name a color."},
                  {"role": "assistant", "content": "The color is"}],
        extra_body={"continue_final_message": True, "add_generation_prompt": False,
                    "echo": True})
    assert r3.choices[0].message.content.startswith("The color is")


def test_chat_stream(client, model):
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=6,
        temperature=0, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes.count("length") == 1 and finishes[-1] == "length"
    assert chunks[-1].usage.completion_tokens == 6
    full = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=6,
        temperature=0, extra_body={"ignore_eos": True})
    assert content == full.choices[0].message.content


def test_async_client(server, model):
    async def run():
        aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0,
                                     timeout=300)
        comp = await aclient.completions.create(model=model, prompt="Hi", max_tokens=3,
                                                temperature=0, extra_body={"ignore_eos": True})
        stream = await aclient.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
            temperature=0, stream=True, extra_body={"ignore_eos": True})
        pieces = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        await aclient.close()
        return comp, pieces

    comp, pieces = asyncio.run(run())
    assert comp.usage.completion_tokens == 3
    assert len("".join(pieces)) > 0


def test_tokenize_roundtrip(server):
    text = "Hello, world! <|im_start|> ünïcode"
    tok = httpx.post(f"{server.url}/tokenize", json={"prompt": text}).json()
    assert tok["count"] == len(tok["tokens"]) and tok["max_model_len"] == 512
    det = httpx.post(f"{server.url}/detokenize", json={"tokens": tok["tokens"]}).json()
    assert det["prompt"] == det["text"] == text
    chat = httpx.post(f"{server.url}/tokenize",
                      json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["count"] > 1


def test_metrics_and_version(server):
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
                 "vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
                 "vllm:e2e_request_latency_seconds", "vllm:request_success_total"):
        assert name in text, name
    assert server.metric("vllm:generation_tokens_total") > 0
    assert httpx.get(f"{server.url}/version").json()["version"]
    doc = httpx.get(f"{server.url}/openapi.json").json()
    assert "/v1/chat/completions" in doc["paths"]
    assert "CompletionRequest" in doc["components"]["schemas"]
