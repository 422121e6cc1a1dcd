"""Hugging Face tensor names <-> paths in the ``DecoderLM`` state (gpt-fast style).

``GLOBAL_WEIGHT_MAP`` / ``LAYER_WEIGHT_MAP`` are the whole conversion: each
Hugging Face name (``{}`` = layer index) maps to a path in the *checkpoint
layout* and whether the tensor is transposed (Hugging Face linears are
``[out, in]``; ours are ``[in, out]``). Entries that a config does not use
(biases, q/k norms, Gemma's extra norms, ``lm_head`` when embeddings are tied)
are dropped by ``hf_names``.

The checkpoint layout keeps q, k, v and gate, up apart (it is also what
converted Orbax folders store); ``state_from_pure`` fuses them into the
model's ``qkv_proj`` / ``gate_up_proj`` leaves (``model/fusion.py``) while
placing the state, and ``apply_update`` writes a partial update (q alone, say)
into its slice of the fused leaf.
"""

from __future__ import annotations

import functools
import logging
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model import fusion
from model.config import ModelConfig

logger = logging.getLogger(__name__)

Path = tuple  # e.g. ("layers", 3, "self_attn", "q_proj", "kernel")

# hf name -> (checkpoint path under the model or a layer, transpose)
GLOBAL_WEIGHT_MAP: dict[str, tuple[Path, bool]] = {
    "model.embed_tokens.weight": (("embed_tokens", "embedding"), False),
    "model.norm.weight": (("norm", "weight"), False),
    "lm_head.weight": (("lm_head", "kernel"), True),
}
LAYER_WEIGHT_MAP: dict[str, tuple[Path, bool]] = {
    "model.layers.{}.self_attn.q_proj.weight": (("self_attn", "q_proj", "kernel"), True),
    "model.layers.{}.self_attn.k_proj.weight": (("self_attn", "k_proj", "kernel"), True),
    "model.layers.{}.self_attn.v_proj.weight": (("self_attn", "v_proj", "kernel"), True),
    "model.layers.{}.self_attn.o_proj.weight": (("self_attn", "o_proj", "kernel"), True),
    "model.layers.{}.self_attn.q_proj.bias": (("self_attn", "q_proj", "bias"), False),
    "model.layers.{}.self_attn.k_proj.bias": (("self_attn", "k_proj", "bias"), False),
    "model.layers.{}.self_attn.v_proj.bias": (("self_attn", "v_proj", "bias"), False),
    "model.layers.{}.self_attn.o_proj.bias": (("self_attn", "o_proj", "bias"), False),
    "model.layers.{}.self_attn.q_norm.weight": (("self_attn", "q_norm", "weight"), False),
    "model.layers.{}.self_attn.k_norm.weight": (("self_attn", "k_norm", "weight"), False),
    "model.layers.{}.mlp.gate_proj.weight": (("mlp", "gate_proj", "kernel"), True),
    "model.layers.{}.mlp.up_proj.weight": (("mlp", "up_proj", "kernel"), True),
    "model.layers.{}.mlp.down_proj.weight": (("mlp", "down_proj", "kernel"), True),
    "model.layers.{}.input_layernorm.weight": (("input_layernorm", "weight"), False),
    "model.layers.{}.post_attention_layernorm.weight": (("post_attention_layernorm", "weight"), False),
    "model.layers.{}.pre_feedforward_layernorm.weight": (("pre_feedforward_layernorm", "weight"), False),
    "model.layers.{}.post_feedforward_layernorm.weight": (("post_feedforward_layernorm", "weight"), False),
}


class WeightShapeError(ValueError):
    """A checkpoint tensor's shape does not match the model config."""

    def __init__(self, name: str, expected: tuple, actual: tuple):
        self.name, self.expected, self.actual = name, tuple(expected), tuple(actual)
        super().__init__(f"tensor {name!r} has shape {self.actual}, expected {self.expected} "
                         "from the model config")


class _NamesError(KeyError):
    """A KeyError about a list of tensor names; shows the first ``_SHOWN`` of them."""

    _SHOWN = 8

    def __init__(self, names: list[str]):
        self.names = names
        n = self._SHOWN
        shown = ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")
        super().__init__(self._message(shown))

    def _message(self, shown: str) -> str:
        raise NotImplementedError

    def __str__(self):
        return self.args[0]


class MissingWeightError(_NamesError):
    """The checkpoint lacks tensors the model config needs."""

    def _message(self, shown: str) -> str:
        return f"checkpoint is missing {len(self.names)} tensor(s) the config needs: {shown}"


@functools.lru_cache(maxsize=16)
def _flat_abstract(config: ModelConfig, dtype) -> dict[Path, jax.ShapeDtypeStruct]:
    """The model's state leaves (fused layout): ``{path: ShapeDtypeStruct}``."""
    from model.api import abstract_model  # local: api imports the decoder

    _, abstract = abstract_model(config, dtype)
    return {tuple(p): v.get_value() if hasattr(v, "get_value") else v.value
            for p, v in nnx.to_flat_state(abstract)}


