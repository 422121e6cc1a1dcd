"""Loads BERT-family pooling models from a Hugging Face folder and runs them.

``load_encoder`` reads ``config.json``, the weights (``model.safetensors``,
a sharded safetensors index, or ``pytorch_model.bin``) through an explicit
name map, the tokenizer and the sentence-transformers pooling pipeline.
``encode`` / ``score_pairs`` / ``token_embeddings`` tokenize, pad to
power-of-two buckets (so ``jit`` compiles a few shapes), run and pool.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from typing import Any, Callable, Iterator, Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model.encoder import DTYPES, EncoderConfig, classify, encode_hidden, init_encoder
from model.pooling import PoolingConfig, l2_normalize, pool, truncate

logger = logging.getLogger(__name__)

Kind = Literal["embedding", "cross_encoder", "classifier"]
MIN_BUCKET = 8
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "sentencepiece.bpe.model",
                    "tokenizer.model", "spiece.model", "vocab.json")

# Hugging Face name (base-model prefix stripped) -> (nnx path, transpose).
_LAYER_MAP = {
    "attention.self.query": "query",
    "attention.self.key": "key",
    "attention.self.value": "value",
    "attention.output.dense": "attn_out",
    "attention.output.LayerNorm": "attn_norm",
    "intermediate.dense": "mlp_in",
    "output.dense": "mlp_out",
    "output.LayerNorm": "mlp_norm",
}
_TOP_MAP = {
    "embeddings.word_embeddings": "embeddings.word",
    "embeddings.position_embeddings": "embeddings.position",
    "embeddings.token_type_embeddings": "embeddings.token_type",
    "embeddings.LayerNorm": "embeddings.norm",
    "pooler.dense": "pooler",
}


def weight_name_map(config: EncoderConfig) -> dict[str, tuple[tuple, bool]]:
    """Hugging Face weight name -> (nnx state path, transpose?).

    Names are those of ``BertModel`` (no ``bert.``/``roberta.`` prefix) plus the
    ``classifier.*`` head. Linear weights are ``[out, in]`` in torch and
    ``[in, out]`` kernels here, hence the transpose.
    """
    modules: dict[str, str] = dict(_TOP_MAP)
    for i in range(config.num_hidden_layers):
        for hf, ours in _LAYER_MAP.items():
            modules[f"encoder.layer.{i}.{hf}"] = f"layers.{i}.{ours}"
    if config.num_labels:
        if config.classifier_style == "roberta":
            modules["classifier.dense"] = "classifier_dense"
            modules["classifier.out_proj"] = "classifier"
        else:
            modules["classifier"] = "classifier"
    if not config.add_pooler:
        modules.pop("pooler.dense")
    out = {}
    for hf, ours in modules.items():
        path = tuple(int(p) if p.isdigit() else p for p in ours.split("."))
        if hf.startswith("embeddings.") and "Norm" not in hf:
            out[f"{hf}.weight"] = (path + ("embedding",), False)
        elif "LayerNorm" in hf:
            out[f"{hf}.weight"] = (path + ("scale",), False)
            out[f"{hf}.bias"] = (path + ("bias",), False)
        else:
            out[f"{hf}.weight"] = (path + ("kernel",), True)
            out[f"{hf}.bias"] = (path + ("bias",), False)
    return out


@dataclasses.dataclass(frozen=True)
class LoadedEncoder:
    """A loaded pooling model, ready for ``encode`` / ``score_pairs``.

    Attributes:
        config: Encoder hyper-parameters.
        graphdef: Static half of ``nnx.split`` (hashable, a ``jit`` static arg).
        state: Weights, ``nnx.State`` of ``jax.Array``.
        tokenizer: The Hugging Face tokenizer from the same folder.
        pooling: Pooling pipeline (``PoolingConfig.none()`` for classifiers).
        kind: ``"embedding"``, ``"cross_encoder"`` or ``"classifier"``.
        id2label: Class index -> label for heads, ``{}`` for embedding models.
        max_length: Tokens kept per input (sentence-transformers'
            ``max_seq_length`` when set, never past the position table).
        path: The folder it came from.
    """

    config: EncoderConfig
    graphdef: nnx.GraphDef
    state: nnx.State
    tokenizer: Any
    pooling: PoolingConfig
    kind: Kind
    id2label: dict[int, str]
    max_length: int
    path: str = ""

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size


def _read_weights(path: str) -> dict[str, Any]:
    """All tensors of a folder by name, as arrays (jax or numpy)."""
    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    binary = os.path.join(path, "pytorch_model.bin")
    if os.path.exists(single) or os.path.exists(index):
        from safetensors import safe_open
        files = [single]
        if not os.path.exists(single):
            with open(index, encoding="utf-8") as f:
                files = sorted({os.path.join(path, v)
                                for v in json.load(f)["weight_map"].values()})
        out = {}
        for file in files:
            with safe_open(file, framework="flax") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
        return out
    if os.path.exists(binary):
        import torch
        sd = torch.load(binary, map_location="cpu", weights_only=True)
        return {k: v.float().numpy() for k, v in sd.items()}
    raise FileNotFoundError(
        f"{path}: no weights (looked for model.safetensors, "
        "model.safetensors.index.json, pytorch_model.bin)")


def _strip_prefix(weights: dict[str, Any], model_type: str) -> dict[str, Any]:
    prefixes = ("bert.", "roberta.", model_type.replace("-", "_") + ".", "model.")
    out = {}
    for name, value in weights.items():
        name = name.replace(".gamma", ".weight").replace(".beta", ".bias")
        for p in prefixes:
            if name.startswith(p):
                name = name[len(p):]
                break
        out[name] = value
    return out


def _fill_state(config: EncoderConfig, weights: dict[str, Any], dtype: str,
                where: str) -> tuple[nnx.GraphDef, nnx.State]:
    graphdef, abstract = init_encoder(config, abstract=True)
    flat = dict(nnx.to_flat_state(abstract))
    name_map = weight_name_map(config)
    missing = [n for n in name_map if n not in weights]
    if missing:
        raise ValueError(f"{where}: missing weights {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''} ({len(missing)} in all)")
    filled = {}
    for name, (path, transpose) in name_map.items():
        array = jnp.asarray(weights[name])
        if transpose:
            array = array.T
        var = flat[path]
        if tuple(array.shape) != tuple(var.shape):
            raise ValueError(f"{where}: {name} has shape {tuple(weights[name].shape)}; "
                             f"config expects {tuple(var.shape)}"
                             f"{' (transposed)' if transpose else ''} for {path}")
        filled[path] = var.replace(array.astype(DTYPES[dtype]))
    unused = sorted(set(weights) - set(name_map))
    if unused:
        logger.debug("%s: unused weights %s", where, unused)
    if set(filled) != set(flat):
        raise ValueError(f"{where}: unmapped parameters {sorted(set(flat) - set(filled))}")
    return graphdef, nnx.from_flat_state(list(filled.items()))


def _kind(hf: dict[str, Any], config: EncoderConfig) -> Kind:
    if not config.num_labels:
        return "embedding"
    # A cross-encoder scores a pair with one logit; sentence-transformers'
    # CrossEncoder also stamps its config with a "sentence_transformers" key.
    if config.num_labels == 1 or "sentence_transformers" in hf:
        return "cross_encoder"
    return "classifier"


def load_encoder(path: str | os.PathLike, dtype: str = "float32") -> LoadedEncoder:
    """Loads a BERT / RoBERTa / XLM-RoBERTa pooling model.

    Args:
        path: A Hugging Face folder (``config.json``, weights, tokenizer;
            optionally sentence-transformers' ``modules.json``).
        dtype: Parameter dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.

    Returns:
        A ``LoadedEncoder``. Its ``kind`` is ``"cross_encoder"`` or
        ``"classifier"`` when ``architectures`` names a
        ``*ForSequenceClassification`` (one label, or a sentence-transformers
        CrossEncoder config -> cross-encoder), else ``"embedding"``.

    Raises:
        FileNotFoundError: No folder, ``config.json``, weights or tokenizer.
        ValueError: Unsupported config, missing weights, or a shape that does
            not match the config (the message names the tensor and both shapes).
    """
    path = os.fspath(path)
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: not a directory")
    if not os.path.exists(cfg_file):
        raise FileNotFoundError(f"{path}: no config.json")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; known: {sorted(DTYPES)}")
    with open(cfg_file, encoding="utf-8") as f:
        hf = json.load(f)
    weights = _strip_prefix(_read_weights(path), hf.get("model_type", "bert"))
    probe = EncoderConfig.from_hf(hf)
    config = dataclasses.replace(
        probe, add_pooler=probe.add_pooler or "pooler.dense.weight" in weights)
    graphdef, state = _fill_state(config, weights, dtype, path)
    kind = _kind(hf, config)
    pooling = PoolingConfig.from_folder(path) if kind == "embedding" else PoolingConfig.none()
    # transformers 5 builds an empty-vocabulary tokenizer rather than failing.
    if not any(os.path.exists(os.path.join(path, f)) for f in _TOKENIZER_FILES):
        raise FileNotFoundError(f"{path}: no tokenizer (looked for {', '.join(_TOKENIZER_FILES)})")
    try:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"{path}: cannot load a tokenizer: {e}") from e
    max_length = config.max_tokens
    if pooling.max_seq_length:
        max_length = min(max_length, int(pooling.max_seq_length))
    id2label = {}
    if kind != "embedding":
        raw = hf.get("id2label") or {i: f"LABEL_{i}" for i in range(config.num_labels)}
        id2label = {int(k): v for k, v in raw.items()}
    logger.info("loaded %s encoder from %s: %d layers, H=%d, %s, pooling=%s, max_length=%d",
                kind, path, config.num_hidden_layers, config.hidden_size, dtype,
                pooling.modes, max_length)
    return LoadedEncoder(config, graphdef, state, tokenizer, pooling, kind, id2label,
                         max_length, path)


# ----------------------------------------------------------------- running


def bucket(n: int, cap: int, minimum: int = 1) -> int:
    """Smallest power of two >= ``max(n, minimum)``, capped at ``cap``."""
    size = max(minimum, 1 << max(n - 1, 0).bit_length())
    return min(size, cap) if n <= cap else n


@functools.partial(jax.jit, static_argnums=(0, 5, 6))
def _embed(graphdef, state, input_ids, attention_mask, token_type_ids,
           modes: tuple[str, ...], normalize: bool) -> jax.Array:
    """``[B, L]`` inputs -> ``[B, H * len(modes)]`` pooled (and normalised)."""
    model = nnx.merge(graphdef, state)
    pooled = pool(model(input_ids, attention_mask, token_type_ids), attention_mask, modes)
    return l2_normalize(pooled) if normalize else pooled


def _tokenize(loaded: LoadedEncoder, texts: Sequence[str] | Sequence[Sequence[int]],
              pairs: Sequence[str] | None = None) -> list[tuple[list[int], list[int]]]:
    """Inputs -> ``[(ids, token_type_ids)]``; token-id inputs are used as given
    (they must already hold the special tokens) and cut at ``max_length``."""
    if len(texts) and not isinstance(texts[0], str):
        return [(list(map(int, t))[:loaded.max_length], [0] * min(len(t), loaded.max_length))
                for t in texts]
    enc = loaded.tokenizer(list(texts), list(pairs) if pairs is not None else None,
                           truncation=True, max_length=loaded.max_length)
    types = enc.get("token_type_ids") or [[0] * len(ids) for ids in enc["input_ids"]]
    return list(zip(enc["input_ids"], types))


def _run_batches(loaded: LoadedEncoder, tokens: list[tuple[list[int], list[int]]],
                 batch_size: int, step: Callable
                 ) -> Iterator[tuple[list[int], np.ndarray, np.ndarray]]:
    """Runs ``step(ids, mask, types)`` on length-sorted, bucket-padded batches.

    Yields ``(indices, output, lengths)``: the original positions of the rows,
    the step's output for those rows (padding rows dropped) and their lengths.
    """
    if any(len(ids) == 0 for ids, _ in tokens):
        raise ValueError("empty input (no tokens)")
    order = sorted(range(len(tokens)), key=lambda i: len(tokens[i][0]))
    pad = loaded.config.pad_token_id
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        lengths = np.array([len(tokens[i][0]) for i in idx])
        seq = bucket(int(lengths.max()), loaded.max_length, MIN_BUCKET)
        rows = bucket(len(idx), batch_size)
        ids = np.full((rows, seq), pad, np.int32)
        types = np.zeros((rows, seq), np.int32)
        mask = np.zeros((rows, seq), np.int32)
        for r, i in enumerate(idx):
            n = lengths[r]
            ids[r, :n], types[r, :n], mask[r, :n] = tokens[i][0], tokens[i][1], 1
        out = np.asarray(step(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types)))
        yield idx, out[:len(idx)], lengths


def encode(loaded: LoadedEncoder, texts: Sequence[str] | Sequence[Sequence[int]], *,
           batch_size: int = 32, normalize: bool | None = None,
           dimensions: int | None = None) -> np.ndarray:
    """Sentence embeddings.

    Args:
        loaded: An embedding model from ``load_encoder``.
        texts: Strings, or token-id lists (used as given, special tokens
            included, cut at ``loaded.max_length``).
        batch_size: Rows per compiled step (also the batch bucket cap).
        normalize: L2-normalise; default: what the model's pooling config says.
        dimensions: Matryoshka truncation (re-normalised if normalising).

    Returns:
        ``[B, H]`` float32 (``[B, dimensions]`` when truncating), in input order.
    """
    if loaded.kind != "embedding":
        raise ValueError(f"encode() needs an embedding model; this is a {loaded.kind}")
    normalize = loaded.pooling.normalize if normalize is None else normalize
    if not len(texts):
        return np.zeros((0, loaded.hidden_size * len(loaded.pooling.modes)), np.float32)
    modes, graphdef, state = loaded.pooling.modes, loaded.graphdef, loaded.state

    def step(ids, mask, types):
        return _embed(graphdef, state, ids, mask, types, modes, normalize)

    out = None
    for idx, vecs, _ in _run_batches(loaded, _tokenize(loaded, texts), batch_size, step):
        out = np.zeros((len(texts), vecs.shape[-1]), np.float32) if out is None else out
        out[idx] = vecs
    return truncate(out, dimensions, normalize)


def score_pairs(loaded: LoadedEncoder, pairs: Sequence[tuple[str, str]], *,
                batch_size: int = 32) -> np.ndarray:
    """Cross-encoder / classifier logits for text pairs.

    Args:
        loaded: A model with a classification head.
        pairs: ``(query, document)`` pairs, tokenized together (segment ids 0/1
            for BERT), truncated longest-first to ``loaded.max_length``.
        batch_size: Rows per compiled step.

    Returns:
        ``[B, num_labels]`` float32 raw logits; callers apply sigmoid/softmax.
    """
    if loaded.kind == "embedding":
        raise ValueError("score_pairs() needs a model with a classification head")
    if not len(pairs):
        return np.zeros((0, loaded.config.num_labels), np.float32)
    firsts, seconds = [a for a, _ in pairs], [b for _, b in pairs]
    return _classify_tokens(loaded, _tokenize(loaded, firsts, seconds), batch_size)


def classify_texts(loaded: LoadedEncoder, texts: Sequence[str] | Sequence[Sequence[int]],
                   *, batch_size: int = 32) -> np.ndarray:
    """Sequence-classification logits for single texts: ``[B, num_labels]``."""
    if loaded.kind == "embedding":
        raise ValueError("classify_texts() needs a model with a classification head")
    if not len(texts):
        return np.zeros((0, loaded.config.num_labels), np.float32)
    return _classify_tokens(loaded, _tokenize(loaded, texts), batch_size)


def _classify_tokens(loaded, tokens, batch_size) -> np.ndarray:
    out = np.zeros((len(tokens), loaded.config.num_labels), np.float32)
    step = functools.partial(classify, loaded.graphdef, loaded.state)
    for idx, logits, _ in _run_batches(loaded, tokens, batch_size, step):
        out[idx] = logits
    return out


def token_embeddings(loaded: LoadedEncoder, texts: Sequence[str] | Sequence[Sequence[int]],
                     *, batch_size: int = 32, normalize: bool = False) -> list[np.ndarray]:
    """Per-token last-layer vectors (ColBERT-style / vLLM ``token_embed``).

    Args:
        loaded: Any loaded encoder.
        texts: Strings or token-id lists (as in ``encode``).
        batch_size: Rows per compiled step.
        normalize: L2-normalise each token vector.

    Returns:
        One ``[L_i, H]`` float32 array per input (real tokens only, special
        tokens included). No ColBERT projection layer is applied.
    """
    result: list[np.ndarray | None] = [None] * len(texts)
    step = functools.partial(encode_hidden, loaded.graphdef, loaded.state)
    for idx, hidden, lengths in _run_batches(loaded, _tokenize(loaded, texts),
                                             batch_size, step):
        for r, i in enumerate(idx):
            vecs = hidden[r, :lengths[r]]
            result[i] = l2_normalize(vecs) if normalize else vecs
    return result
