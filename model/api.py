"""Functional wrappers around ``DecoderLM`` for the engine.

The engine keeps ``(graphdef, state)`` from ``nnx.split`` — or its stacked
form ``model.stacked.stack(graphdef, state)``, whose layers run as one loop —
and jits these functions with ``graphdef`` static and ``state`` / ``kv_cache``
as arguments (donate the cache), so weights are inputs of the compiled step,
not constants. Both forms are accepted everywhere here.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from model.attention import AttentionMetadata, KVCache
from model.config import ModelConfig
from model.decoder import DecoderLM
from model import stacked


def abstract_model(config: ModelConfig, dtype="float32") -> tuple[nnx.GraphDef, nnx.State]:
    """Builds the model structure without allocating weights.

    Returns:
      ``(graphdef, abstract_state)``; the state's leaves are
      ``jax.ShapeDtypeStruct`` (see ``model.weights.state_from_pure`` to fill it).
      Cached per ``(config, dtype)`` (tracing the constructor costs ~0.7 s);
      treat the result as read-only.
    """
    return _abstract_model(config, str(jnp.dtype(dtype)))


@functools.lru_cache(maxsize=16)
def _abstract_model(config: ModelConfig, dtype: str):
    model = nnx.eval_shape(lambda: DecoderLM(config, dtype=dtype, rngs=nnx.Rngs(0)))
    return nnx.split(model)


def forward(graphdef: nnx.GraphDef, state: nnx.State, input_ids: jax.Array,
            positions: jax.Array, kv_cache: KVCache,
            md: AttentionMetadata) -> tuple[jax.Array, KVCache]:
    """``DecoderLM.__call__`` as a pure function: returns ``(hidden [T, hidden], kv_cache)``."""
    if isinstance(graphdef, stacked.LayerScan):
        return stacked.forward(graphdef, state, input_ids, positions, kv_cache, md)
    model = nnx.merge(graphdef, state)
    return model(input_ids, positions, kv_cache, md)


def compute_logits(graphdef: nnx.GraphDef, state: nnx.State, hidden: jax.Array) -> jax.Array:
    """``DecoderLM.compute_logits`` as a pure function: ``[N, hidden] -> [N, vocab]`` float32."""
    if isinstance(graphdef, stacked.LayerScan):
        return stacked.compute_logits(graphdef, state, hidden)
    model = nnx.merge(graphdef, state)
    return model.compute_logits(hidden)
