"""Partition specs for every weight (by its path in the nnx state) and the KV cache.

Megatron-style tensor parallelism over the ``TENSOR`` mesh axis:

=========================  ======================  ===================================
weight (path suffix)       layout                  spec when sharded
=========================  ======================  ===================================
qkv_proj kernel            [hidden, Hkv, G+2, D]   by KV head ``P(None, TENSOR)``
qkv_proj bias              [Hkv, G+2, D]           by KV head ``P(TENSOR)``
o_proj kernel              [Hq*D, hidden]          row-parallel ``P(TENSOR, None)``
gate_up_proj kernel        [hidden, 2, I]          column-parallel ``P(None, None, TENSOR)``
down_proj kernel           [I, hidden]             row-parallel ``P(TENSOR, None)``
embed_tokens embedding     [V, hidden]             vocab-parallel ``P(TENSOR, None)``
lm_head kernel             [hidden, V]             vocab-parallel ``P(None, TENSOR)``
norms, o_proj bias, q/k    any                     replicated ``P()``
norm weights
=========================  ======================  ===================================

q|k|v and gate|up are fused at load (``model/fusion.py``) in layouts that
keep each part on an axis of its own: splitting q|k|v's KV-head axis gives
every device the q heads of its KV heads plus those k and v heads, and
splitting gate|up's intermediate axis gives it the same gate and up columns.

Which groups are sharded depends on divisibility (``ShardingPlan``):

* o_proj is sharded iff ``num_heads % tp == 0`` (``plan.attention``).
* q|k|v and the KV cache's head axis are sharded iff ``heads_split`` (q and
  KV head counts both divide tp); otherwise each device holds every head and
  runs attention for every head. When only the q heads divide tp (8 q / 2 KV
  heads at tp 4), q|k|v stays replicated too: the fused weight can only be
  split by whole KV groups, and attention then runs replicated anyway, so
  the cost is the q weight's memory on every device, not a collective.
  (vLLM instead keeps one copy of a KV head per device when tp exceeds the
  KV head count; here the whole cache is replicated, which costs memory but
  needs no head regrouping.)
* the MLP is sharded iff ``intermediate_size % tp == 0``; the vocabulary iff
  ``vocab_size % tp == 0``.

Row-parallel outputs are summed by an all-reduce that XLA inserts (the mesh
axes are ``AxisType.Auto``); vocab-parallel logits are gathered the same way
before sampling. Attention (the KV-cache write and the paged-attention kernel)
runs inside ``jax.shard_map`` (``sharding/attention.py``), because the Pallas
kernels cannot be auto-partitioned: per-shard heads when ``heads_split``,
replicated otherwise.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sharding.axes import TENSOR

REPLICATED = P()


@dataclasses.dataclass(frozen=True)
class ShardingPlan:
    """What tensor parallelism splits for one model at one tp size.

    Attributes:
      tp: tensor-parallel size.
      attention: the o projection split by q head.
      kv_heads: the fused q|k|v projection and the KV cache split by KV head.
      mlp: gate|up and down split over the intermediate dimension.
      vocab: embedding and lm_head split over the vocabulary.
    """

    tp: int
    attention: bool
    kv_heads: bool
    mlp: bool
    vocab: bool

    @classmethod
    def build(cls, config, tp: int) -> "ShardingPlan":
        """Decides from a ``ModelConfig``'s shapes (see the module docstring)."""
        on = tp > 1
        return cls(tp=tp, attention=on and config.num_heads % tp == 0,
                   kv_heads=heads_split(config.num_heads, config.num_kv_heads, tp),
                   mlp=on and config.intermediate_size % tp == 0,
                   vocab=on and config.vocab_size % tp == 0)

    def describe(self) -> str:
        parts = [f"{name}={'sharded' if getattr(self, name) else 'replicated'}"
                 for name in ("attention", "kv_heads", "mlp", "vocab")]
        return f"tp={self.tp}: " + ", ".join(parts)


def heads_split(num_heads: int, num_kv_heads: int, tp: int) -> bool:
    """Whether attention runs head-split over ``tp`` devices (q and KV heads both divide).

    Otherwise the KV cache is replicated and attention runs replicated on every
    device (``sharding/attention.py``).
    """
    return tp > 1 and num_heads % tp == 0 and num_kv_heads % tp == 0


_COLUMN = P(None, TENSOR)
_ROW = P(TENSOR, None)


def weight_spec(path: tuple, plan: ShardingPlan) -> P:
    """The partition spec of the state leaf at ``path``.

    Args:
      path: e.g. ``("layers", 3, "self_attn", "qkv_proj", "kernel")``.
      plan: the model's ``ShardingPlan``.
    """
    names = [p for p in path if isinstance(p, str)]
    leaf = names[-1]
    module = names[-2] if len(names) >= 2 else ""
    if module == "embed_tokens":
        return _ROW if plan.vocab else REPLICATED
    if module == "lm_head":
        return _COLUMN if plan.vocab else REPLICATED
    if module == "qkv_proj" and plan.kv_heads:  # [hidden, Hkv, G+2, D] / [Hkv, G+2, D]
        return _COLUMN if leaf == "kernel" else P(TENSOR)
    if module == "o_proj" and plan.attention:
        return _ROW if leaf == "kernel" else REPLICATED
    if module == "gate_up_proj" and plan.mlp:  # kernel [hidden, 2, I]; an int8 scale [2, I]
        return P(None, None, TENSOR) if leaf == "kernel" else P(None, TENSOR)
    if module == "down_proj" and plan.mlp:
        return _ROW if leaf == "kernel" else REPLICATED
    return REPLICATED


def kv_cache_spec(plan: ShardingPlan) -> P:
    """Spec of ``KVCache.k``/``.v`` ``[layers, pages, page_size, kv_heads, head_dim]``."""
    return P(None, None, None, TENSOR, None) if plan.kv_heads else REPLICATED


def weight_shardings(plan: ShardingPlan, mesh: Mesh) -> Callable[[tuple], NamedSharding]:
    """``path -> NamedSharding``: the hook ``model.loader.load_model`` places leaves with."""
    return lambda path: NamedSharding(mesh, weight_spec(tuple(path), plan))


def kv_cache_sharding(plan: ShardingPlan, mesh: Mesh) -> NamedSharding:
    """The sharding of both cache arrays, a pytree prefix of ``KVCache`` for ``device_put``/``jit``.

    One sharding rather than a ``KVCache`` of two keeps ``sharding`` free of
    ``model`` imports (the package order is in ``sharding/__init__.py``).
    """
    return NamedSharding(mesh, kv_cache_spec(plan))
