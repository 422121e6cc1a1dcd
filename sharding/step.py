"""Jitting the engine's compiled steps with input and output shardings (pjit semantics).

The step functions take ``(state, kv_cache, *host_inputs)`` and return
``(*host_outputs, kv_cache)``. On a mesh, weights keep the shardings they were
loaded with, the KV cache keeps its own (and stays donated, so it updates in
place shard by shard), and every host input and output (token ids, attention
metadata, sampling tensors, sampled tokens) is replicated: each device — and
each process in a multi-host run — sees the whole batch. The step also stamps
the mesh on its ``AttentionMetadata`` so attention runs per shard under
``shard_map`` (``sharding/attention.py``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def replicated(mesh: Mesh) -> NamedSharding:
    """The fully replicated sharding over ``mesh``."""
    return NamedSharding(mesh, P())


def jit_step(fn: Callable, mesh: Optional[Mesh], state, kv_sharding, *, num_host_inputs: int,
             num_host_outputs: int, donate_argnums=(1,), static_argnames=()):
    """``jax.jit(fn)`` with shardings for ``fn(state, kv, *host_inputs)``.

    Args:
      fn: the step; returns ``(*host_outputs, kv_cache)``.
      mesh: the replica's mesh; None jits with no shardings (one device).
      state: the weights (an ``nnx.State`` of placed arrays); their shardings
        become the state's ``in_shardings``.
      kv_sharding: the cache's sharding (a pytree prefix of ``KVCache``).
      num_host_inputs, num_host_outputs: positional host arguments / leading
        outputs, all replicated.
      donate_argnums, static_argnames: as ``jax.jit``.
    """
    if mesh is None:
        return jax.jit(fn, donate_argnums=donate_argnums, static_argnames=static_argnames)
    fn = _with_mesh(fn, mesh)
    rep = replicated(mesh)
    state_sh = jax.tree.map(lambda a: a.sharding, state)
    return jax.jit(fn, in_shardings=(state_sh, kv_sharding) + (rep,) * num_host_inputs,
                   out_shardings=(rep,) * num_host_outputs + (kv_sharding,),
                   donate_argnums=donate_argnums, static_argnames=static_argnames)


def _with_mesh(fn: Callable, mesh: Mesh) -> Callable:
    """``fn`` with ``mesh`` set on every dataclass host input that has a ``mesh`` field.

    That is ``model.attention.AttentionMetadata`` (matched by its field, so
    ``sharding`` imports nothing from ``model``), at trace time. The runner
    builds metadata without devices (multi-host followers receive it pickled);
    the attention layers read ``md.mesh`` to run under ``shard_map``.
    """

    @functools.wraps(fn)
    def step(state, kv, *host_inputs, **kwargs):
        host_inputs = tuple(dataclasses.replace(a, mesh=mesh) if _has_mesh_field(a) else a
                            for a in host_inputs)
        return fn(state, kv, *host_inputs, **kwargs)
    return step


def _has_mesh_field(value) -> bool:
    return (dataclasses.is_dataclass(value) and not isinstance(value, type)
            and any(f.name == "mesh" for f in dataclasses.fields(value)))


def zeros_sharded(make: Callable, sharding):
    """Runs ``make()`` (e.g. ``KVCache.zeros``) under jit straight into ``sharding``.

    No device ever holds the whole result: each allocates its own shard.
    """
    return jax.jit(make, out_shardings=sharding)()
