"""A real server on all-MiniLM-L6-v2: every pooling route, OpenAI client, shapes, errors."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest

from tests.server.native_launch import assert_json_error, launch

pytestmark = pytest.mark.slow

SENTENCES = [
    "The cat sits on the mat.", "A man is playing a guitar.", "JAX compiles numpy programs.",
    "Paris is the capital of France.", "I love pizza with extra cheese.",
    "The weather is sunny today.", "Quantum computers use qubits.", "She reads a book.",
    "Dogs are loyal animals.", "The stock market fell sharply.", "He runs every morning.",
    "Water boils at 100 degrees Celsius.", "The train leaves at noon.",
    "Mount Everest is the tallest mountain.", "Music makes people happy.",
    "A child is flying a kite.", "The server answered in JSON.", "Bananas are yellow.",
    "Transformers changed natural language processing.", "It is raining cats and dogs.",
]


@pytest.fixture(scope="module")
def minilm_dir() -> str:
    from model.default import minilm_path
    return str(minilm_path())


@pytest.fixture(scope="module")
def server(minilm_dir):
    with launch(["--model", minilm_dir, "--served-model-name", "minilm"]) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def _hf_mean(path: str, texts: list[str]) -> np.ndarray:
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    batch = tok(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()


def test_openai_client_embeddings_match_transformers(server, minilm_dir):
    import openai

    oc = openai.OpenAI(base_url=server.url + "/v1", api_key="x")
    resp = oc.embeddings.create(model="minilm", input=SENTENCES)
    ours = np.array([d.embedding for d in resp.data])
    assert [d.index for d in resp.data] == list(range(20))
    assert resp.usage.prompt_tokens > 20
    ref = _hf_mean(minilm_dir, SENTENCES)
    cos = (ours * ref).sum(-1) / np.linalg.norm(ours, axis=-1) / np.linalg.norm(ref, axis=-1)
    assert cos.min() > 0.9999, cos
    b64 = oc.embeddings.create(model="minilm", input=SENTENCES[0], encoding_format="base64")
    raw = b64.data[0].embedding
    got = np.frombuffer(base64.b64decode(raw), "<f4") if isinstance(raw, str) else np.array(raw)
    assert np.allclose(got, ours[0], atol=1e-6)
    short = oc.embeddings.create(model="minilm", input=SENTENCES[:2], dimensions=32)
    vec = np.array(short.data[0].embedding)
    assert vec.shape == (32,) and abs(np.linalg.norm(vec) - 1) < 1e-5
    assert np.allclose(vec, ours[0, :32] / np.linalg.norm(ours[0, :32]), atol=1e-5)


def test_embedding_inputs_and_errors(client):
    ids = client.post("/tokenize", json={"prompt": "hello world"}).json()["tokens"]
    a = client.post("/v1/embeddings", json={"input": ids}).json()
    b = client.post("/v1/embeddings", json={"input": [ids, ids]}).json()
    c = client.post("/v1/embeddings", json={"input": "hello world"}).json()
    assert np.allclose(a["data"][0]["embedding"], c["data"][0]["embedding"], atol=1e-5)
    assert len(b["data"]) == 2 and b["object"] == "list"
    raw = client.post("/v1/embeddings", json={"input": "x", "encoding_format": "base64"}).json()
    assert len(np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), "<f4")) == 384
    for body in ({"input": []}, {"input": [""]}, {"input": 3}, {"input": "x", "dimensions": 0},
                 {"input": "x", "encoding_format": "hex"}, {"input": [10 ** 9]}, {}):
        assert_json_error(client.post("/v1/embeddings", json=body))
    assert_json_error(client.post("/v1/embeddings", content=b"{nope"))


def test_native_embedding_routes(client):
    one = client.post("/encode", json={"model": "minilm", "text": "Once upon a time"}).json()
    assert len(one["embedding"]) == 384 and "meta_info" in one
    many = client.post("/encode", json={"text": ["a", "b"]}).json()
    assert isinstance(many, list) and len(many) == 2
    assert client.post("/v1/embeddings", json={"input": "x", "model": "xx"}).status_code == 404
    pool = client.post("/pooling", json={"input": ["hi", "there"]}).json()
    assert pool["object"] == "list" and pool["data"][1]["object"] == "pooling"
    assert len(pool["data"][0]["data"]) == 384
    dense = client.post("/v1/embeddings/dense", json={"input": "who are u"}).json()
    assert len(dense["data"][0]["embedding"]) == 384
    sparse = client.post("/v1/embeddings/sparse", json={"input": "who are u"}).json()
    weights = sparse["data"][0]["embedding"]
    assert weights and all(k.isdigit() and 0 <= v <= 1 for k, v in weights.items())
    colbert = client.post("/v1/embeddings/colbert", json={"input": "who are u"}).json()
    vecs = np.array(colbert["data"][0]["embedding"])
    assert vecs.shape[1] == 384 and vecs.shape[0] >= 3
    assert np.allclose(np.linalg.norm(vecs, axis=-1), 1, atol=1e-5)
    sim = client.post("/v1/embeddings/similarity", json={  # RTP's example, model "xx"
        "left": ["hello, what is your name?"], "right": ["hello", "what is your name"],
        "model": "xx"}).json()
    s = np.array(sim["similarity"])
    assert s.shape == (1, 2) and s[0, 1] > s[0, 0]
    for path in ("/encode", "/pooling", "/v1/embeddings/sparse", "/v1/embeddings/colbert",
                 "/v1/embeddings/similarity", "/v1/embeddings/dense"):
        assert_json_error(client.post(path, json={"bogus": 1}))
        assert_json_error(client.post(path, content=b"[1, 2"))


def test_score_and_rerank_with_embedding_model(client):
    score = client.post("/score", json={"text_1": "A cat", "text_2": ["A kitten", "Stocks"]})
    data = score.json()["data"]
    assert [d["object"] for d in data] == ["score", "score"] and data[0]["score"] > data[1]["score"]
    rr = client.post("/v1/rerank", json={"query": "What is the capital of France?", "documents": [
        "The capital of Brazil is Brasilia.", "The capital of France is Paris.",
        "Horses and cows are both animals"], "top_n": 2}).json()
    assert set(rr) >= {"id", "model", "usage", "results"}
    assert [r["index"] for r in rr["results"]][0] == 1 and len(rr["results"]) == 2
    assert rr["results"][0]["document"] == {"text": "The capital of France is Paris."}
    for path in ("/rerank", "/v2/rerank"):
        assert client.post(path, json={"query": "q", "documents": ["a"]}).status_code == 200
        assert_json_error(client.post(path, json={"query": "q"}))
    assert_json_error(client.post("/score", json={"text_1": ["a", "b"], "text_2": ["c"]}))


def test_routes_that_do_not_fit_say_what_the_model_is(client):
    for path, body in (("/generate", {"text": "hi"}), ("/classify", {"input": "hi"}),
                       ("/v1/classifier", {"input": ["hi"]}),
                       ("/v1/score", {"query": "q", "items": ["a"], "label_token_ids": [1]}),
                       ("/v1/completions", {"prompt": "hi"}), ("/", {"prompt": "hi"})):
        err = assert_json_error(client.post(path, json=body))
        assert "embedding model" in err["message"] or "pooling model" in err["message"], err
    info = client.get("/get_model_info").json()
    assert info["is_generation"] is False and info["architectures"] == ["BertModel"]
    assert client.get("/health_generate").status_code == 200