@functools.lru_cache(maxsize=16)
def checkpoint_shapes(config: ModelConfig) -> dict[Path, tuple]:
    """Every leaf of the checkpoint layout (q, k, v, gate, up apart) -> its shape."""
    return fusion.checkpoint_shapes(
        config, {p: tuple(v.shape) for p, v in _flat_abstract(config, "float32").items()})


def hf_names(config: ModelConfig) -> dict[str, tuple[Path, bool]]:
    """Every Hugging Face tensor name this config needs -> ``(checkpoint path, transpose)``."""
    paths = checkpoint_shapes(config)
    names: dict[str, tuple[Path, bool]] = {}
    for hf, (path, transpose) in GLOBAL_WEIGHT_MAP.items():
        if path in paths:
            names[hf] = (path, transpose)
    for i in range(config.num_layers):
        for hf, (sub, transpose) in LAYER_WEIGHT_MAP.items():
            path = ("layers", i) + sub
            if path in paths:
                names[hf.format(i)] = (path, transpose)
    missing = set(paths) - {p for p, _ in names.values()}
    assert not missing, f"checkpoint paths without a Hugging Face name: {sorted(missing)}"
    return names


def pure_from_hf(config: ModelConfig, tensors: Mapping[str, np.ndarray]) -> dict:
    """Renames and transposes Hugging Face tensors into a nested pure dict.

    Returns:
      ``{"layers": {0: {"self_attn": {"q_proj": {"kernel": array}}}}, ...}``
      of numpy arrays (dtype unchanged) in the checkpoint layout (unfused).

    Raises:
      MissingWeightError: tensors the config needs are absent.
    """
    names = hf_names(config)
    missing = [n for n in names if n not in tensors]
    if missing:
        raise MissingWeightError(missing)
    extra = [n for n in tensors if n not in names]
    if extra:
        logger.debug("ignoring %d unused checkpoint tensors, e.g. %s", len(extra), extra[:3])
    pure: dict = {}
    for hf, (path, transpose) in names.items():
        array = np.asarray(tensors[hf])
        if transpose:
            if array.ndim != 2:
                raise WeightShapeError(hf, ("2-D",), array.shape)
            array = array.T
        node = pure
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = array
    return pure


class UnknownWeightError(_NamesError):
    """A tensor name that no parameter of the model config answers to."""

    _SHOWN = 5

    def _message(self, shown: str) -> str:
        return f"unknown parameter name(s) for this model: {shown}"


# names a checkpoint may carry that no parameter needs (vLLM/LMDeploy skip them too)
_SKIPPED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


def paths_from_hf_update(config: ModelConfig, tensors: Mapping[str, np.ndarray]
                         ) -> dict[Path, np.ndarray]:
    """Checks a partial set of Hugging Face tensors and maps them onto checkpoint paths.

    For run-time weight updates: any subset of the model's tensors may come,
    each under its Hugging Face name (``LAYER_WEIGHT_MAP``), in the Hugging
    Face layout (linears ``[out, in]``). ``lm_head.weight`` of a model with tied
    embeddings and rotary caches are ignored. Write the result into a state
    with ``apply_update`` (q, k, v, gate and up land in their slices of the
    fused leaves).

    Returns:
      ``{checkpoint path: numpy array in our layout}`` (dtype unchanged).

    Raises:
      UnknownWeightError: a name the config has no parameter for.
      WeightShapeError: a tensor whose shape differs from the parameter's.
    """
    names = hf_names(config)
    shapes = checkpoint_shapes(config)
    unknown = [n for n in tensors if n not in names and not n.endswith(_SKIPPED_SUFFIXES)
               and not (n == "lm_head.weight" and config.tie_word_embeddings)]
    if unknown:
        raise UnknownWeightError(unknown)
    out: dict[Path, np.ndarray] = {}
    for hf, array in tensors.items():
        if hf not in names:
            continue
        path, transpose = names[hf]
        spec = shapes[path]
        expected = spec[::-1] if transpose else spec
        if tuple(array.shape) != expected:
            raise WeightShapeError(hf, expected, array.shape)
        out[path] = array.T if transpose else array
    return out


def apply_update(config: ModelConfig, state: nnx.State, updates: Mapping[Path, np.ndarray]
                 ) -> nnx.State:
    """A new state with ``updates`` (from ``paths_from_hf_update``) written in.

    Whole leaves are replaced; a part of a fused leaf (q, k, v, gate, up) is
    written into its slice, the rest of the leaf kept. Each new leaf keeps the
    old one's dtype and sharding; ``state`` itself is not changed.
    """
    whole: dict[Path, np.ndarray] = {}
    sliced: dict[Path, list] = {}
    for path, value in updates.items():
        target, part = fusion.locate(config, tuple(path))
        if part is None:
            whole[target] = value
        else:
            sliced.setdefault(target, []).append((part, value))

    def replace(keypath, leaf):
        path = tuple(k.key for k in keypath if isinstance(k, jax.tree_util.DictKey))
        if path in whole:
            return jax.device_put(np.asarray(whole[path]).astype(leaf.dtype), leaf.sharding)
        for part, value in sliced.get(path, ()):
            leaf = _write_slice(leaf, part.index(leaf.ndim),
                                part.to_fused(np.asarray(value)).astype(leaf.dtype))
        return leaf

    return jax.tree_util.tree_map_with_path(replace, state)


