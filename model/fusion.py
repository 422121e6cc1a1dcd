"""q|k|v and gate|up fused into one weight each, at load time.

Checkpoints (Hugging Face folders, GGUF files, converted Orbax folders) keep
q, k, v and gate, up as separate tensors: the *checkpoint layout*, the paths
``model/weights.py``'s name map targets (``("layers", 3, "self_attn",
"q_proj", "kernel")``, ``[in, out]``). The model holds them fused, so each
group is one matmul (one read of the activations, one GEMM launch):

=====================  ==================================  ===========================
model leaf             shape                               parts on axis -2
=====================  ==================================  ===========================
self_attn.qkv_proj     kernel [hidden, Hkv, G + 2, D],     ``[0, G)`` q, ``G`` k,
                       bias [Hkv, G + 2, D]                ``G + 1`` v  (G = Hq // Hkv)
mlp.gate_up_proj       kernel [hidden, 2, I]               ``0`` gate, ``1`` up
=====================  ==================================  ===========================

Both layouts keep each part's heads / columns on an axis of their own, so
tensor parallelism can split that axis and every device's slice still holds
its own q, k and v heads (q|k|v is grouped by KV head: group ``g`` holds the
G query heads that read KV head ``g``, then ``k_g``, then ``v_g``) or the same
columns of gate and up (``sharding/specs.py``). At tp 1 the memory order is
that of a plain concatenation (``[gate | up]``; per KV group ``[q | k | v]``),
so XLA runs the same ``[hidden, N]`` GEMM.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Mapping

import numpy as np

from model.config import ModelConfig

Path = tuple  # e.g. ("layers", 3, "self_attn", "q_proj", "kernel")


@dataclasses.dataclass(frozen=True)
class Part:
    """Where one checkpoint tensor sits in its fused model leaf.

    Attributes:
      name: its path under a layer in the checkpoint layout, e.g.
        ``("self_attn", "q_proj", "kernel")``.
      fused: the fused leaf's path under the layer, e.g.
        ``("self_attn", "qkv_proj", "kernel")``.
      start, stop: its range on the fused leaf's part axis (axis -2).
      tail: its trailing dims in the fused layout: ``(Hkv, n, D)`` or ``(1, I)``.
    """

    name: tuple
    fused: tuple
    start: int
    stop: int
    tail: tuple

    def index(self, ndim: int) -> tuple:
        """The index of this part in a fused leaf of ``ndim`` dimensions."""
        return (slice(None),) * (ndim - 2) + (slice(self.start, self.stop), slice(None))

    def to_fused(self, array: np.ndarray) -> np.ndarray:
        """``[..., N]`` (checkpoint layout) -> ``[..., *tail]``."""
        return array.reshape(array.shape[:-1] + self.tail)

    def checkpoint_shape(self, fused_shape: tuple) -> tuple:
        """This part's checkpoint shape, from its fused leaf's shape."""
        lead = tuple(fused_shape[:len(fused_shape) - len(self.tail)])
        return lead + (math.prod(self.tail),)


@functools.lru_cache(maxsize=32)
def parts(config: ModelConfig) -> dict[tuple, Part]:
    """Every fused part of one layer, by its checkpoint name (biases included)."""
    g, hkv, d, inter = (config.num_heads // config.num_kv_heads, config.num_kv_heads,
                        config.head_dim, config.intermediate_size)
    out = {}
    for leaf in ("kernel", "bias"):
        for proj, start, n in (("q_proj", 0, g), ("k_proj", g, 1), ("v_proj", g + 1, 1)):
            name = ("self_attn", proj, leaf)
            out[name] = Part(name, ("self_attn", "qkv_proj", leaf), start, start + n, (hkv, n, d))
    for proj, start in (("gate_proj", 0), ("up_proj", 1)):
        name = ("mlp", proj, "kernel")
        out[name] = Part(name, ("mlp", "gate_up_proj", "kernel"), start, start + 1, (1, inter))
    return out


def locate(config: ModelConfig, path: Path) -> tuple[Path, Part | None]:
    """A checkpoint path -> ``(model path, its Part)``; unfused leaves: ``(path, None)``."""
    if len(path) > 2 and path[0] == "layers":
        part = parts(config).get(tuple(path[2:]))
        if part is not None:
            return tuple(path[:2]) + part.fused, part
    return tuple(path), None


def checkpoint_shapes(config: ModelConfig, shapes: Mapping[Path, tuple]) -> dict[Path, tuple]:
    """Model-layout ``{path: shape}`` -> the checkpoint layout's ``{path: shape}``."""
    by_fused: dict[tuple, list[Part]] = {}
    for part in parts(config).values():
        by_fused.setdefault(part.fused, []).append(part)
    out = {}
    for path, shape in shapes.items():
        group = by_fused.get(tuple(path[2:])) if path[0] == "layers" else None
        if group is None:
            out[tuple(path)] = tuple(shape)
            continue
        for part in group:
            out[tuple(path[:2]) + part.name] = part.checkpoint_shape(tuple(shape))
    return out


def fuse(config: ModelConfig, flat: Mapping[Path, np.ndarray]) -> dict[Path, np.ndarray]:
    """Checkpoint-layout ``{path: array}`` -> model layout (parts concatenated).

    Every part of a fused leaf must be present; each fused leaf takes the
    dtype of its first part.
    """
    out: dict[Path, np.ndarray] = {}
    groups: dict[Path, list[tuple[Part, np.ndarray]]] = {}
    for path, value in flat.items():
        target, part = locate(config, path)
        if part is None:
            out[target] = value
        else:
            groups.setdefault(target, []).append((part, np.asarray(value)))
    for target, members in groups.items():
        members.sort(key=lambda m: m[0].start)
        dtype = members[0][1].dtype
        out[target] = np.concatenate([p.to_fused(a).astype(dtype, copy=False)
                                      for p, a in members], axis=-2)
    return out


def unfuse(config: ModelConfig, flat: Mapping[Path, np.ndarray]) -> dict[Path, np.ndarray]:
    """Model-layout ``{path: array}`` -> checkpoint layout (the inverse of ``fuse``)."""
    fused_names = {part.fused for part in parts(config).values()}
    out: dict[Path, np.ndarray] = {}
    for path, value in flat.items():
        if path[0] != "layers" or tuple(path[2:]) not in fused_names:
            out[tuple(path)] = value
            continue
        value = np.asarray(value)
        for part in parts(config).values():
            if part.fused == tuple(path[2:]):
                piece = value[part.index(value.ndim)]
                out[tuple(path[:2]) + part.name] = piece.reshape(
                    part.checkpoint_shape(value.shape))
    return out
