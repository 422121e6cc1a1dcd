"""Converted model folders: ``config.json`` plus an Orbax checkpoint of the weights.

Layout of a converted folder (written by ``tools/convert_hf.py``)::

    OUT/config.json      Hugging Face style config (what ModelConfig.from_hf reads)
    OUT/tokenizer*.json  tokenizer files, chat template included
    OUT/orbax/           Orbax checkpoint of the nested pure dict of weights

The weights are a nested dict in ``model/weights.py``'s checkpoint layout
(``{"layers": {0: {"self_attn": {"q_proj": {"kernel": ...}}}}}``, q, k, v and
gate, up apart; ``state_from_pure`` fuses them when loading).
Leaves are stored as host numpy arrays so a checkpoint restores on any device
set; integer layer keys come back as ints.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Mapping

import numpy as np

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
ORBAX_DIR = "orbax"


def write_orbax(out_dir: str | os.PathLike, hf_config_dict: Mapping,
                pure_state_dict: Mapping) -> Path:
    """Writes ``config.json`` and the Orbax checkpoint into ``out_dir``.

    Args:
        out_dir: destination folder (created if needed).
        hf_config_dict: Hugging Face style config dict, written as config.json.
        pure_state_dict: nested checkpoint-layout dict of numpy or jax arrays
            (``model.weights.pure_from_hf`` or ``checkpoint_from_state``).

    Returns:
        The checkpoint folder ``out_dir/orbax``.

    Raises:
        FileExistsError: ``out_dir/orbax`` already exists.
    """
    import orbax.checkpoint as ocp

    out = Path(out_dir).absolute()
    ckpt = out / ORBAX_DIR
    if ckpt.exists():
        raise FileExistsError(f"{ckpt} already exists; remove it or choose another folder")
    out.mkdir(parents=True, exist_ok=True)
    with open(out / CONFIG_FILE, "w") as f:
        json.dump(dict(hf_config_dict), f, indent=2, sort_keys=True)
    host = _map_leaves(pure_state_dict, np.asarray)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(ckpt, host)
    logger.info("wrote Orbax checkpoint %s", ckpt)
    return ckpt


def read_orbax(path: str | os.PathLike) -> tuple[dict, dict]:
    """Reads a converted folder.

    Args:
        path: folder holding ``config.json`` and ``orbax/``.

    Returns:
        ``(hf_config_dict, pure_state_dict)``; leaves are numpy arrays, layer
        keys are ints.

    Raises:
        FileNotFoundError: the folder, its ``config.json`` or its ``orbax/``
            checkpoint is missing (the message names what).
    """
    import orbax.checkpoint as ocp

    folder = Path(path).absolute()
    if not folder.is_dir():
        raise FileNotFoundError(f"converted model folder not found: {folder}")
    config_file = folder / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in converted model folder {folder}")
    ckpt = folder / ORBAX_DIR
    if not ckpt.is_dir():
        raise FileNotFoundError(
            f"no {ORBAX_DIR}/ checkpoint in {folder}; convert a model into it with "
            "`python tools/convert_hf.py SOURCE OUT_DIR`")
    with open(config_file) as f:
        config = json.load(f)
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(ckpt)
    return config, _int_keys(_map_leaves(restored, np.asarray))


def _map_leaves(tree: Mapping, fn) -> dict:
    return {k: _map_leaves(v, fn) if isinstance(v, Mapping) else fn(v) for k, v in tree.items()}


def _int_keys(tree: Mapping) -> dict:
    """Turns digit-string keys (Orbax stores keys as strings) back into ints."""
    out = {}
    for k, v in tree.items():
        key = int(k) if isinstance(k, str) and k.isdigit() else k
        out[key] = _int_keys(v) if isinstance(v, Mapping) else v
    return out
