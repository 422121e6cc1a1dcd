"""Fast in-process tests of the HTTP layer (Quart test client over FakeEngine) and of
the command line: no subprocess, no model weights."""

from __future__ import annotations

import asyncio
import copy
import json

import pytest

from serving.api.app import create_app
from serving.config import ServerConfig
from serving.main import build_configs, build_parser, read_chat_template
from tests.server.fake_engine import FakeEngine, load_default_tokenizer

MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def tokenizer():
    return load_default_tokenizer()


def _call(app, method: str, path: str, body=None, headers=None):
    async def go():
        client = app.test_client()
        resp = await client.open(path, method=method, json=body, headers=headers or {})
        return resp.status_code, await resp.get_data(as_text=True), resp.headers
    return asyncio.run(go())


def test_no_chat_template_is_a_clear_400(tokenizer):
    bare = copy.copy(tokenizer)
    bare.chat_template = None
    app = create_app(FakeEngine(bare), ServerConfig())
    status, body, _ = _call(app, "POST", "/v1/chat/completions", {"messages": MSG})
    assert status == 400 and "--chat-template" in json.loads(body)["error"]["message"]
    template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    app = create_app(FakeEngine(bare), ServerConfig(chat_template=template))
    status, body, _ = _call(app, "POST", "/tokenize", {"messages": MSG})
    assert status == 200
    ids = json.loads(body)["tokens"]
    assert bare.decode(ids) == "<user>hi<assistant>"
    status, _, _ = _call(app, "POST", "/v1/chat/completions", {"messages": MSG, "max_tokens": 2})
    assert status == 200


def test_not_ready_is_503(tokenizer):
    engine = FakeEngine(tokenizer)
    engine._ready = False
    app = create_app(engine, ServerConfig())
    status, body, _ = _call(app, "GET", "/health")
    assert status == 503
    status, body, _ = _call(app, "POST", "/v1/completions", {"prompt": "x"})
    assert status == 503 and json.loads(body)["error"]["code"] == 503


def test_chat_stream_n2_and_completion_indices(tokenizer):
    app = create_app(FakeEngine(tokenizer), ServerConfig())
    status, body, headers = _call(app, "POST", "/v1/chat/completions",
                                  {"messages": MSG, "n": 2, "max_tokens": 3, "stream": True,
                                   "ignore_eos": True, "temperature": 1.0, "seed": 3})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    chunks = [json.loads(e[6:]) for e in body.split("\n\n") if e.startswith("data: {")]
    roles = [c["choices"][0]["index"] for c in chunks if "role" in c["choices"][0]["delta"]]
    assert roles == [0, 1]
    finished = sorted(c["choices"][0]["index"] for c in chunks if c["choices"][0]["finish_reason"])
    assert finished == [0, 1]
    status, body, _ = _call(app, "POST", "/v1/completions",
                            {"prompt": ["a", "b", "c"], "n": 2, "max_tokens": 2,
                             "stream": True, "ignore_eos": True})
    chunks = [json.loads(e[6:]) for e in body.split("\n\n") if e.startswith("data: {")]
    assert sorted({c["choices"][0]["index"] for c in chunks}) == [0, 1, 2, 3, 4, 5]


def test_two_apps_have_separate_metrics(tokenizer):
    a = create_app(FakeEngine(tokenizer), ServerConfig(served_model_names=("a",)))
    b = create_app(FakeEngine(tokenizer), ServerConfig(served_model_names=("b",)))
    assert _call(a, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 2})[0] == 200
    text_a = _call(a, "GET", "/metrics")[1]
    text_b = _call(b, "GET", "/metrics")[1]
    assert 'vllm:request_success_total{engine="0",finished_reason="length",model_name="a"} 1.0' \
        in text_a
    assert "finished_reason=" not in text_b


