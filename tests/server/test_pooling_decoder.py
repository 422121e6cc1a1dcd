"""A real server with a decoder (SmolLM2) as an embedding model: last-token pooling."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from tests.server.native_launch import assert_json_error, launch

pytestmark = pytest.mark.slow

TEXTS = ["The capital of France is Paris.", "def add(a, b): return a + b", "Hello!"]


@pytest.fixture(scope="module")
def server():
    with launch(["--task", "embed", "--served-model-name", "smol-embed"]) as srv:
        yield srv


def test_decoder_embeddings_match_in_process_last_token_pooling(server):
    from model.decoder_embed import encode, load_decoder_embedder

    with httpx.Client(base_url=server.url, timeout=300) as c:
        resp = c.post("/v1/embeddings", json={"model": "smol-embed", "input": TEXTS})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        got = np.array([d["embedding"] for d in body["data"]], np.float32)
        assert got.shape == (3, 576) and body["usage"]["prompt_tokens"] > 0
        np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, rtol=1e-5)
        ref = encode(load_decoder_embedder(None), TEXTS)
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
        # vLLM's /score on an embedding model is the cosine of the two embeddings
        score = c.post("/score", json={"text_1": TEXTS[0], "text_2": TEXTS[1]}).json()
        assert score["data"][0]["score"] == pytest.approx(float(ref[0] @ ref[1]), abs=1e-4)
        # routes that need a classifier or generation answer a 4xx naming the model
        err = assert_json_error(c.post("/classify", json={"input": "x"}))
        assert "embed" in err["message"].lower()
        assert_json_error(c.post("/v1/completions", json={"model": "smol-embed", "prompt": "x"}))
