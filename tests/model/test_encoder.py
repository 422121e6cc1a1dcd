"""Encoder, pooling and loader tests against Hugging Face transformers.

References: all-MiniLM-L6-v2 through ``AutoModel`` + mean pooling + L2
normalisation; tiny random BERT / RoBERTa ``*ForSequenceClassification``
checkpoints written with ``save_pretrained`` (tokenizer borrowed from MiniLM).
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.encoder import EncoderConfig, encode_hidden, init_encoder
from model.encoder_loader import (bucket, classify_texts, encode, load_encoder,
                                  score_pairs, token_embeddings)
from model.pooling import PoolingConfig, l2_normalize, pool, truncate

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
logger = logging.getLogger(__name__)

SENTENCES = [
    "Hi.",
    "The cat sat on the mat.",
    "A man is playing a guitar on a busy street corner while people walk by.",
    "JAX compiles numerical programs with XLA for CPUs, GPUs and TPUs.",
    "What is the capital of France?",
    "Paris is the capital and most populous city of France.",
    "ok",
    "Embeddings map sentences with similar meanings to nearby vectors in a space "
    "of a few hundred dimensions, which makes semantic search cheap: encode the "
    "corpus once, encode each query, and rank documents by cosine similarity.",
    "¿Dónde está la biblioteca?",
    "Das Wetter ist heute schön.",
    "1 + 1 = 2, and 2 * 3 = 6; 10 / 4 = 2.5",
    "emoji 🙂 and symbols #@!$%",
    "   leading and trailing spaces   ",
    "UPPER CASE TEXT SHOULD BE LOWERED BY THE TOKENIZER",
    "A quick brown fox jumps over the lazy dog. " * 6,
    "def f(x): return x ** 2",
    "Transformers use self-attention.",
    "I love New York in the spring.",
    "short",
    "The stock market fell sharply on Tuesday after the central bank raised rates.",
]


@pytest.fixture(scope="module")
def minilm_dir() -> str:
    try:
        from model.default import minilm_path
    except ImportError:
        pytest.skip("model.default.minilm_path is not available")
    try:
        return minilm_path()
    except RuntimeError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    return load_encoder(minilm_dir)


def _hf_mean_embeddings(path: str, texts: list[str]) -> np.ndarray:
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    batch = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(mean, p=2, dim=1).numpy()


# ------------------------------------------------------------------ MiniLM


@pytest.mark.slow
def test_minilm_matches_transformers(minilm, minilm_dir):
    ours = encode(minilm, SENTENCES)
    ref = _hf_mean_embeddings(minilm_dir, SENTENCES)
    assert ours.shape == (20, 384) and ours.dtype == np.float32
    cos = (ours * ref).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
    logger.info("min cosine %.8f, max abs diff %.2e", cos.min(), np.abs(ours - ref).max())
    assert cos.min() > 0.9999, cos
    assert np.abs(ours - ref).max() < 1e-4
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_minilm_padding_and_batch_invariance(minilm):
    together = encode(minilm, SENTENCES, batch_size=32)
    alone = encode(minilm, [SENTENCES[3]])
    np.testing.assert_allclose(alone[0], together[3], atol=1e-5)
    small_batches = encode(minilm, SENTENCES, batch_size=4)  # other buckets, other order
    np.testing.assert_allclose(small_batches, together, atol=1e-5)
    ids = minilm.tokenizer(SENTENCES[3])["input_ids"]
    np.testing.assert_allclose(encode(minilm, [ids])[0], together[3], atol=1e-5)


@pytest.mark.slow
def test_minilm_token_embeddings_and_matryoshka(minilm, minilm_dir):
    tok = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    model = transformers.AutoModel.from_pretrained(minilm_dir).eval()
    texts = SENTENCES[:3]
    ours = token_embeddings(minilm, texts)
    for text, vecs in zip(texts, ours):
        batch = tok([text], return_tensors="pt")
        with torch.no_grad():
            ref = model(**batch).last_hidden_state[0].numpy()
        assert vecs.shape == ref.shape
        np.testing.assert_allclose(vecs, ref, atol=1e-4)
    cut = encode(minilm, texts, dimensions=64)
    assert cut.shape == (3, 64)
    np.testing.assert_allclose(np.linalg.norm(cut, axis=1), 1.0, atol=1e-5)
    full = encode(minilm, texts)
    np.testing.assert_allclose(cut, l2_normalize(full[:, :64]), atol=1e-6)


def test_minilm_pooling_config(minilm_dir):
    cfg = PoolingConfig.from_folder(minilm_dir)
    assert cfg == PoolingConfig(modes=("mean",), normalize=True, max_seq_length=256)


# ---------------------------------------------------------- cross-encoders


def _save_tiny(tmp_path, minilm_dir, name, *, roberta=False, num_labels=1, id2label=None,
               safe=True):
    """Writes a tiny random ``*ForSequenceClassification`` folder; returns (path, model)."""
    torch.manual_seed(0)
    common = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                  num_attention_heads=4, intermediate_size=64, max_position_embeddings=80,
                  num_labels=num_labels)
    if id2label:
        common["id2label"] = id2label
        common["label2id"] = {v: k for k, v in id2label.items()}
    if roberta:
        cfg = transformers.RobertaConfig(pad_token_id=0, type_vocab_size=1, **common)
        model = transformers.RobertaForSequenceClassification(cfg)
    else:
        cfg = transformers.BertConfig(**common)
        model = transformers.BertForSequenceClassification(cfg)
    model.eval()
    path = tmp_path / name
    model.save_pretrained(path)
    if not safe:
        os.remove(path / "model.safetensors")
        torch.save(model.state_dict(), path / "pytorch_model.bin")
    transformers.AutoTokenizer.from_pretrained(minilm_dir).save_pretrained(path)
    return str(path), model


PAIRS = [
    ("what is jax?", "JAX is a library for array computing and program transformation."),
    ("capital of france", "Paris."),
    ("hi", "A long passage that goes on for a while to force padding in the batch, "
           "with quite a few more tokens than the others have in total."),
    ("how tall is mount everest", "8,849 metres"),
]


def _hf_pair_logits(path, model, pairs):
    tok = transformers.AutoTokenizer.from_pretrained(path)
    batch = tok([a for a, _ in pairs], [b for _, b in pairs], padding=True,
                truncation=True, return_tensors="pt")
    if "token_type_ids" in batch and model.config.type_vocab_size == 1:
        batch.pop("token_type_ids")
    with torch.no_grad():
        return model(**batch).logits.numpy()


@pytest.mark.parametrize("roberta", [False, True], ids=["bert", "roberta"])
@pytest.mark.parametrize("num_labels", [1, 3])
def test_cross_encoder_matches_transformers(tmp_path, minilm_dir, roberta, num_labels):
    id2label = {0: "contradiction", 1: "entailment", 2: "neutral"} if num_labels == 3 else None
    path, model = _save_tiny(tmp_path, minilm_dir, "ce", roberta=roberta,
                             num_labels=num_labels, id2label=id2label)
    loaded = load_encoder(path)
    assert loaded.kind == ("cross_encoder" if num_labels == 1 else "classifier")
    assert loaded.id2label == (id2label or {0: "LABEL_0"})
    assert loaded.pooling.modes == ()
    assert loaded.config.position_offset == (1 if roberta else 0)
    ours = score_pairs(loaded, PAIRS)
    ref = _hf_pair_logits(path, model, PAIRS)
    assert ours.shape == (len(PAIRS), num_labels)
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    alone = score_pairs(loaded, PAIRS[1:2])  # padding invariance
    np.testing.assert_allclose(alone[0], ours[1], atol=1e-5)


def test_classifier_single_texts_and_bin_weights(tmp_path, minilm_dir):
    path, model = _save_tiny(tmp_path, minilm_dir, "bin", num_labels=2, safe=False)
    loaded = load_encoder(path)
    texts = ["good movie", "a terrible, terrible film that I would not watch again"]
    tok = transformers.AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        ref = model(**tok(texts, padding=True, return_tensors="pt")).logits.numpy()
    np.testing.assert_allclose(classify_texts(loaded, texts), ref, atol=1e-4)


def test_bfloat16_load_runs(tmp_path, minilm_dir):
    path, model = _save_tiny(tmp_path, minilm_dir, "bf16")
    f32 = score_pairs(load_encoder(path), PAIRS)
    bf16 = score_pairs(load_encoder(path, dtype="bfloat16"), PAIRS)
    np.testing.assert_allclose(bf16, f32, atol=5e-2)


# ------------------------------------------------------------------ errors


def test_load_errors(tmp_path, minilm_dir):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_encoder(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_encoder(empty)
    path, _ = _save_tiny(tmp_path, minilm_dir, "bad")
    with pytest.raises(ValueError, match="unknown dtype"):
        load_encoder(path, dtype="int8")

    cfg_file = os.path.join(path, "config.json")
    cfg = json.load(open(cfg_file))
    json.dump({**cfg, "intermediate_size": 48}, open(cfg_file, "w"))
    with pytest.raises(ValueError, match=r"intermediate.dense.weight has shape \(64, 32\)"):
        load_encoder(path)
    json.dump({**cfg, "num_hidden_layers": 3}, open(cfg_file, "w"))
    with pytest.raises(ValueError, match="missing weights.*encoder.layer.2"):
        load_encoder(path)
    json.dump({**cfg, "model_type": "gpt2"}, open(cfg_file, "w"))
    with pytest.raises(ValueError, match="unsupported encoder model_type"):
        load_encoder(path)
    json.dump(cfg, open(cfg_file, "w"))

    no_tok = tmp_path / "no_tok"
    no_tok.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(path, name), no_tok / name)
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        load_encoder(no_tok)
    os.remove(no_tok / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no weights"):
        load_encoder(no_tok)

    loaded = load_encoder(path)
    with pytest.raises(ValueError, match="embedding model"):
        encode(loaded, ["x"])


# -------------------------------------------------- model and pooling units


def test_encoder_jit_shapes():
    cfg = EncoderConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=32,
                        max_position_embeddings=32)
    graphdef, state = init_encoder(cfg, abstract=True)
    ids = jax.ShapeDtypeStruct((3, 8), jnp.int32)
    out = jax.eval_shape(encode_hidden, graphdef, state, ids, ids, ids)
    assert out.shape == (3, 8, 16) and out.dtype == jnp.float32
    with pytest.raises(ValueError, match="not divisible"):
        EncoderConfig(vocab_size=5, hidden_size=10, num_hidden_layers=1,
                      num_attention_heads=3, intermediate_size=4)


def test_pool_modes_against_numpy():
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(2, 5, 4)).astype(np.float32)
    right = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    left = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    mean = np.stack([hidden[0, :3].mean(0), hidden[1].mean(0)])
    np.testing.assert_allclose(pool(hidden, right, ("mean",)), mean, rtol=1e-5)
    np.testing.assert_allclose(pool(hidden, right, ("cls",)), hidden[:, 0])
    np.testing.assert_allclose(pool(hidden, right, ("last",)), hidden[[0, 1], [2, 4]])
    np.testing.assert_allclose(pool(hidden, left, ("last",)), hidden[:, 4])
    np.testing.assert_allclose(pool(hidden, right, ("max",))[0], hidden[0, :3].max(0))
    both = pool(hidden, right, ("cls", "mean"))
    assert both.shape == (2, 8)
    np.testing.assert_allclose(both[:, 4:], mean, rtol=1e-5)
    np.testing.assert_allclose(pool(hidden, right, ("mean_sqrt_len",))[0],
                               hidden[0, :3].sum(0) / np.sqrt(3), rtol=1e-5)


def test_normalize_and_truncate():
    x = np.array([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0]], np.float32)
    np.testing.assert_allclose(l2_normalize(x), [[0.6, 0.8, 0.0], [0, 0, 0]])
    np.testing.assert_allclose(truncate(x, 1, normalize=True), [[1.0], [0.0]])
    np.testing.assert_allclose(truncate(x, 2, normalize=False), x[:, :2])
    assert truncate(x, None, normalize=True) is x
    with pytest.raises(ValueError, match="dimensions"):
        truncate(x, 4, normalize=True)


def test_pooling_config_from_folder(tmp_path):
    assert PoolingConfig.from_folder(tmp_path) == PoolingConfig(("cls",), True, None)
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"pooling_mode_lasttoken": True, "pooling_mode_mean_tokens": False}))
    modules = [{"idx": 0, "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    assert PoolingConfig.from_folder(tmp_path) == PoolingConfig(("last",), False, None)
    modules.append({"idx": 2, "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ValueError, match="Dense"):
        PoolingConfig.from_folder(tmp_path)


def test_bucket():
    assert [bucket(n, 256, 8) for n in (1, 8, 9, 100, 256)] == [8, 8, 16, 128, 256]
    assert bucket(300, 510, 8) == 510 and bucket(20, 32) == 32 and bucket(3, 32) == 4