def _write_slice(leaf: jax.Array, index: tuple, value: np.ndarray) -> jax.Array:
    """``leaf.at[index].set(value)`` as a new array with ``leaf``'s sharding."""
    sharding = leaf.sharding
    if isinstance(sharding, jax.sharding.NamedSharding):  # every device gets the slice
        value = jax.device_put(value, jax.sharding.NamedSharding(
            sharding.mesh, jax.sharding.PartitionSpec()))
    else:
        value = jax.device_put(value, sharding)
    return jax.jit(lambda a, v: a.at[index].set(v), out_shardings=sharding)(leaf, value)


def _hf_name_of(config: ModelConfig) -> dict[Path, tuple[str, bool]]:
    return {path: (hf, t) for hf, (path, t) in hf_names(config).items()}


def check_pure(config: ModelConfig, pure: Mapping) -> dict[Path, object]:
    """Checks a checkpoint-layout pure dict against the config; returns it flat.

    Raises:
      MissingWeightError: a leaf the config needs is absent.
      WeightShapeError: a leaf's shape differs (named and shaped as in the
        Hugging Face checkpoint where the leaf has a Hugging Face name).
    """
    flat_pure = _flatten(pure)
    hf_of = _hf_name_of(config)
    shapes = checkpoint_shapes(config)
    missing = [p for p in shapes if p not in flat_pure]
    if missing:
        raise MissingWeightError([hf_of.get(p, ("/".join(map(str, p)),))[0] for p in missing])
    for path, shape in shapes.items():
        value = flat_pure[path]
        if tuple(value.shape) != shape:
            hf, transposed = hf_of.get(path, ("/".join(map(str, path)), False))
            expected = shape[::-1] if transposed else shape
            actual = value.shape[::-1] if transposed else value.shape
            raise WeightShapeError(hf, expected, tuple(actual))
    return {p: flat_pure[p] for p in shapes}


def state_from_pure(config: ModelConfig, pure: Mapping, dtype="float32", *,
                    shardings: Callable[[Path], jax.sharding.Sharding] | None = None
                    ) -> nnx.State:
    """Checks a checkpoint-layout pure dict, fuses q|k|v and gate|up, places it on device.

    Args:
      config: model config.
      pure: nested dict in the checkpoint layout (``pure_from_hf``; what
        converted Orbax folders hold), numpy or jax leaves; string layer keys
        such as ``"3"`` are accepted.
      dtype: parameter dtype; leaves are cast to it.
      shardings: optional ``model path -> Sharding``; default: the default device.

    Returns:
      An ``nnx.State`` of jax arrays, to ``nnx.merge`` with the graphdef of
      ``model.api.abstract_model(config, dtype)``.

    Raises:
      WeightShapeError, MissingWeightError.
    """
    from model.api import abstract_model

    _, abstract = abstract_model(config, dtype)
    target = jnp.dtype(dtype)
    flat = {p: np.asarray(v).astype(target, copy=False)
            for p, v in check_pure(config, pure).items()}
    fused = fusion.fuse(config, flat)

    def place(path):
        device = shardings(path) if shardings is not None else None
        return jax.device_put(fused[path], device)

    new_leaves = {tuple(p): place(tuple(p)) for p, _ in nnx.to_flat_state(abstract)}
    state = jax.tree.map(lambda x: x, abstract)
    nnx.replace_by_pure_dict(state, _unflatten(new_leaves))
    return state


def checkpoint_from_state(config: ModelConfig, state: nnx.State) -> dict:
    """A float state -> its nested checkpoint-layout pure dict of numpy arrays (unfused)."""
    flat = {tuple(p): np.asarray(v.get_value() if hasattr(v, "get_value") else v.value)
            for p, v in nnx.to_flat_state(state)}
    return _unflatten(fusion.unfuse(config, flat))


def state_from_hf(config: ModelConfig, tensors: Mapping[str, np.ndarray], dtype="float32", *,
                  shardings: Callable[[Path], jax.sharding.Sharding] | None = None
                  ) -> nnx.State:
    """Hugging Face tensors -> ``nnx.State`` of jax arrays (see ``state_from_pure``)."""
    return state_from_pure(config, pure_from_hf(config, tensors), dtype, shardings=shardings)


def _key(k):
    return int(k) if isinstance(k, str) and k.isdigit() else k


def _flatten(tree: Mapping, prefix: Path = ()) -> dict[Path, object]:
    out = {}
    for k, v in tree.items():
        path = prefix + (_key(k),)
        if isinstance(v, Mapping):
            out.update(_flatten(v, path))
        else:
            out[path] = v
    return out


def _unflatten(flat: Mapping[Path, object]) -> dict:
    out: dict = {}
    for path, v in flat.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = v
    return out
