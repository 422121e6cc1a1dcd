"""A real server on a tiny random BERT cross-encoder (run with ``--api-dialect sglang``)."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from tests.server.native_launch import assert_json_error, launch

pytestmark = pytest.mark.slow

PAIRS = [("what is jax?", "JAX is a library for array computing."),
         ("capital of france", "Paris."),
         ("hi", "A much longer passage that goes on for a while so that the batch pads."),
         ("how tall is mount everest", "8,849 metres")]


@pytest.fixture(scope="module")
def cross_encoder(tmp_path_factory):
    import torch
    import transformers

    from model.default import minilm_path

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64,
                                  max_position_embeddings=128, num_labels=1)
    model = transformers.BertForSequenceClassification(cfg).eval()
    path = tmp_path_factory.mktemp("ce") / "tiny-cross-encoder"
    model.save_pretrained(path)
    tok = transformers.AutoTokenizer.from_pretrained(str(minilm_path()))
    tok.save_pretrained(path)
    batch = tok([a for a, _ in PAIRS], [b for _, b in PAIRS], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits[:, 0].numpy()
    return str(path), logits


@pytest.fixture(scope="module")
def client(cross_encoder):
    with launch(["--model", cross_encoder[0], "--api-dialect", "sglang"]) as srv:
        with httpx.Client(base_url=srv.url, timeout=120) as c:
            yield c


def _sigmoid(x):
    return 1 / (1 + np.exp(-np.asarray(x, np.float64)))


def test_score_matches_transformers(client, cross_encoder):
    _, logits = cross_encoder
    resp = client.post("/score", json={"text_1": [a for a, _ in PAIRS],
                                       "text_2": [b for _, b in PAIRS]}).json()
    assert resp["object"] == "list" and resp["usage"]["prompt_tokens"] > 0
    got = np.array([d["score"] for d in resp["data"]])
    np.testing.assert_allclose(got, _sigmoid(logits), atol=1e-4)
    one_to_n = client.post("/score", json={"text_1": PAIRS[0][0],
                                           "text_2": [PAIRS[0][1], "other"]}).json()
    assert abs(one_to_n["data"][0]["score"] - got[0]) < 1e-5
    # vLLM serves the same score on /v1/score (SGLang's query/items body goes elsewhere),
    # and takes the newer data_1/data_2 and queries/documents spellings
    for body in ({"text_1": [a for a, _ in PAIRS], "text_2": [b for _, b in PAIRS]},
                 {"data_1": [a for a, _ in PAIRS], "data_2": [b for _, b in PAIRS]},
                 {"queries": [a for a, _ in PAIRS], "documents": [b for _, b in PAIRS]}):
        v1 = client.post("/v1/score", json=body).json()
        np.testing.assert_allclose([d["score"] for d in v1["data"]], got, atol=1e-6)
    reward = client.post("/classify", json={"text": ["a single text", "another"]}).json()
    assert isinstance(reward, list) and len(reward[0]["embedding"]) == 1


def test_rerank_sglang_dialect_and_classify(client, cross_encoder):
    _, logits = cross_encoder
    query = PAIRS[0][0]
    docs = [PAIRS[0][1], "hi", "gg"]
    out = client.post("/v1/rerank", json={"query": query, "documents": docs}).json()
    assert isinstance(out, list) and {"score", "document", "index"} <= set(out[0])
    assert [o["score"] for o in out] == sorted((o["score"] for o in out), reverse=True)
    first = next(o for o in out if o["index"] == 0)
    assert abs(first["score"] - _sigmoid(logits[0])) < 1e-4
    cls = client.post("/classify", json={"input": ["one", "two"]}).json()
    assert {"index", "label", "probs", "num_classes"} <= set(cls["data"][0])
    assert cls["data"][0]["num_classes"] == 1 and cls["usage"]["prompt_tokens"] > 0
    rtp = client.post("/v1/classifier", json={"input": [list(p) for p in PAIRS[:2]],
                                              "model": "xx"}).json()  # RTP ignores `model`
    got = [r["relevance_score"] for r in rtp["results"]]
    np.testing.assert_allclose(got, _sigmoid(logits[:2]), atol=1e-4)
    assert rtp["results"][1]["document"] == PAIRS[1][1]


def test_wrong_routes_and_malformed(client):
    for path, body in (("/v1/embeddings", {"input": "x"}), ("/encode", {"text": "x"}),
                       ("/v1/embeddings/colbert", {"input": "x"}),
                       ("/generate", {"text": "x"})):
        err = assert_json_error(client.post(path, json=body))
        assert "cross-encoder" in err["message"], err
    for path, body in (("/score", {"text_1": "a"}), ("/v1/rerank", {"documents": ["a"]}),
                       ("/rerank", {"query": "a", "documents": []}),
                       ("/classify", {"input": []}), ("/v1/classifier", {"input": 5})):
        assert_json_error(client.post(path, json=body))
        assert_json_error(client.post(path, content=b"nope"))
    info = client.get("/get_model_info").json()
    assert info["is_generation"] is False
    assert info["architectures"] == ["BertForSequenceClassification"]
