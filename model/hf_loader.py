"""Reads a Hugging Face model folder: ``config.json`` plus safetensors weights.

Weights are either one ``*.safetensors`` file or shards listed in
``model.safetensors.index.json``. Tensors come back as numpy arrays in their
stored dtype (float32, or bfloat16 via ``ml_dtypes``).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"


def read_hf_config(path: str | os.PathLike) -> dict:
    """Returns the parsed ``config.json`` of a model folder.

    Raises:
      FileNotFoundError: the folder or its ``config.json`` is missing.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder not found: {folder}")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no config.json in model folder {folder}")
    with open(config_file) as f:
        return json.load(f)


def safetensors_files(path: str | os.PathLike) -> list[Path]:
    """The weight files of a folder, in shard order.

    Raises:
      FileNotFoundError: no weights, or a shard named by the index is missing.
    """
    folder = Path(path)
    index = folder / INDEX_FILE
    if index.is_file():
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
        for file in files:
            if not file.is_file():
                raise FileNotFoundError(f"shard {file} listed in {index} is missing")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights found in {folder}")
    return files


def read_safetensors(files: list[Path]) -> dict[str, np.ndarray]:
    """Loads every tensor of ``files`` (a progress bar when there are several)."""
    tensors: dict[str, np.ndarray] = {}
    for file in tqdm(files, desc="loading safetensors", unit="file",
                     disable=len(files) < 2):
        tensors.update(load_file(str(file)))
    logger.info("read %d tensors from %d safetensors file(s)", len(tensors), len(files))
    return tensors


def read_hf_folder(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """Returns ``(config_dict, tensors)`` of a Hugging Face model folder.

    Raises:
      FileNotFoundError: missing folder, ``config.json`` or weights.
    """
    config = read_hf_config(path)
    return config, read_safetensors(safetensors_files(path))