def test_openapi_lists_routes(tokenizer):
    app = create_app(FakeEngine(tokenizer), ServerConfig())
    doc = json.loads(_call(app, "GET", "/openapi.json")[1])
    assert {"/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize",
            "/v1/models"} <= set(doc["paths"])
    props = doc["components"]["schemas"]["CompletionRequest"]["properties"]
    assert {"top_k", "min_p", "ignore_eos", "stream_options", "return_tokens_as_token_ids"} \
        <= set(props)


def test_flags_vllm_and_sglang_spellings(tmp_path):
    ap = build_parser()
    e, s = build_configs(ap.parse_args([]))
    assert s.host is None and s.port == 8000 and s.served_model_names
    assert e.model is None and e.enable_prefix_caching
    e, s = build_configs(ap.parse_args([
        "--model-path", "/m", "--tp-size", "1", "--context-length", "256", "--page-size", "32",
        "--mem-fraction-static", "0.5", "--disable-radix-cache", "--served-model-name", "x", "y",
        "--api-key", "k", "--num-gpu-blocks-override", "100", "--max-num-seqs", "8",
        "--disable-precompile", "--decode-buckets", "1,8"]))
    assert (e.model, e.max_model_len, e.page_size, e.gpu_memory_utilization) == ("/m", 256, 32, 0.5)
    assert not e.enable_prefix_caching and not e.precompile and e.num_pages == 100
    assert e.decode_buckets == (1, 8) and e.max_num_seqs == 8
    assert s.served_model_names == ("x", "y") and s.api_key == "k"
    e, _ = build_configs(ap.parse_args(["--no-enable-prefix-caching"]))
    assert not e.enable_prefix_caching
    path = tmp_path / "t.jinja"
    path.write_text("{{ messages[0].content }}")
    assert read_chat_template(str(path)) == "{{ messages[0].content }}"
    assert read_chat_template("{% if x %}y{% endif %}") == "{% if x %}y{% endif %}"
    with pytest.raises(ValueError):
        read_chat_template("/no/such/file.jinja")


def test_api_key_from_env(monkeypatch):
    monkeypatch.setenv("JAX_SERVE_API_KEY", "env-key")
    _, s = build_configs(build_parser().parse_args([]))
    assert s.api_key == "env-key"


def test_admin_routes_need_the_admin_key(tokenizer, monkeypatch):
    """--admin-api-key guards the admin routes (401 in the OpenAI shape, the
    inference key is not enough); inference routes keep --api-key."""
    app = create_app(FakeEngine(tokenizer), ServerConfig(api_key="user", admin_api_key="root"))
    user, root = {"Authorization": "Bearer user"}, {"Authorization": "Bearer root"}
    body = {"prompt": "hi", "max_tokens": 2}
    assert _call(app, "POST", "/v1/completions", body, user)[0] == 200
    assert _call(app, "POST", "/v1/completions", body, root)[0] == 401
    for method, path, payload in (("POST", "/flush_cache", None), ("POST", "/abort_request", {}),
                                  ("POST", "/set_log_level", {"log_level": "INFO"}),
                                  ("POST", "/update_weights_from_disk", {"model_path": "/x"})):
        status, text, headers = _call(app, method, path, payload, user)
        err = json.loads(text)["error"]
        assert status == 401 and "admin API key" in err["message"], (path, text)
        assert headers["WWW-Authenticate"] == "Bearer"
        assert _call(app, method, path, payload, root)[0] != 401, path
    assert _call(app, "GET", "/health", None, {})[0] == 200  # open routes stay open
    # without an admin key the admin routes take the API key, as before
    app = create_app(FakeEngine(tokenizer), ServerConfig(api_key="user"))
    assert _call(app, "POST", "/flush_cache", None, user)[0] == 200
    assert _call(app, "POST", "/flush_cache", None, {})[0] == 401
    monkeypatch.setenv("JAX_SERVE_ADMIN_API_KEY", "from-env")
    _, server_config = build_configs(build_parser().parse_args([]))
    assert server_config.admin_api_key == "from-env"
    _, server_config = build_configs(build_parser().parse_args(["--admin-api-key", "k"]))
    assert server_config.admin_api_key == "k"
