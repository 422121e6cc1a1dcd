"""Tokenizer loading for the three model formats.

- ``hf`` and ``orbax`` folders hold tokenizer files: ``AutoTokenizer``.
- ``gguf``: ``model.gguf_tokenizer`` builds it straight from the file's
  ``tokenizer.*`` metadata (the same tokenizer transformers builds, in about a
  second instead of tens of seconds) and caches it on disk; kinds it does not
  support fall back, with a warning, to transformers' own GGUF path
  (``gguf_file=``), which is slow. Either way the result is also kept in
  memory per file version. The chat template comes from the metadata key
  ``tokenizer.chat_template``.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

GGUF_CHAT_TEMPLATE_KEY = "tokenizer.chat_template"


def load_tokenizer(path: str | os.PathLike, fmt: str):
    """Loads the tokenizer of a model.

    Args:
        path: a Hugging Face or converted folder, a ``.gguf`` file, or a folder
            holding exactly one ``.gguf`` file.
        fmt: "hf", "orbax" or "gguf" (see ``model.loader.detect_format``).

    Returns:
        A transformers tokenizer (``PreTrainedTokenizerBase``). GGUF tokenizers
        are cached and shared: do not mutate them.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: ``fmt`` is unknown.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"tokenizer path not found: {p}")
    if fmt in ("hf", "orbax"):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(p))
    if fmt == "gguf":
        file = _single_gguf(p).resolve()
        return _gguf_tokenizer(str(file), file.stat().st_mtime_ns)
    raise ValueError(f"unknown model format {fmt!r}; expected 'hf', 'gguf' or 'orbax'")


def _single_gguf(p: Path) -> Path:
    if p.is_file():
        return p
    files = sorted(p.glob("*.gguf"))
    if len(files) != 1:
        raise FileNotFoundError(f"expected exactly one .gguf file in {p}, found {len(files)}")
    return files[0]


@functools.lru_cache(maxsize=8)
def _gguf_tokenizer(file: str, mtime_ns: int):
    """Builds (once per file version) the tokenizer of a GGUF file."""
    from model.gguf_tokenizer import UnsupportedTokenizer, load_gguf_tokenizer

    del mtime_ns  # part of the cache key only
    try:
        tokenizer = load_gguf_tokenizer(file)
    except UnsupportedTokenizer as err:
        logger.warning("%s: %s; building the tokenizer with transformers instead (slow)", file, err)
        tokenizer = _transformers_gguf_tokenizer(file)
    logger.info("loaded GGUF tokenizer %s (chat template: %s)", file,
                "yes" if tokenizer.chat_template else "no")
    return tokenizer


def _transformers_gguf_tokenizer(file: str):
    """transformers' own GGUF tokenizer (reads the whole file's metadata; slow)."""
    from transformers import AutoTokenizer

    from model.gguf import open_gguf, read_field

    folder, name = os.path.split(file)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if not getattr(tokenizer, "chat_template", None):
        template = read_field(open_gguf(file), GGUF_CHAT_TEMPLATE_KEY)
        if template:
            tokenizer.chat_template = template
    return tokenizer
