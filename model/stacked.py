"""The decoder's layers as a loop over stacked weights (what the engine compiles).

``DecoderLM.__call__`` unrolls its layers in Python, so tracing, lowering and
compiling a step costs as many layers as the model has (30 for SmolLM2). The
engine instead keeps the weights in a *stacked* form: layers whose module
structure is equal (same graphdef: same shapes, dtypes, quantized modules,
sliding window and RoPE base) are stacked on a leading axis and run by one
``jax.lax.fori_loop``. Gemma 3's five-local-one-global pattern is a *period*
of six: the loop body runs six layers, each with its own static settings; the
layers past the last whole period run unrolled after the loop.

Numerics are those of the unrolled forward (same modules, same order); the
layer index is a traced int32 that picks the layer's slice of the stacked KV
cache, which the loop carries (and updates in place, the cache being donated).

    scan, params = stack(graphdef, state)      # once, at load / weight swap
    hidden, kv = forward(scan, params, ids, positions, kv, md)
    graphdef, state = unstack(scan, params)    # the module form again
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from model.attention import AttentionMetadata, KVCache


class InPlace(nnx.Param):
    """A weight whose kernel reads it straight from its stack (``[groups, ...]``).

    Inside the loop every other weight is sliced (``a[g]``), which XLA copies
    when the consumer is a custom call (the C++ int8 kernel): ~10 ms per
    SmolLM2 step. A module whose kernel takes a stack and a layer index
    stores its weights as ``InPlace`` and calls ``stack_index()`` for the
    index when its weight has the extra leading axis.
    """


_STACK_INDEX: list = []  # trace-time: the loop index of the body being traced


def stack_index():
    """The traced group index inside the layer loop's body (None outside it)."""
    return _STACK_INDEX[-1] if _STACK_INDEX else None


@dataclasses.dataclass(frozen=True)
class LayerScan:
    """Static structure of a stacked model (hashable: a jit static argument).

    rest: graphdef of the model without its layers (embedding, final norm, head).
    body: graphdefs of one period of layers (the loop body runs them in order).
    num_groups: loop trip count; layer ``g * period + j`` is body ``j`` of trip ``g``.
    tail: graphdefs of the layers after the last whole period (run unrolled).
    """

    rest: Any
    body: tuple
    num_groups: int
    tail: tuple

    @property
    def period(self) -> int:
        return len(self.body)

    @property
    def num_layers(self) -> int:
        return self.num_groups * self.period + len(self.tail)


def _period(graphdefs: list) -> int:
    """Smallest p with graphdefs[i] == graphdefs[i + p] for every i (len when none)."""
    n = len(graphdefs)
    for p in range(1, n + 1):
        if all(graphdefs[i] == graphdefs[i + p] for i in range(n - p)):
            return p
    return n


def _split_layers(graphdef, state):
    model = nnx.merge(graphdef, state)
    layers = list(model.layers)
    model.layers = nnx.List([])
    rest_gd, rest_state = nnx.split(model)
    splits = [nnx.split(layer, InPlace, ...) for layer in layers]
    return rest_gd, rest_state, [g for g, *_ in splits], [tuple(s) for _, *s in splits]


def _stack_leaves(leaves: list, donate: bool):
    """One stacked array from per-layer arrays, sharded as they are plus a leading None."""
    first = leaves[0]
    if isinstance(first, jax.ShapeDtypeStruct):  # abstract weights (export, eval_shape)
        return jax.ShapeDtypeStruct((len(leaves), *first.shape), first.dtype)
    sharding = getattr(first, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding) and sharding.mesh.size > 1:
        spec = jax.sharding.PartitionSpec(None, *sharding.spec)
        out = jax.jit(lambda *xs: jnp.stack(xs),
                      out_shardings=jax.sharding.NamedSharding(sharding.mesh, spec))(*leaves)
    else:
        out = jnp.stack(leaves)
    if donate:
        for leaf in leaves:
            if isinstance(leaf, jax.Array) and not leaf.is_deleted():
                leaf.delete()
    return out


