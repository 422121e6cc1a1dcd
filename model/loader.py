"""Format-detecting model loading: Hugging Face folder, GGUF file, or Orbax.

``load_model(path)`` detects the format, reads a Hugging Face-style config
dict and weights, builds ``ModelConfig`` and an ``nnx.State`` on device, and
loads the tokenizer.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

import jax
from flax import nnx

from model.api import abstract_model
from model.config import ModelConfig
from model.weights import state_from_hf, state_from_pure

logger = logging.getLogger(__name__)

FORMATS = ("hf", "gguf", "orbax")


@dataclasses.dataclass
class LoadedModel:
    """A model ready to run.

    Attributes:
      config: parsed model config.
      graphdef: static graph of ``DecoderLM`` (``nnx.split``).
      state: weights as jax arrays on device.
      tokenizer: transformers tokenizer, or None when not requested.
      path: where the model was loaded from.
      format: "hf", "gguf" or "orbax".
      hf_config: the raw Hugging Face-style config dict.
      timings: seconds spent reading the weights (``weights_s``) and building
        the tokenizer (``tokenizer_s``).
    """

    config: ModelConfig
    graphdef: nnx.GraphDef
    state: nnx.State
    tokenizer: Any
    path: str
    format: str
    hf_config: dict = dataclasses.field(default_factory=dict)
    timings: dict = dataclasses.field(default_factory=dict)


def detect_format(path: str | os.PathLike) -> str:
    """Returns "hf", "gguf" or "orbax" for a model path.

    * a ``.gguf`` file, or a folder holding exactly one ``.gguf`` -> "gguf";
    * a folder with ``config.json`` and an ``orbax/`` sub-folder -> "orbax";
    * a folder with ``config.json`` and ``*.safetensors`` -> "hf".

    Raises:
      FileNotFoundError: the path does not exist, or a folder matches no format
        (the message says what was expected).
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"model path not found: {p}")
    if p.is_file():
        if p.suffix == ".gguf":
            return "gguf"
        raise FileNotFoundError(f"{p} is a file but not a .gguf file; expected a .gguf file "
                                "or a model folder")
    has_config = (p / "config.json").is_file()
    if has_config and (p / "orbax").is_dir():
        return "orbax"
    if has_config and any(p.glob("*.safetensors")):
        return "hf"
    ggufs = list(p.glob("*.gguf"))
    if len(ggufs) == 1:
        return "gguf"
    if len(ggufs) > 1:
        raise FileNotFoundError(f"{p} holds {len(ggufs)} .gguf files; pass the file itself")
    if has_config:
        raise FileNotFoundError(f"no *.safetensors weights found in {p}")
    raise FileNotFoundError(f"{p} has no config.json, .gguf file or orbax/ folder")


def _gguf_file(path: Path) -> Path:
    return path if path.is_file() else next(path.glob("*.gguf"))


def load_model(path: str | os.PathLike | None = None, dtype: str = "float32", *,
               shardings: Callable[[tuple], jax.sharding.Sharding] | None = None,
               shardings_for: Callable[[ModelConfig], Callable] | None = None,
               with_tokenizer: bool = True) -> LoadedModel:
    """Loads a model from a Hugging Face folder, a GGUF file or an Orbax folder.

    Args:
      path: model path; None loads the embedded default model.
      dtype: "float32" or "bfloat16" for parameters and activations.
      shardings: optional ``state path -> Sharding``; default: one device.
      shardings_for: optional ``ModelConfig -> (state path -> Sharding)``, for
        layouts that depend on the config (``sharding.specs``); wins over
        ``shardings``. Leaves go from host numpy straight into their shards.
      with_tokenizer: load the tokenizer (``model.tokenizer.load_tokenizer``).

    Raises:
      FileNotFoundError: missing path / weights.
      UnsupportedArchitectureError: the architecture is not implemented.
      WeightShapeError, MissingWeightError: weights disagree with the config.
    """
    start = time.perf_counter()

    def _place(config):
        return shardings_for(config) if shardings_for is not None else shardings

    if path is None:
        from model.default import default_model_path
        path = default_model_path()
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "hf":
        from model.hf_loader import read_hf_folder
        hf_config, tensors = read_hf_folder(path)
        config = ModelConfig.from_hf(hf_config)
        state = state_from_hf(config, tensors, dtype, shardings=_place(config))
    elif fmt == "gguf":
        from model.gguf import read_gguf
        hf_config, tensors = read_gguf(_gguf_file(path))
        config = ModelConfig.from_hf(hf_config)
        state = state_from_hf(config, tensors, dtype, shardings=_place(config))
    else:
        from model.orbax_io import read_orbax
        hf_config, pure = read_orbax(path)
        config = ModelConfig.from_hf(hf_config)
        state = state_from_pure(config, pure, dtype, shardings=_place(config))
    graphdef, _ = abstract_model(config, dtype)
    weights_s = time.perf_counter() - start
    tokenizer = None
    if with_tokenizer:
        from model.tokenizer import load_tokenizer
        tokenizer = load_tokenizer(str(path), fmt)
    tokenizer_s = time.perf_counter() - start - weights_s
    logger.info("loaded %s model %s (%s, %d layers, %s) in %.1fs", fmt, path,
                config.architecture, config.num_layers, dtype, time.perf_counter() - start)
    return LoadedModel(config=config, graphdef=graphdef, state=state, tokenizer=tokenizer,
                       path=str(path), format=fmt, hf_config=hf_config,
                       timings={"weights_s": weights_s, "tokenizer_s": tokenizer_s})
