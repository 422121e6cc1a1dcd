"""A BERT-family encoder (BERT, RoBERTa, XLM-RoBERTa) in Flax NNX.

The model runs on a right- or left-padded batch and returns one hidden vector
per token; the pooling models built on it (embeddings, cross-encoders,
sequence classifiers) add a pooler and a classification head on top.

The jitted entry points are plain functions of ``(graphdef, state, inputs)``
(the ``nnx.split`` / ``nnx.merge`` pattern), so the weights are an argument
of the compiled step rather than constants baked into it::

    graphdef, state = nnx.split(BertEncoder(config, rngs=nnx.Rngs(0)))
    hidden = encode_hidden(graphdef, state, input_ids, attention_mask, token_type_ids)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

_ACTIVATIONS = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_fast": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Hyper-parameters of a BERT-family encoder (mirrors ``BertConfig``).

    Attributes:
        vocab_size: Rows of the word-embedding table.
        hidden_size: Model width H.
        num_hidden_layers: Number of transformer layers.
        num_attention_heads: Heads per layer; ``hidden_size`` must divide evenly.
        intermediate_size: Width of the MLP.
        max_position_embeddings: Rows of the position-embedding table.
        type_vocab_size: Rows of the token-type table.
        layer_norm_eps: LayerNorm epsilon.
        hidden_act: Hugging Face activation name (``"gelu"`` is the exact erf GELU).
        pad_token_id: Padding token id.
        position_offset: 0 for BERT (positions ``0..L-1``); for RoBERTa and
            XLM-RoBERTa ``pad_token_id + 1``: positions count non-pad tokens
            starting there and pad tokens sit at ``pad_token_id``.
        add_pooler: Whether the checkpoint has a pooler (dense + tanh on CLS).
        num_labels: Outputs of the sequence-classification head; 0 = no head.
        classifier_style: ``"bert"`` (linear on the pooled output) or
            ``"roberta"`` (dense + tanh + linear on the CLS hidden state).
        model_type: The Hugging Face ``model_type`` this came from.
    """

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pad_token_id: int = 0
    position_offset: int = 0
    add_pooler: bool = False
    num_labels: int = 0
    classifier_style: str = "bert"
    model_type: str = "bert"

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r}; "
                             f"known: {sorted(_ACTIVATIONS)}")
        if self.classifier_style not in ("bert", "roberta"):
            raise ValueError(f"unknown classifier_style {self.classifier_style!r}")
        if self.num_labels and self.classifier_style == "bert" and not self.add_pooler:
            raise ValueError("a BERT classification head needs the pooler")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def max_tokens(self) -> int:
        """Longest input the position table allows (RoBERTa loses its offset)."""
        return self.max_position_embeddings - self.position_offset

    @classmethod
    def from_hf(cls, hf: dict[str, Any], *, add_pooler: bool | None = None,
                num_labels: int | None = None) -> "EncoderConfig":
        """Builds a config from a Hugging Face ``config.json`` dict.

        Args:
            hf: The parsed ``config.json``.
            add_pooler: Override pooler presence (the loader sets it from the
                weights it finds); default: present for classifiers.
            num_labels: Override the head size; default: from ``architectures``
                (a ``*ForSequenceClassification`` gets ``len(id2label)`` or
                ``num_labels``; anything else gets no head).
        """
        model_type = hf.get("model_type", "bert")
        if model_type not in ("bert", "roberta", "xlm-roberta", "camembert"):
            raise ValueError(f"unsupported encoder model_type {model_type!r}")
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only absolute position embeddings are supported, got "
                             f"{hf.get('position_embedding_type')!r}")
        is_roberta = model_type != "bert"
        pad = hf.get("pad_token_id")
        pad = int(pad) if pad is not None else (1 if is_roberta else 0)
        archs = hf.get("architectures") or []
        is_classifier = any(a.endswith("ForSequenceClassification") for a in archs)
        if num_labels is None:
            num_labels = 0
            if is_classifier:
                num_labels = len(hf.get("id2label") or {}) or int(hf.get("num_labels", 2))
        style = "roberta" if is_roberta else "bert"
        if add_pooler is None:
            add_pooler = bool(num_labels) and style == "bert"
        return cls(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=hf["num_attention_heads"],
            intermediate_size=hf["intermediate_size"],
            max_position_embeddings=hf.get("max_position_embeddings", 512),
            type_vocab_size=hf.get("type_vocab_size", 2),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
            hidden_act=hf.get("hidden_act", "gelu"), pad_token_id=pad,
            position_offset=pad + 1 if is_roberta else 0, add_pooler=add_pooler,
            num_labels=num_labels, classifier_style=style, model_type=model_type)


