"""Many clients at once: concurrent streams, disconnects that must free KV pages,
and greedy outputs that do not depend on what else is in the batch."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

from tests.server.conftest import backend_params, launch

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module", params=backend_params())
def server(request):
    with launch(request.param) as s:
        yield s


def _aclient(server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0,
                              timeout=600)


def _wait_idle(server, timeout: float = 30.0) -> tuple[float, float, float]:
    deadline = time.monotonic() + timeout
    while True:
        running = server.metric("vllm:num_requests_running")
        free = server.metric("jax_serve:num_free_pages")
        total = server.metric("jax_serve:num_total_pages")
        if (running == 0 and free == total) or time.monotonic() > deadline:
            return running, free, total
        time.sleep(0.25)


def test_32_concurrent_streams(server):
    async def one(client, i: int):
        max_tokens = 4 + i % 8
        stream = await client.completions.create(
            model=None, prompt=f"Request number {i}:", max_tokens=max_tokens, temperature=0.7,
            seed=i, stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True})
        finish, usage, text = None, None, ""
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage:
                usage = chunk.usage
        return max_tokens, finish, usage, text

    async def run():
        client = _aclient(server)
        try:
            return await asyncio.gather(*(one(client, i) for i in range(32)))
        finally:
            await client.close()

    for max_tokens, finish, usage, text in asyncio.run(run()):
        assert finish == "length"
        assert usage.completion_tokens == max_tokens
    running, free, total = _wait_idle(server)
    assert running == 0 and free == total


def test_disconnects_free_every_page(server):
    gen_before = server.metric("vllm:generation_tokens_total")
    long_tokens = 400

    async def disconnect(http: httpx.AsyncClient, i: int) -> int:
        body = {"prompt": f"Disconnecting client {i}", "max_tokens": long_tokens,
                "ignore_eos": True, "stream": True}
        seen = 0
        async with http.stream("POST", "/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            async for line in resp.aiter_lines():
                if line.startswith("data: {"):
                    seen += 1
                    if seen >= 2:
                        break  # leaving the block closes the connection mid-stream
        return seen

    async def finisher(client, i: int):
        r = await client.chat.completions.create(
            model=None, messages=[{"role": "user", "content": f"Count to {i}"}], max_tokens=6,
            temperature=0, extra_body={"ignore_eos": True})
        return r.usage.completion_tokens

    async def run():
        client = _aclient(server)
        async with httpx.AsyncClient(base_url=server.url, timeout=600) as http:
            results = await asyncio.gather(*(disconnect(http, i) for i in range(8)),
                                           *(finisher(client, i) for i in range(8)))
        await client.close()
        return results

    results = asyncio.run(run())
    assert all(seen >= 2 for seen in results[:8])
    assert results[8:] == [6] * 8
    running, free, total = _wait_idle(server)
    assert running == 0, "aborted requests are still running"
    assert free == total, f"{total - free} KV pages still held after every client left"
    generated = server.metric("vllm:generation_tokens_total") - gen_before
    assert generated < 8 * long_tokens / 2, f"aborted streams kept generating ({generated} tokens)"


def test_greedy_same_alone_and_in_a_crowd(server):
    prompt = "The three primary colors are"

    async def ask(client, p: str) -> str:
        r = await client.completions.create(model=None, prompt=p, max_tokens=12, temperature=0,
                                            extra_body={"ignore_eos": True})
        return r.choices[0].text

    async def run():
        client = _aclient(server)
        alone = [await ask(client, prompt) for _ in range(2)]
        others = [f"Story {i}: once upon a time" + " there" * i for i in range(15)]
        crowd = await asyncio.gather(*(ask(client, p) for p in others[:7]), ask(client, prompt),
                                     *(ask(client, p) for p in others[7:]))
        await client.close()
        return alone, crowd[7]

    alone, in_crowd = asyncio.run(run())
    assert alone[0] == alone[1]
    assert in_crowd == alone[0]
