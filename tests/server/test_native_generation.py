"""A real SmolLM2 server through the SGLang, LMDeploy and RTP-LLM native routes."""

from __future__ import annotations

import base64
import json
import os
import pickle
import time

import httpx
import pytest

from tests.server.native_launch import assert_json_error, client, server  # noqa: F401

pytestmark = pytest.mark.slow

GREEDY = {"text": "The capital of France is", "sampling_params": {"max_new_tokens": 6,
                                                                  "temperature": 0}}
MODEL_INFO_KEYS = {"model_path", "is_generation", "tokenizer_path", "preferred_sampling_params",
                   "weight_version", "has_image_understanding", "has_audio_understanding",
                   "model_type", "architectures"}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A converted (orbax) copy of the default model, and a tiny Llama of other shapes."""
    from model.default import default_model_path
    from tests.model.tiny_hf import save_hf_model
    from tools.convert_hf import convert

    root = tmp_path_factory.mktemp("weights")
    convert(str(default_model_path()), root / "smollm2-converted")
    save_hf_model("llama", root / "tiny-llama")
    return root / "smollm2-converted", root / "tiny-llama"


def _chunks(resp: httpx.Response) -> list[dict]:
    """The JSON events of a stream (its closing ``data: [DONE]`` left out)."""
    return [json.loads(line[6:]) for line in resp.iter_lines()
            if line.startswith("data: ") and line != "data: [DONE]"]


def _meta_ok(obj: dict) -> dict:
    assert {"text", "meta_info"} <= set(obj)
    meta = obj["meta_info"]
    assert {"id", "prompt_tokens", "completion_tokens", "finish_reason"} <= set(meta)
    assert meta["finish_reason"]["type"] in ("length", "stop", "abort")
    return meta


def test_sglang_generate(client):
    one = client.post("/generate", json={**GREEDY, "rid": "my-rid"}).json()
    meta = _meta_ok(one)
    assert meta["id"] == "my-rid" and meta["completion_tokens"] == 6
    assert meta["finish_reason"] == {"type": "length", "length": 6}
    again = client.post("/generate", json=GREEDY).json()
    assert again["text"] == one["text"]  # greedy is deterministic
    ids = client.post("/tokenize", json={"prompt": GREEDY["text"]}).json()["tokens"]
    by_ids = client.post("/generate", json={"input_ids": ids, "sampling_params":
                                            GREEDY["sampling_params"]}).json()
    assert by_ids["text"] == one["text"]
    batch = client.post("/generate", json={"text": [GREEDY["text"], "Hello"],
                                           "sampling_params": {"max_new_tokens": 3}}).json()
    assert isinstance(batch, list) and len(batch) == 2
    for b in batch:
        _meta_ok(b)
    lp = client.post("/generate", json={**GREEDY, "return_logprob": True,
                                        "top_logprobs_num": 2, "return_text_in_logprobs": True})
    meta = lp.json()["meta_info"]
    assert len(meta["output_token_logprobs"]) == 6
    logprob, tid, text = meta["output_token_logprobs"][0]
    assert logprob <= 0 and isinstance(tid, int) and isinstance(text, str)
    assert len(meta["output_top_logprobs"][0]) == 2


def test_sglang_generate_stream_and_stop(client):
    with client.stream("POST", "/generate", json={**GREEDY, "stream": True}) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "length"
    full = client.post("/generate", json=GREEDY).json()["text"]
    assert chunks[-1]["text"] == full  # SGLang streams the cumulative text
    word = full.split()[0] if full.split() else full[:1]
    stopped = client.post("/generate", json={"text": GREEDY["text"], "sampling_params": {
        "max_new_tokens": 6, "temperature": 0, "stop": [word]}}).json()
    assert stopped["meta_info"]["finish_reason"]["type"] == "stop"


def test_lmdeploy_generate(client):
    flat = client.post("/generate", json={"prompt": "The capital of France is", "max_tokens": 6,
                                          "temperature": 0, "session_id": 7}).json()
    meta = _meta_ok(flat)
    sgl = client.post("/generate", json=GREEDY).json()
    assert flat["text"] == sgl["text"] and meta["completion_tokens"] == 6
    with client.stream("POST", "/generate", json={"prompt": "Hello", "max_tokens": 4,
                                                  "temperature": 0, "stream": True}) as r:
        chunks = _chunks(r)
    whole = client.post("/generate", json={"prompt": "Hello", "max_tokens": 4,
                                           "temperature": 0}).json()["text"]
    assert "".join(c["text"] for c in chunks) == whole  # LMDeploy streams deltas
    gone = client.post("/abort_request", json={"session_id": 7})  # finished: LMDeploy's 400
    assert assert_json_error(gone)["message"] == "Session 7 not found."
    everything = client.post("/abort_request", json={"rid": "nothing", "abort_all": True})
    assert everything.status_code == 200 and everything.content == b""


def test_dialect_of_uses_fields_only_one_dialect_has():
    from serving.api.native_generate import dialect_of
    sgl = {"input_ids": [1, 2], "return_logprob": True, "top_logprobs_num": 2}
    assert dialect_of(sgl) == "sglang"  # return_logprob is SGLang's too
    assert dialect_of(sgl, "lmdeploy") == "sglang"  # top_logprobs_num decides, not the flag
    assert dialect_of({"input_ids": [1], "rid": "r", "logprob_start_len": 0}) == "sglang"
    assert dialect_of({"text": "hi", "max_tokens": 3}) == "sglang"
    lmd = {"input_ids": [1, 2], "max_tokens": 4, "return_logprob": True}
    assert dialect_of(lmd) == "lmdeploy" and dialect_of({"prompt": "hi"}) == "lmdeploy"
    assert dialect_of({"input_ids": [1], "session_id": 3}, "sglang") == "lmdeploy"
    shared = {"input_ids": [1, 2], "return_logprob": True, "stream": False}
    assert dialect_of(shared) == "sglang" and dialect_of(shared, "lmdeploy") == "lmdeploy"


def test_generate_logprob_shapes_per_dialect(client):
    ids = client.post("/tokenize", json={"prompt": GREEDY["text"]}).json()["tokens"]
    # SGLang: input_ids + return_logprob + top_logprobs_num -> triples and top lists
    sgl = client.post("/generate", json={"input_ids": ids, "return_logprob": True,
                                         "top_logprobs_num": 2}).json()["meta_info"]
    assert sgl["output_token_logprobs"] and len(sgl["output_top_logprobs"][0]) == 2
    logprob, tid, text = sgl["output_token_logprobs"][0]
    assert logprob <= 0 and isinstance(tid, int) and text is None
    # LMDeploy: GenerateReqMetaOutput's (logprob, token_id) pairs, no top lists
    for body in ({"prompt": GREEDY["text"]}, {"input_ids": ids}):
        out = client.post("/generate", json={**body, "max_tokens": 4, "temperature": 0,
                                             "return_logprob": True}).json()
        meta = out["meta_info"]
        pairs = meta["output_token_logprobs"]
        assert len(pairs) == 4 and all(len(p) == 2 for p in pairs), pairs
        assert [p[1] for p in pairs] == out["output_ids"]
        assert all(isinstance(p[0], float) and p[0] <= 0 for p in pairs)
        assert "output_top_logprobs" not in meta
    # an LMDeploy stream: each chunk carries its new ids and their pairs
    with client.stream("POST", "/generate", json={"input_ids": ids, "max_tokens": 4,
                                                  "temperature": 0, "return_logprob": True,
                                                  "stream": True}) as r:
        chunks = _chunks(r)
    got = [i for c in chunks for i in c["output_ids"]]
    pairs = [p for c in chunks for p in c["meta_info"].get("output_token_logprobs") or []]
    assert got == out["output_ids"] and [p[1] for p in pairs] == got


def test_abort_a_running_request(client):
    def start():
        return client.post("/generate", json={"text": "Count to one hundred:", "rid": "long-1",
                                              "sampling_params": {"max_new_tokens": 300,
                                                                  "ignore_eos": True}})
    import concurrent.futures
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(start)
        time.sleep(3)
        assert client.post("/abort_request", json={"rid": "long-1"}).status_code == 200
        out = fut.result(timeout=300).json()
    assert out["meta_info"]["finish_reason"]["type"] == "abort"
    assert out["meta_info"]["completion_tokens"] < 300


def test_model_and_server_info(client):
    info = client.get("/get_model_info").json()
    assert set(info) == MODEL_INFO_KEYS
    assert info["is_generation"] is True and info["preferred_sampling_params"] is None
    assert info["model_type"] == "llama" and info["architectures"] == ["LlamaForCausalLM"]
    server = client.get("/get_server_info").json()
    assert server["max_total_num_tokens"] > 0 and "version" in server
    assert client.get("/get_server_args").json()["max_model_len"] == 512
    assert client.get("/get_memory_pool_size").json() == server["max_total_num_tokens"]
    assert client.get("/get_max_total_num_tokens").json() == {
        "max_total_num_tokens": server["max_total_num_tokens"]}
    assert client.get("/health_generate").status_code == 200
    flush = client.post("/flush_cache")
    assert flush.status_code == 200 and flush.text.startswith("Cache flushed")


def test_decoder_v1_score(client):
    tok = client.post("/tokenize", json={"prompt": " Paris London", "add_special_tokens":
                                         False}).json()["tokens"]
    body = {"query": "The capital of France is", "items": ["", " the city of"],
            "label_token_ids": tok[:2], "apply_softmax": True}
    body["items"] = [" the city", " a town"]
    scores = client.post("/v1/score", json=body).json()["scores"]
    assert len(scores) == 2 and all(len(s) == 2 and abs(sum(s) - 1) < 1e-4 for s in scores)
    raw = client.post("/v1/score", json={**body, "apply_softmax": False}).json()["scores"]
    assert all(0 <= p <= 1 for s in raw for p in s)
    assert_json_error(client.post("/v1/score", json={"query": "q", "items": ["a"],
                                                     "label_token_ids": []}))


def test_rtp_routes(client):
    out = client.post("/", json={"prompt": "who are you", "generate_config":
                                 {"max_new_tokens": 5, "temperature": 0, "ignore_eos": True}}).json()
    assert set(out) >= {"response", "finished", "aux_info"} and out["finished"] is True
    assert out["aux_info"]["output_len"] == 5 and out["aux_info"]["input_len"] > 0
    batch = client.post("/", json={"prompt": ["a", "b"], "generate_config":
                                   {"max_new_tokens": 2}}).json()
    assert len(batch["response_batch"]) == 2
    msgs = {"messages": [{"role": "user", "content": "hello?"}]}
    for path in ("/chat/render", "/v1/chat/render"):
        r = client.post(path, json=msgs).json()
        assert "hello?" in r["input_prompt"] and r["input_ids"]
    got = client.get("/chat/render", params={"messages": json.dumps(msgs["messages"])}).json()
    assert "hello?" in got["input_prompt"]
    enc = client.post("/tokenizer/encode", json={"prompt": "hello"}).json()
    assert enc["token_ids"] and len(enc["tokens"]) == len(enc["token_ids"])
    for path in ("/worker_status", "/rtp_llm/worker_status"):
        ws = client.post(path, json={"latest_cache_version": -1}).json()
        assert {"running_task_info", "finished_task_list", "cache_status"} <= set(ws)
        assert ws["cache_status"]["total_kv_cache"] > 0
        assert client.get(path).status_code == 200
    assert client.get("/status").json() == "ok"
    for path in ("/status", "/health_check", "/health"):
        assert client.post(path).json() == "ok"
    assert "block_size" in client.get("/cache_status").json()
    assert client.post("/set_log_level", json={"log_level": "INFO"}).status_code == 200
    assert client.post("/set_log_level", json={"log_level": "WARNING"}).status_code == 200
    lmd = client.post("/v1/encode", json={"input": "hello"}).json()
    assert lmd["input_ids"] == enc["token_ids"] and lmd["length"] == len(enc["token_ids"])


MALFORMED = [
    ("/generate", {"text": 5}), ("/generate", {"text": "a", "input_ids": [1]}),
    ("/generate", {"text": "a", "sampling_params": {"temperature": -1}}),
    ("/generate", {"prompt": "a", "max_tokens": "x"}), ("/generate", {"input_ids": [10 ** 9]}),
    ("/abort_request", {"session_id": "x"}), ("/update_weights_from_disk", {}),
    ("/update_weights", {"serialized_named_tensors": "abc", "load_format": "flattened_bucket"}),
    ("/update_weights", {"serialized_named_tensors": "not base64!"}),
    ("/update_weights", {"serialized_named_tensors": 5, "finished": True}),
    ("/update_weights", {"serialized_named_tensors": {"a": [1]}, "finished": "yes"}),
    ("/", {"generate_config": {"max_new_tokens": 2}}), ("/", {"prompt": 3}),
    ("/chat/render", {"messages": "x"}), ("/v1/chat/render", {}),
    ("/tokenizer/encode", {}), ("/set_log_level", {"log_level": "LOUD"}),
    ("/v1/encode", {"input": 3}), ("/rtp_llm/worker_status", {"latest_cache_version": "x"}),
    ("/v1/score", {"items": ["a"]}), ("/sleep", {"level": 7}),
    ("/encode", {"text": "x"}), ("/v1/embeddings", {"input": "x"}), ("/pooling", {"input": "x"}),
    ("/score", {"text_1": "a", "text_2": "b"}), ("/v1/rerank", {"query": "a", "documents": ["b"]}),
    ("/classify", {"input": "x"}), ("/v1/classifier", {"input": ["x"]}),
    ("/v1/embeddings/sparse", {"input": "x"}), ("/rerank", {"query": "a", "documents": ["b"]}),
    ("/v2/rerank", {"query": "a", "documents": ["b"]}), ("/v1/embeddings/dense", {"input": "x"}),
    ("/v1/embeddings/colbert", {"input": "x"}),
    ("/v1/embeddings/similarity", {"left": ["a"], "right": ["b"]}),
    ("/tokenize", {}), ("/detokenize", {"tokens": "x"}), ("/v1/completions", {"prompt": 5}),
    ("/v1/chat/completions", {"messages": 5}),
]
POOLING_PATHS = ("/encode", "/v1/embeddings", "/pooling", "/score", "/v1/rerank", "/classify",
                 "/v1/classifier", "/v1/embeddings/sparse", "/rerank", "/v2/rerank",
                 "/v1/embeddings/dense", "/v1/embeddings/colbert", "/v1/embeddings/similarity")


@pytest.mark.parametrize("path,body", MALFORMED, ids=[f"{p}-{i}" for i, (p, _) in
                                                      enumerate(MALFORMED)])
def test_malformed_bodies_get_4xx_json(client, path, body):
    err = assert_json_error(client.post(path, json=body))
    if path in POOLING_PATHS:
        assert "generation model" in err["message"]
    assert_json_error(client.post(path, content=b"{not json"))


@pytest.mark.parametrize("path", ["/sleep", "/wakeup", "/abort_request", "/cache_status",
                                  "/worker_status"])
def test_optional_bodies_must_still_be_json(client, path):
    """Routes whose body is optional refuse one that is not JSON (and stay awake)."""
    assert_json_error(client.post(path, content=b"{not json"))
    assert client.get("/is_sleeping").json() == {"is_sleeping": False}


def test_update_weights_from_disk(client, converted):
    good, other = converted
    before = client.post("/generate", json=GREEDY).json()["text"]
    ok = client.post("/update_weights_from_disk", json={"model_path": str(good)})
    assert ok.status_code == 200, ok.text
    assert ok.json() == {"success": True, "message": "Succeeded to update model weights."}
    assert client.post("/generate", json=GREEDY).json()["text"] == before
    wrong = client.post("/update_weights_from_disk", json={"model_path": "/no/such-model"})
    assert wrong.json() == {"success": False, "message": (
        "Failed to get weights iterator: /no/such-model (repository not found).")}
    bad = client.post("/update_weights", json={"model_path": str(other)}).json()
    assert bad["success"] is False and set(bad) == {"success", "message"}
    assert bad["message"].startswith("Failed to update weights: The size of tensor a")
    assert bad["message"].endswith("\nRolling back to original weights.")
    assert client.post("/generate", json=GREEDY).json()["text"] == before


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _update(client, payload, finished: bool, **extra) -> httpx.Response:
    return client.post("/update_weights", json={"serialized_named_tensors": payload,
                                                "finished": finished, **extra})


def test_lmdeploy_update_weights_from_tensors(client, tmp_path):
    """LMDeploy's /update_weights: staged until finished, swapped whole, refused whole."""
    import torch
    from multiprocessing.reduction import ForkingPickler

    from model.default import default_model_path
    from model.gguf import read_gguf
    from safetensors.numpy import save
    from torch.multiprocessing.reductions import reduce_tensor

    _, tensors = read_gguf(default_model_path())  # the served weights, Hugging Face names
    norm, down = tensors["model.norm.weight"], tensors["model.layers.0.mlp.down_proj.weight"]
    before = client.post("/generate", json=GREEDY).json()["text"]
    zeros_req = {"text": "Hello", "sampling_params": {"max_new_tokens": 3, "temperature": 0,
                                                      "ignore_eos": True}}

    # the same weights, in two calls (pickled torch tensors, then safetensors): no change
    first = _update(client, _b64(pickle.dumps([("model.layers.0.mlp.down_proj.weight",
                                                torch.from_numpy(down))])), False)
    assert first.status_code == 200 and first.json() is None, first.text
    assert _update(client, _b64(save({"model.norm.weight": norm})), True).json() is None
    assert client.post("/generate", json=GREEDY).json()["text"] == before

    # a zeroed final norm makes every logit 0, so greedy picks token 0; staged until finished
    assert _update(client, {"model.norm.weight": [0.0] * norm.shape[0]}, False).status_code == 200
    assert client.post("/generate", json=GREEDY).json()["text"] == before
    assert _update(client, {}, True).status_code == 200
    assert client.post("/generate", json=zeros_req).json()["output_ids"] == [0, 0, 0]
    restore = _update(client, _b64(pickle.dumps({"model.norm.weight": norm})), True,
                      load_format="pickle")
    assert restore.status_code == 200, restore.text
    assert client.post("/generate", json=GREEDY).json()["text"] == before

    # refusals are 400s that drop the staged tensors; the old weights keep serving
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad_payloads = [
        ([("model.layers.99.mlp.up_proj.weight", torch.zeros(2))], "unknown parameter"),
        ([("model.norm.weight", torch.zeros(7))], "has shape (7,), expected (576,)"),
        ([("model.norm.weight", Evil())], "refused to unpickle"),
        (None, "CUDA IPC handle"),
    ]
    for named, words in bad_payloads:
        assert _update(client, {"model.norm.weight": [0.0] * norm.shape[0]}, False
                       ).status_code == 200
        data = (ForkingPickler.dumps([("model.norm.weight", reduce_tensor(torch.zeros(576)))])
                if named is None else pickle.dumps(named))
        err = assert_json_error(_update(client, _b64(bytes(data)), True))
        assert words in err["message"], err
        assert _update(client, {}, True).status_code == 200  # nothing staged is left
        assert client.post("/generate", json=GREEDY).json()["text"] == before
    assert not marker.exists()


def test_sleep_and_wakeup(client):
    before = client.post("/generate", json=GREEDY).json()["text"]
    assert client.get("/is_sleeping").json() == {"is_sleeping": False}
    assert client.post("/sleep", params={"level": 1}).status_code == 200
    assert client.get("/is_sleeping").json() == {"is_sleeping": True}
    assert_json_error(client.post("/generate", json=GREEDY), 503, 503)
    assert_json_error(client.post("/v1/completions", json={"prompt": "hi"}), 503, 503)
    assert client.post("/wakeup").status_code == 200
    assert client.get("/is_sleeping").json() == {"is_sleeping": False}
    assert client.post("/generate", json=GREEDY).json()["text"] == before


def test_terminate_last(client, server):
    assert client.get("/terminate").json() == {}
    server.proc.wait(timeout=60)