def position_ids(config: EncoderConfig, input_ids: jax.Array,
                 attention_mask: jax.Array) -> jax.Array:
    """Position ids as Hugging Face computes them.

    Args:
        config: The encoder config.
        input_ids: ``[B, L]`` int32 token ids.
        attention_mask: ``[B, L]`` 1 for real tokens, 0 for padding.

    Returns:
        ``[B, L]`` int32. BERT: ``0..L-1`` counted over real tokens (equal to
        ``arange(L)`` for right padding, also correct for left padding).
        RoBERTa: HF's ``create_position_ids_from_input_ids`` — cumulative count
        of non-pad tokens plus ``pad_token_id``; pad tokens get ``pad_token_id``.
    """
    if config.position_offset:
        real = (input_ids != config.pad_token_id).astype(jnp.int32)
        return jnp.cumsum(real, axis=1) * real + config.pad_token_id
    real = attention_mask.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(real, axis=1) - 1, 0)


class Embeddings(nnx.Module):
    """Word + position + token-type embeddings, then LayerNorm."""

    def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
        self.config = config
        h = config.hidden_size
        self.word = nnx.Embed(config.vocab_size, h, rngs=rngs)
        self.position = nnx.Embed(config.max_position_embeddings, h, rngs=rngs)
        self.token_type = nnx.Embed(config.type_vocab_size, h, rngs=rngs)
        self.norm = nnx.LayerNorm(h, epsilon=config.layer_norm_eps, rngs=rngs)

    def __call__(self, input_ids, attention_mask, token_type_ids):
        """``[B, L]`` ids, mask, types -> ``[B, L, H]``."""
        pos = position_ids(self.config, input_ids, attention_mask)
        x = self.word(input_ids) + self.token_type(token_type_ids) + self.position(pos)
        return self.norm(x)