def stack(graphdef, state, *, donate: bool = False) -> tuple[LayerScan, dict]:
    """The stacked form of a ``DecoderLM``'s ``(graphdef, state)``.

    Args:
      graphdef, state: from ``nnx.split`` (arrays placed as they will serve).
      donate: delete each per-layer array once stacked (peak memory: the model
        plus one weight's stack, not two models); the caller must not use
        ``state`` afterwards.

    Returns:
      ``(scan, params)``: ``params = {"rest": State, "body": ((InPlace, other),)
      * period, "tail": ((InPlace, other),) * len(tail)}``: each layer's state
      split into its ``InPlace`` weights and the others; body states have a
      leading axis of ``num_groups``.
    """
    rest_gd, rest_state, gds, states = _split_layers(graphdef, state)
    period = _period(gds) if gds else 1
    num_groups = len(gds) // period
    body = []
    for j in range(period if num_groups else 0):
        group = [states[g * period + j] for g in range(num_groups)]
        body.append(jax.tree.map(lambda *xs: _stack_leaves(list(xs), donate), *group))
    tail_start = num_groups * period
    scan = LayerScan(rest=rest_gd, body=tuple(gds[:period]) if num_groups else (),
                     num_groups=num_groups, tail=tuple(gds[tail_start:]))
    return scan, {"rest": rest_state, "body": tuple(body), "tail": tuple(states[tail_start:])}


def unstack(scan: LayerScan, params: dict):
    """The module form ``(graphdef, state)`` of stacked weights (copies the layer slices)."""
    model = nnx.merge(scan.rest, params["rest"])
    layers = []
    for g in range(scan.num_groups):
        for j, gd in enumerate(scan.body):
            layers.append(nnx.merge(gd, *jax.tree.map(lambda a: a[g], params["body"][j])))
    layers += [nnx.merge(gd, *st) for gd, st in zip(scan.tail, params["tail"])]
    model.layers = nnx.List(layers)
    return nnx.split(model)


def map_params(fn: Callable, params: dict) -> dict:
    """``params`` with ``fn`` applied to every array (e.g. ``jax.device_get``)."""
    return jax.tree.map(fn, params)


def forward(scan: LayerScan, params: dict, input_ids: jax.Array, positions: jax.Array,
            kv_cache: KVCache, md: AttentionMetadata,
            rest_model: Optional[Any] = None) -> tuple[jax.Array, KVCache]:
    """``DecoderLM.__call__`` on stacked weights: ``(hidden [T, hidden], kv_cache)``."""
    model = rest_model if rest_model is not None else nnx.merge(scan.rest, params["rest"])
    x = model.embed(input_ids)

    def run(gd, st, x, kv, layer, rope_cache):
        return nnx.merge(gd, *st)(x, positions, kv, md, rope_cache, layer=layer)

    if scan.num_groups:
        def body(g, carry):
            x, kv = carry
            rope_cache: dict = {}
            _STACK_INDEX.append(g)
            try:
                for j, gd in enumerate(scan.body):
                    in_place, other = params["body"][j]
                    st = (in_place, jax.tree.map(lambda a: a[g], other))
                    x, kv = run(gd, st, x, kv, g * scan.period + j, rope_cache)
            finally:
                _STACK_INDEX.pop()
            return x, kv

        x, kv_cache = jax.lax.fori_loop(0, scan.num_groups, body, (x, kv_cache))
    rope_cache: dict = {}
    start = scan.num_groups * scan.period
    for j, (gd, st) in enumerate(zip(scan.tail, params["tail"])):
        x, kv_cache = run(gd, st, x, kv_cache, start + j, rope_cache)
    return model.norm(x), kv_cache


def compute_logits(scan: LayerScan, params: dict, hidden: jax.Array) -> jax.Array:
    """``DecoderLM.compute_logits`` on stacked weights: ``[N, hidden] -> [N, vocab]`` f32."""
    return nnx.merge(scan.rest, params["rest"]).compute_logits(hidden)
