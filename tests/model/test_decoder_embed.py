"""Decoder models as embedding models: last-token pooling matches transformers."""

import numpy as np
import pytest
import torch

from model.decoder_embed import LoadedDecoderEmbedder, encode
from model.loader import load_model
from tests.model.tiny_hf import save_hf_model


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_last_token_embeddings_match_transformers(tmp_path, family):
    hf = save_hf_model(family, tmp_path)
    emb = LoadedDecoderEmbedder(load_model(tmp_path, with_tokenizer=False))
    rng = np.random.default_rng(0)
    seqs = [rng.integers(3, 120, size=n).tolist() for n in (1, 5, 17, 33, 8)]
    ours = encode(emb, seqs, batch_size=4)
    with torch.no_grad():
        for seq, vec in zip(seqs, ours):
            h = hf.model(torch.tensor([seq])).last_hidden_state[0, -1].numpy()
            ref = h / np.linalg.norm(h)
            np.testing.assert_allclose(vec, ref, rtol=1e-4, atol=1e-5)
    alone = encode(emb, seqs[2:3])
    np.testing.assert_allclose(alone[0], ours[2], rtol=1e-5, atol=1e-6)
    raw = encode(emb, seqs[:2], normalize=False)
    assert not np.allclose(np.linalg.norm(raw, axis=-1), 1.0)
    cut = encode(emb, seqs[:2], dimensions=8)
    assert cut.shape == (2, 8)
    np.testing.assert_allclose(np.linalg.norm(cut, axis=-1), 1.0, rtol=1e-5)