class Layer(nnx.Module):
    """One post-LN transformer layer: self-attention then a GELU MLP."""

    def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
        h, eps = config.hidden_size, config.layer_norm_eps
        self.num_heads = config.num_attention_heads
        self.act = _ACTIVATIONS[config.hidden_act]
        self.query = nnx.Linear(h, h, rngs=rngs)
        self.key = nnx.Linear(h, h, rngs=rngs)
        self.value = nnx.Linear(h, h, rngs=rngs)
        self.attn_out = nnx.Linear(h, h, rngs=rngs)
        self.attn_norm = nnx.LayerNorm(h, epsilon=eps, rngs=rngs)
        self.mlp_in = nnx.Linear(h, config.intermediate_size, rngs=rngs)
        self.mlp_out = nnx.Linear(config.intermediate_size, h, rngs=rngs)
        self.mlp_norm = nnx.LayerNorm(h, epsilon=eps, rngs=rngs)

    def __call__(self, x: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """``x [B, L, H]``, ``attention_mask [B, L]`` -> ``[B, L, H]``."""
        b, l, h = x.shape
        d = h // self.num_heads
        split = lambda t: t.reshape(b, l, self.num_heads, d)  # noqa: E731
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        # [B, heads, Lq, Lk]; softmax in float32 whatever the weights' dtype.
        scores = jnp.einsum("bqnd,bknd->bnqk", q, k).astype(jnp.float32) / jnp.sqrt(d)
        keep = attention_mask[:, None, None, :].astype(bool)
        scores = jnp.where(keep, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        ctx = jnp.einsum("bnqk,bknd->bqnd", probs, v).reshape(b, l, h)
        x = self.attn_norm(x + self.attn_out(ctx))
        return self.mlp_norm(x + self.mlp_out(self.act(self.mlp_in(x))))


class BertEncoder(nnx.Module):
    """BERT-family encoder with an optional pooler and classification head.

    Attributes mirror ``BertModel`` / ``BertForSequenceClassification`` /
    ``RobertaForSequenceClassification``; ``model/encoder_loader.py`` maps the
    Hugging Face weight names onto them.
    """

    def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
        self.config = config
        h = config.hidden_size
        self.embeddings = Embeddings(config, rngs=rngs)
        self.layers = nnx.List([Layer(config, rngs=rngs)
                                for _ in range(config.num_hidden_layers)])
        self.pooler = nnx.Linear(h, h, rngs=rngs) if config.add_pooler else None
        labels, roberta_head = config.num_labels, config.classifier_style == "roberta"
        self.classifier_dense = (nnx.Linear(h, h, rngs=rngs)
                                 if labels and roberta_head else None)
        self.classifier = nnx.Linear(h, labels, rngs=rngs) if labels else None

    def __call__(self, input_ids, attention_mask, token_type_ids) -> jax.Array:
        """Hidden states.

        Args:
            input_ids: ``[B, L]`` int32.
            attention_mask: ``[B, L]`` int, 1 = real token.
            token_type_ids: ``[B, L]`` int32 segment ids.

        Returns:
            ``[B, L, H]`` last-layer hidden states (padding rows are garbage).
        """
        x = self.embeddings(input_ids, attention_mask, token_type_ids)
        for layer in self.layers:
            x = layer(x, attention_mask)
        return x

    def pooled(self, hidden: jax.Array) -> jax.Array:
        """``[B, L, H]`` -> ``[B, H]``: tanh(dense(CLS)), HF's ``pooler_output``."""
        if self.pooler is None:
            raise ValueError("this checkpoint has no pooler")
        return jnp.tanh(self.pooler(hidden[:, 0]))

    def logits(self, hidden: jax.Array) -> jax.Array:
        """``[B, L, H]`` -> ``[B, num_labels]`` sequence-classification logits."""
        if self.classifier is None:
            raise ValueError("this checkpoint has no classification head")
        if self.classifier_dense is not None:  # RobertaClassificationHead
            return self.classifier(jnp.tanh(self.classifier_dense(hidden[:, 0])))
        return self.classifier(self.pooled(hidden))


def init_encoder(config: EncoderConfig, *, seed: int = 0, abstract: bool = False,
                 dtype: str = "float32") -> tuple[nnx.GraphDef, nnx.State]:
    """Builds an encoder and splits it into ``(graphdef, state)``.

    Args:
        config: The encoder config.
        seed: Seed for random initialisation.
        abstract: If True, the state holds ``ShapeDtypeStruct`` placeholders
            (no memory, for loaders that fill in real weights).
        dtype: Parameter dtype name (``float32``, ``bfloat16``, ``float16``).
    """
    build = lambda: BertEncoder(config, rngs=nnx.Rngs(seed))  # noqa: E731
    model = nnx.eval_shape(build) if abstract else build()
    graphdef, state = nnx.split(model)
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; known: {sorted(DTYPES)}")
    if dtype != "float32" and not abstract:
        state = jax.tree.map(lambda a: a.astype(DTYPES[dtype]), state)
    return graphdef, state


@functools.partial(jax.jit, static_argnums=0)
def encode_hidden(graphdef: nnx.GraphDef, state: nnx.State, input_ids: jax.Array,
                  attention_mask: jax.Array, token_type_ids: jax.Array) -> jax.Array:
    """Jitted forward: ``[B, L]`` ids/mask/types -> ``[B, L, H]`` float32."""
    model = nnx.merge(graphdef, state)
    return model(input_ids, attention_mask, token_type_ids).astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=0)
def classify(graphdef: nnx.GraphDef, state: nnx.State, input_ids: jax.Array,
             attention_mask: jax.Array, token_type_ids: jax.Array) -> jax.Array:
    """Jitted forward + head: ``[B, L]`` inputs -> ``[B, num_labels]`` float32 logits."""
    model = nnx.merge(graphdef, state)
    hidden = model(input_ids, attention_mask, token_type_ids)
    return model.logits(hidden).astype(jnp.float32)
