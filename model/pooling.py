"""Pooling of per-token hidden states into one vector per sequence.

``PoolingConfig.from_folder`` reads what a sentence-transformers folder says
(``modules.json``, ``1_Pooling/config.json``, a ``Normalize`` module);
``pool`` and ``l2_normalize`` are pure ``jnp`` and run under ``jit``;
``truncate`` serves Matryoshka ``dimensions`` requests.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

logger = logging.getLogger(__name__)

# sentence-transformers' Pooling config keys, in the order it concatenates them.
_ST_MODES = (
    ("pooling_mode_cls_token", "cls"),
    ("pooling_mode_mean_tokens", "mean"),
    ("pooling_mode_max_tokens", "max"),
    ("pooling_mode_mean_sqrt_len_tokens", "mean_sqrt_len"),
    ("pooling_mode_weightedmean_tokens", "weighted_mean"),
    ("pooling_mode_lasttoken", "last"),
)
MODES = tuple(m for _, m in _ST_MODES)
# Modules that do not change the vector (or that we implement here).
_ST_PASSTHROUGH = ("Transformer", "Pooling", "Normalize")


@dataclasses.dataclass(frozen=True)
class PoolingConfig:
    """How token vectors become one sequence vector.

    Attributes:
        modes: Pooling modes, concatenated in this order (sentence-transformers
            allows several); empty = no pooling (cross-encoders and classifiers
            use their classification head instead).
        normalize: L2-normalise the pooled vector.
        max_seq_length: sentence-transformers' ``max_seq_length`` if the folder
            sets one (the tokenizer truncates there), else None.
    """

    modes: tuple[str, ...] = ("cls",)
    normalize: bool = True
    max_seq_length: int | None = None

    def __post_init__(self):
        bad = [m for m in self.modes if m not in MODES]
        if bad:
            raise ValueError(f"unknown pooling modes {bad}; known: {MODES}")

    @classmethod
    def none(cls) -> "PoolingConfig":
        """No pooling: the model's head produces the output."""
        return cls(modes=(), normalize=False)

    @classmethod
    def from_folder(cls, path: str | os.PathLike) -> "PoolingConfig":
        """Reads a sentence-transformers folder's pooling pipeline.

        Without ``modules.json`` (a plain Hugging Face ``BertModel``), the
        default is CLS pooling + L2 normalisation, as vLLM does for BERT
        embedding models.

        Args:
            path: Model folder.

        Raises:
            ValueError: ``modules.json`` holds a module that changes the vector
                and is not implemented (e.g. ``Dense``), or pooling config is bad.
        """
        path = os.fspath(path)
        max_len = None
        st_cfg = os.path.join(path, "sentence_bert_config.json")
        if os.path.exists(st_cfg):
            max_len = _read_json(st_cfg).get("max_seq_length")
        modules_file = os.path.join(path, "modules.json")
        if not os.path.exists(modules_file):
            logger.info("%s: no modules.json; CLS pooling + normalize", path)
            return cls(modes=("cls",), normalize=True, max_seq_length=max_len)
        modes: tuple[str, ...] = ()
        normalize = False
        for module in _read_json(modules_file):
            kind = module.get("type", "").rsplit(".", 1)[-1]
            if kind not in _ST_PASSTHROUGH:
                raise ValueError(f"{modules_file}: unsupported sentence-transformers "
                                 f"module {module.get('type')!r}")
            if kind == "Normalize":
                normalize = True
            elif kind == "Pooling":
                cfg_file = os.path.join(path, module.get("path", ""), "config.json")
                modes = _modes_from_st(_read_json(cfg_file), cfg_file)
        if not modes:
            raise ValueError(f"{modules_file}: no Pooling module")
        return cls(modes=modes, normalize=normalize, max_seq_length=max_len)


def _read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _modes_from_st(cfg: dict, where: str) -> tuple[str, ...]:
    if "pooling_mode" in cfg and isinstance(cfg["pooling_mode"], str):
        mode = {"mean_tokens": "mean", "cls_token": "cls", "max_tokens": "max",
                "lasttoken": "last"}.get(cfg["pooling_mode"], cfg["pooling_mode"])
        return (mode,)
    if cfg.get("include_prompt", True) is False:
        raise ValueError(f"{where}: include_prompt=false is not supported")
    modes = tuple(m for key, m in _ST_MODES if cfg.get(key))
    if not modes:
        raise ValueError(f"{where}: no pooling mode enabled")
    return modes


def pool(hidden: jax.Array, attention_mask: jax.Array,
         modes: tuple[str, ...]) -> jax.Array:
    """Pools token vectors as sentence-transformers does.

    Args:
        hidden: ``[B, L, H]`` token vectors.
        attention_mask: ``[B, L]`` 1 = real token, 0 = padding (either side).
        modes: Pooling modes from ``MODES``, concatenated in order.

    Returns:
        ``[B, H * len(modes)]`` float32.
    """
    hidden = hidden.astype(jnp.float32)
    mask = attention_mask.astype(jnp.float32)[..., None]  # [B, L, 1]
    count = jnp.maximum(mask.sum(axis=1), 1e-9)  # [B, 1]
    out = []
    for mode in modes:
        if mode == "cls":
            out.append(hidden[:, 0])
        elif mode == "mean":
            out.append((hidden * mask).sum(axis=1) / count)
        elif mode == "mean_sqrt_len":
            out.append((hidden * mask).sum(axis=1) / jnp.sqrt(count))
        elif mode == "max":
            out.append(jnp.where(mask > 0, hidden, -1e9).max(axis=1))
        elif mode == "weighted_mean":
            weights = mask * jnp.arange(1, hidden.shape[1] + 1)[None, :, None]
            out.append((hidden * weights).sum(axis=1)
                       / jnp.maximum(weights.sum(axis=1), 1e-9))
        elif mode == "last":
            # Last real token: the highest index with mask 1 (left or right padding).
            idx = jnp.argmax(attention_mask * jnp.arange(hidden.shape[1]), axis=1)
            out.append(jnp.take_along_axis(hidden, idx[:, None, None], axis=1)[:, 0])
        else:
            raise ValueError(f"unknown pooling mode {mode!r}")
    return out[0] if len(out) == 1 else jnp.concatenate(out, axis=-1)


def l2_normalize(x, eps: float = 1e-12):
    """``x / max(||x||, eps)`` along the last axis (torch ``F.normalize``).

    Works on ``jax.Array`` and ``np.ndarray`` alike; returns the same kind.
    """
    xp = np if isinstance(x, np.ndarray) else jnp
    norm = xp.linalg.norm(x, axis=-1, keepdims=True)
    return x / xp.maximum(norm, eps)


def truncate(emb: np.ndarray, dims: int | None, normalize: bool) -> np.ndarray:
    """Matryoshka truncation: keep the first ``dims`` features.

    Args:
        emb: ``[B, H]`` embeddings.
        dims: Features to keep (``None`` = all).
        normalize: Re-normalise after cutting (when the model normalises).

    Returns:
        ``[B, dims]``.

    Raises:
        ValueError: ``dims`` is not in ``1..H``.
    """
    if dims is None:
        return emb
    if not 1 <= dims <= emb.shape[-1]:
        raise ValueError(f"dimensions must be in 1..{emb.shape[-1]}, got {dims}")
    out = emb[..., :dims]
    return l2_normalize(out) if normalize else out
