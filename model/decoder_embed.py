"""Decoder-only models as embedding models: last-token pooling.

A batch of prompts runs as one ragged prefill over a throwaway paged KV
cache (``model.api.forward``); each sequence's vector is the final-normed
hidden state of its last token, L2-normalised (as vLLM pools decoder
embedding models such as Qwen3-Embedding by default).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from model import api
from model.attention import KVCache
from model.pooling import PoolingConfig, l2_normalize, truncate
from model.ragged import pack_ragged

_PAGE = 16


@dataclasses.dataclass(frozen=True)
class LoadedDecoderEmbedder:
    """A decoder ``LoadedModel`` with the surface the pooling engine reads."""

    loaded: Any  # model.loader.LoadedModel
    pooling: PoolingConfig = PoolingConfig(modes=("last",), normalize=True)
    kind: str = "embedding"
    id2label: dict = dataclasses.field(default_factory=dict)

    @property
    def config(self):
        return self.loaded.config

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    @property
    def max_length(self) -> int:
        return int(min(self.loaded.config.max_position_embeddings or 4096, 4096))

    @property
    def hidden_size(self) -> int:
        return self.loaded.config.hidden_size


def load_decoder_embedder(path, dtype: str = "float32") -> LoadedDecoderEmbedder:
    """Loads a decoder checkpoint (any format ``load_model`` takes) for pooling."""
    from model.loader import load_model
    return LoadedDecoderEmbedder(load_model(path, dtype))


def _pow2(n: int, lo: int = 1) -> int:
    return max(lo, 1 << (max(n, 1) - 1).bit_length())


@functools.partial(jax.jit, static_argnums=(0,))
def _last_hidden(graphdef, state, input_ids, positions, kv, md, last_idx):
    hidden, _ = api.forward(graphdef, state, input_ids, positions, kv, md)
    return hidden[last_idx].astype(jnp.float32)  # [S, hidden]


def _tokenize(tok, inputs: Sequence, max_len: int) -> list[list[int]]:
    out = []
    for x in inputs:
        ids = tok(x)["input_ids"] if isinstance(x, str) else list(x)
        out.append(ids[:max_len] or [tok.eos_token_id or 0])
    return out


def encode(emb: LoadedDecoderEmbedder, inputs: Sequence, *, batch_size: int = 32,
           normalize: bool | None = None, dimensions: int | None = None) -> np.ndarray:
    """Embeds texts or token-id lists: ``[len(inputs), hidden_size]`` float32."""
    normalize = emb.pooling.normalize if normalize is None else normalize
    seqs = _tokenize(emb.tokenizer, inputs, emb.max_length)
    cfg, ld = emb.config, emb.loaded
    dtype = jax.tree.leaves(ld.state)[0].dtype
    out = np.zeros((len(seqs), cfg.hidden_size), np.float32)
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start:start + batch_size]
        num_seqs = _pow2(len(chunk))
        total = _pow2(sum(len(s) for s in chunk), 16)
        pages_per_seq = _pow2(max(-(-len(s) // _PAGE) for s in chunk))
        num_pages = 1 + num_seqs * pages_per_seq
        batch = pack_ragged(
            chunk, [0] * len(chunk),
            [1 + i * pages_per_seq + np.arange(pages_per_seq) for i in range(len(chunk))],
            page_size=_PAGE, num_tokens=total, num_seqs=num_seqs, pages_per_seq=pages_per_seq,
            max_q_len=_pow2(max(map(len, chunk))))
        kv = KVCache.zeros(cfg.num_layers, num_pages, _PAGE, cfg.num_kv_heads, cfg.head_dim,
                           dtype)
        vecs = np.asarray(_last_hidden(ld.graphdef, ld.state, batch.input_ids,
                                       batch.positions, kv, batch.metadata,
                                       batch.logits_indices))
        out[start:start + len(chunk)] = vecs[:len(chunk)]
    if dimensions is not None:
        return np.asarray(truncate(out, dimensions, normalize))
    return np.asarray(l2_normalize(out)) if normalize else out
