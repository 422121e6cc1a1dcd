"""Hugging Face tensor names <-> paths in the ``DecoderLM`` state (gpt-fast style).

``WEIGHT_MAP`` is the whole conversion: each Hugging Face name (``{}`` = layer
index) maps to a path in our state and whether the tensor is transposed
(Hugging Face linears are ``[out, in]``; ours are ``[in, out]``). Entries that a
config does not use (biases, q/k norms, Gemma's extra norms, ``lm_head`` when
embeddings are tied) are dropped by ``hf_names``.
"""

from __future__ import annotations

import functools
import logging
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model.config import ModelConfig

logger = logging.getLogger(__name__)

Path = tuple  # e.g. ("layers", 3, "self_attn", "q_proj", "kernel")

# hf name -> (our path with "{}" for the layer index, transpose)
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
    from model.api import abstract_model  # local: api imports the decoder

    _, abstract = abstract_model(config, dtype)
    return {tuple(p): v.get_value() if hasattr(v, "get_value") else v.value
            for p, v in nnx.to_flat_state(abstract)}


def hf_names(config: ModelConfig, dtype="float32") -> dict[str, tuple[Path, bool]]:
    """Every Hugging Face tensor name this config needs -> ``(our path, transpose)``."""
    paths = _flat_abstract(config, str(jnp.dtype(dtype)))
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
    assert not missing, f"state paths without a Hugging Face name: {sorted(missing)}"
    return names


def pure_from_hf(config: ModelConfig, tensors: Mapping[str, np.ndarray]) -> dict:
    """Renames and transposes Hugging Face tensors into a nested pure dict.

    Returns:
      ``{"layers": {0: {"self_attn": {"q_proj": {"kernel": array}}}}, ...}``
      of numpy arrays (dtype unchanged), the layout of ``nnx.to_pure_dict``.

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
    """Checks a partial set of Hugging Face tensors and maps them onto state paths.

    For run-time weight updates: any subset of the model's tensors may come,
    each under its Hugging Face name (``WEIGHT_MAP``), in the Hugging Face
    layout (linears ``[out, in]``). ``lm_head.weight`` of a model with tied
    embeddings and rotary caches are ignored.

    Returns:
      ``{our path: numpy array in our layout}`` (dtype unchanged).

    Raises:
      UnknownWeightError: a name the config has no parameter for.
      WeightShapeError: a tensor whose shape differs from the parameter's.
    """
    names = hf_names(config)
    paths = _flat_abstract(config, "float32")
    unknown = [n for n in tensors if n not in names and not n.endswith(_SKIPPED_SUFFIXES)
               and not (n == "lm_head.weight" and config.tie_word_embeddings)]
    if unknown:
        raise UnknownWeightError(unknown)
    out: dict[Path, np.ndarray] = {}
    for hf, array in tensors.items():
        if hf not in names:
            continue
        path, transpose = names[hf]
        spec = tuple(paths[path].shape)
        expected = spec[::-1] if transpose else spec
        if tuple(array.shape) != expected:
            raise WeightShapeError(hf, expected, array.shape)
        out[path] = array.T if transpose else array
    return out


def _hf_name_of(config: ModelConfig) -> dict[Path, tuple[str, bool]]:
    return {path: (hf, t) for hf, (path, t) in hf_names(config).items()}


def state_from_pure(config: ModelConfig, pure: Mapping, dtype="float32", *,
                    shardings: Callable[[Path], jax.sharding.Sharding] | None = None
                    ) -> nnx.State:
    """Checks shapes of a pure dict against the config and places it on device.

    Args:
      config: model config.
      pure: nested dict in the layout of ``nnx.to_pure_dict`` (numpy or jax
        leaves; string layer keys such as ``"3"`` are accepted).
      dtype: parameter dtype; leaves are cast to it.
      shardings: optional ``path -> Sharding``; default: the default device.

    Returns:
      An ``nnx.State`` of jax arrays, to ``nnx.merge`` with the graphdef of
      ``model.api.abstract_model(config, dtype)``.

    Raises:
      WeightShapeError, MissingWeightError.
    """
    from model.api import abstract_model

    _, abstract = abstract_model(config, dtype)
    flat_pure = _flatten(pure)
    hf_of = _hf_name_of(config)
    missing = [p for p, _ in nnx.to_flat_state(abstract) if tuple(p) not in flat_pure]
    if missing:
        raise MissingWeightError([hf_of.get(tuple(p), ("/".join(map(str, p)),))[0]
                                  for p in missing])
    target = jnp.dtype(dtype)

    def place(path, var):
        path = tuple(path)
        spec = var.get_value() if hasattr(var, "get_value") else var.value
        value = flat_pure[path]
        if tuple(value.shape) != tuple(spec.shape):
            hf, transposed = hf_of.get(path, ("/".join(map(str, path)), False))
            expected = spec.shape[::-1] if transposed else spec.shape
            actual = value.shape[::-1] if transposed else value.shape
            raise WeightShapeError(hf, expected, actual)
        value = np.asarray(value).astype(target) if isinstance(value, np.ndarray) else \
            jnp.asarray(value, target)
        device = shardings(path) if shardings is not None else None
        return jax.device_put(value, device)

    new_leaves = {tuple(p): place(p, v) for p, v in nnx.to_flat_state(abstract)}
    state = jax.tree.map(lambda x: x, abstract)
    nnx.replace_by_pure_dict(state, _unflatten(new_leaves))
    return state


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
