"""Builds a GGUF file's tokenizer quickly, straight from its ``tokenizer.*`` metadata.

transformers' own path (``AutoTokenizer.from_pretrained(folder, gguf_file=name)``)
parses the whole file's metadata with ``gguf.GGUFReader`` (which turns each of
Gemma 3's 262,144 vocabulary entries into numpy views: ~10 s and more) before
converting the vocabulary. Here:

1. :func:`read_tokenizer_metadata` walks the metadata section of the file once
   (memory-mapped; the tensor data is never touched) with the ``gguf``
   package's value-type codes, decoding only the ``tokenizer.*`` keys and
   ``general.architecture``; every other array is skipped by its length.
   (``GGUFReader`` itself has no lazy mode: its constructor builds every field.)
2. :func:`build_backend` builds the ``tokenizers.Tokenizer`` the same way
   transformers 5's ``integrations/gguf/gguf_tokenizer_mapping.py`` does for
   the kinds supported here:

   - ``gpt2`` (byte-level BPE, e.g. SmolLM2): ``GPT2Tokenizer``'s model,
     pre-tokenizer and decoder, tokens respelled into the byte alphabet, merges
     from the file, the ``tokenizer.ggml.pre`` split regex where transformers
     has one;
   - ``llama`` (SentencePiece BPE) for the Gemma architectures (Gemma 3):
     ``GemmaTokenizer``'s model/normalizer/pre-tokenizer/decoder, whitespace
     tokens respelled with U+2581 and the merges recovered from the vocabulary
     in file order (what ``generate_merges`` computes, without its sorts);

   then the control tokens (token type 3) are added as special tokens and the
   user-defined ones (type 4) as plain added tokens.
3. :func:`wrap` hands it to ``transformers.PreTrainedTokenizerFast`` with the
   special tokens, ``add_bos_token``/``add_eos_token`` and chat template the
   file states (the same keyword arguments transformers passes).

Other tokenizer kinds raise :class:`UnsupportedTokenizer`; the caller
(``model.tokenizer``) then falls back to transformers.

:func:`load_gguf_tokenizer` adds an on-disk cache: the built backend
(``tokenizer.json``) and the wrapper's arguments (``wrapper.json``) are saved
under ``<cache>/<key>/``, the key hashing the file's path, size and mtime (and
this builder's version), so the next process loads them instead of rebuilding.
The cache folder is ``$JAX_SERVE_TOKENIZER_CACHE``, else
``$JAX_SERVE_CACHE/tokenizers``, else ``~/.cache/jax-serve/tokenizers``; set
``JAX_SERVE_TOKENIZER_CACHE=off`` to disable it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import shutil
import struct
import tempfile
import time
from pathlib import Path

import numpy as np

from model.gguf_fast import read_metadata

logger = logging.getLogger(__name__)

# Bump when the built tokenizer or the files saved change: old cache entries
# are then simply not found.
BUILDER_VERSION = 1

# llama.cpp token types (gguf.TokenType)
_CONTROL, _USER_DEFINED = 3, 4

# Architectures whose ``llama``-kind (SentencePiece) vocabulary transformers
# builds with its Gemma builder.
GEMMA_ARCHITECTURES = frozenset({"gemma", "gemma2", "gemma3"})
CACHE_ENV = "JAX_SERVE_TOKENIZER_CACHE"
_CACHE_OFF = {"0", "off", "none", "false", "no"}
_BACKEND_FILE = "tokenizer.json"
_WRAPPER_FILE = "wrapper.json"


class UnsupportedTokenizer(ValueError):
    """The file's tokenizer is of a kind this builder does not reproduce."""


# --------------------------------------------------------------------------- reading


def _wanted(key: str) -> bool:
    return key.startswith("tokenizer.") or key == "general.architecture"


def read_tokenizer_metadata(path: str | os.PathLike) -> dict:
    """Returns ``{key: value}`` for the file's ``tokenizer.*`` keys and ``general.architecture``.

    String arrays become ``list[str]``, numeric arrays numpy arrays, scalars
    Python values. Other keys are skipped without decoding; tensor data is not
    read.

    Raises:
        ValueError: not a GGUF file (bad magic/version, truncated metadata).
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            raise ValueError(f"{path} is not a GGUF file (only {size} bytes)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            try:
                return read_metadata(m, path, _wanted)[0]
            except (struct.error, UnicodeDecodeError, IndexError) as err:
                raise ValueError(f"{path}: unreadable GGUF metadata: {err}") from err


# --------------------------------------------------------------------------- building


def tokenizer_kind(meta: dict) -> str:
    """``"gpt2"`` or ``"gemma"``: the builder for this metadata.

    Raises:
        UnsupportedTokenizer: any other kind (llama-kind for a non-Gemma
            architecture, t5, bert, rwkv, ...), or no vocabulary in the file.
    """
    model = meta.get("tokenizer.ggml.model")
    arch = meta.get("general.architecture")
    if "tokenizer.ggml.tokens" not in meta:
        raise UnsupportedTokenizer("the file has no tokenizer.ggml.tokens")
    if model == "gpt2":
        if "tokenizer.ggml.merges" not in meta:
            raise UnsupportedTokenizer("gpt2 tokenizer without tokenizer.ggml.merges")
        return "gpt2"
    if model == "llama" and arch in GEMMA_ARCHITECTURES:
        return "gemma"
    raise UnsupportedTokenizer(
        f"tokenizer.ggml.model={model!r} for architecture {arch!r} is not built here "
        "(supported: 'gpt2', and 'llama' for Gemma architectures)")


def _pre_tokenizer_split(pre: str | None) -> str | None:
    """The split regex transformers uses for ``tokenizer.ggml.pre`` (None: plain ByteLevel)."""
    if pre is None:
        return None
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    except ImportError as err:  # another transformers layout: do not guess
        raise UnsupportedTokenizer(
            f"cannot look up the split regex for pre={pre!r}: {err}") from err
    return GGUF_PRE_TOKENIZER_SPLITS.get(pre)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (``convert_slow_tokenizer.bytes_to_unicode``)."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _build_gpt2(meta: dict):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    spelling = _bytes_to_unicode()
    alphabet = frozenset(spelling.values())
    vocab = {}
    for index, token in enumerate(meta["tokenizer.ggml.tokens"]):
        if not alphabet.issuperset(token):
            token = "".join(spelling[b] for b in token.encode("utf-8"))
        vocab[token] = index
    merges = [tuple(merge.split(" ")) for merge in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None,
                               continuing_subword_prefix="", end_of_word_suffix="",
                               fuse_unk=False))
    split = _pre_tokenizer_split(meta.get("tokenizer.ggml.pre"))
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    tok.decoder = decoders.ByteLevel()
    # GPT2Tokenizer's own special-token defaults, added when transformers
    # builds it: <|endoftext|> as unk, bos and eos.
    _add_default_specials(tok, ["<|endoftext|>"])
    return tok, alphabet


def _gemma_merges(tokens: list[str], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """``generate_merges(vocab, {token: -index})`` without its sorts.

    That function lists, for each distinct token, its splits into two vocabulary
    pieces, then sorts everything by (score, len(left), len(right)), highest
    first, stably. The score is minus the token's (last) index, so the order is:
    tokens by ascending last index, and within one token the longer left piece
    first (two splits of one token never tie).
    """
    order = sorted(vocab.items(), key=lambda item: item[1])  # distinct tokens, by last index
    merges = []
    append = merges.append
    for token, _ in order:
        for cut in range(len(token) - 1, 0, -1):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                append((left, right))
    return merges


def _build_gemma(meta: dict):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t
              for t in meta["tokenizer.ggml.tokens"]]
    vocab = {token: index for index, token in enumerate(tokens)}
    merges = _gemma_merges(tokens, vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, unk_token="<unk>",
                               dropout=None, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous",
                                             invert=False)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse()])
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    # GemmaTokenizer's own special-token defaults, in transformers' order
    # (SPECIAL_TOKENS_ATTRIBUTES: bos, eos, unk, pad, mask).
    _add_default_specials(tok, ["<bos>", "<eos>", "<unk>", "<pad>", "<mask>"])
    return tok, None


def _add_default_specials(tok, names: list[str]) -> None:
    """Adds what ``TokenizersBackend.__init__`` adds for a class's default special tokens.

    Tokens already in the vocabulary keep their ids (and become added tokens);
    others get new ids, in this order, as in transformers.
    """
    from tokenizers import AddedToken

    seen = set()
    todo = []
    for name in names:
        if name not in seen:
            seen.add(name)
            todo.append(AddedToken(name, special=True))
    tok.add_tokens(todo)


def build_backend(meta: dict):
    """Builds the ``tokenizers.Tokenizer`` transformers would build from this metadata.

    Raises:
        UnsupportedTokenizer: see :func:`tokenizer_kind`.
    """
    from tokenizers import AddedToken

    kind = tokenizer_kind(meta)
    tok, byte_alphabet = _build_gpt2(meta) if kind == "gpt2" else _build_gemma(meta)
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type")
    if types is not None:
        types = np.asarray(types)
        control = [AddedToken(tokens[i], normalized=False, special=True)
                   for i in np.flatnonzero(types == _CONTROL)
                   if byte_alphabet is None or byte_alphabet.issuperset(tokens[i])]
        if control:
            tok.add_special_tokens(control)
        user_ids = np.flatnonzero(types == _USER_DEFINED)
        if len(user_ids):
            vocab = tok.get_vocab(with_added_tokens=True)
            user = [AddedToken(tokens[i], normalized=False, special=False)
                    for i in user_ids if tokens[i] in vocab]
            if user:
                tok.add_tokens(user)
    return tok


def wrapper_kwargs(meta: dict) -> dict:
    """The keyword arguments transformers gives the tokenizer class here (JSON-able)."""
    kind = tokenizer_kind(meta)
    tokens = meta["tokenizer.ggml.tokens"]

    def token(key: str):
        index = meta.get(f"tokenizer.ggml.{key}")
        return tokens[int(index)] if index is not None else None

    kwargs = {
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
    }
    if meta.get("tokenizer.chat_template"):
        kwargs["chat_template"] = meta["tokenizer.chat_template"]
    for flag in ("add_bos_token", "add_eos_token"):
        if f"tokenizer.ggml.{flag}" in meta:
            kwargs[flag] = bool(meta[f"tokenizer.ggml.{flag}"])
    if meta.get("tokenizer.ggml.model") == "llama":
        kwargs.setdefault("add_bos_token", True)  # llama.cpp's default for SentencePiece files
    if kind == "gemma":
        # GemmaTokenizer, which AutoTokenizer picks for these files, pads on the
        # left and names <mask> its mask token.
        kwargs["mask_token"] = "<mask>"
        kwargs["padding_side"] = "left"
    return kwargs


def wrap(backend, kwargs: dict):
    """``PreTrainedTokenizerFast`` around ``backend``, which it takes over (not copied).

    ``PreTrainedTokenizerFast(tokenizer_object=t, ...)`` deep-copies ``t`` (a
    JSON round trip, about a second for Gemma's vocabulary); setting
    ``_tokenizer`` before ``__init__`` is the path transformers' own tokenizer
    classes take, and ends in the same object.
    """
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.__new__(PreTrainedTokenizerFast)
    tokenizer._tokenizer = backend
    PreTrainedTokenizerFast.__init__(tokenizer, **kwargs)
    if tokenizer._tokenizer is not backend:  # a transformers that rebuilt it: the public way
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)
    tokenizer._post_init()  # what from_pretrained runs after __init__
    return tokenizer


def build_gguf_tokenizer(path: str | os.PathLike, serialize: bool = False):
    """Builds a GGUF file's tokenizer from its metadata (no cache).

    Returns:
        ``(tokenizer, backend_json, wrapper_kwargs)``: ``backend_json`` is the
        backend before wrapping, serialized (None unless ``serialize``); it and
        the JSON-able ``wrapper_kwargs`` are what the cache stores.

    Raises:
        UnsupportedTokenizer: a tokenizer kind this module does not build.
        ValueError: not a readable GGUF file.
    """
    meta = read_tokenizer_metadata(path)
    kwargs = wrapper_kwargs(meta)
    backend = build_backend(meta)
    serialized = backend.to_str() if serialize else None
    return wrap(backend, kwargs), serialized, kwargs


# --------------------------------------------------------------------------- cache


def cache_dir() -> Path | None:
    """The tokenizer cache folder (None when disabled with ``JAX_SERVE_TOKENIZER_CACHE=off``)."""
    override = os.environ.get(CACHE_ENV)
    if override is not None and override.strip().lower() in _CACHE_OFF:
        return None
    if override:
        return Path(override)
    root = os.environ.get("JAX_SERVE_CACHE") or Path.home() / ".cache" / "jax-serve"
    return Path(root) / "tokenizers"


def cache_key(path: str | os.PathLike) -> str:
    """Hash of the file's resolved path, size, mtime and the builder/library versions."""
    import tokenizers
    import transformers

    p = Path(path).resolve()
    st = p.stat()
    ident = json.dumps([str(p), st.st_size, st.st_mtime_ns, BUILDER_VERSION,
                        tokenizers.__version__, transformers.__version__])
    return hashlib.sha256(ident.encode()).hexdigest()[:32]


def _load_cached(folder: Path):
    """The cached tokenizer in ``folder``; None if there is none (a damaged one is removed)."""
    from tokenizers import Tokenizer

    backend_file, wrapper_file = folder / _BACKEND_FILE, folder / _WRAPPER_FILE
    if not folder.is_dir():
        return None
    try:
        kwargs = json.loads(wrapper_file.read_text(encoding="utf-8"))
        backend = Tokenizer.from_file(str(backend_file))
        return wrap(backend, kwargs)
    except Exception as err:  # a damaged entry: drop it, rebuild and store it again
        logger.warning("ignoring the damaged tokenizer cache %s: %s", folder, err)
        shutil.rmtree(folder, ignore_errors=True)
        return None


def _store(folder: Path, serialized: str, kwargs: dict, source: str) -> None:
    """Writes a cache entry atomically (a temporary folder renamed into place)."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
        try:
            tmp.chmod(0o755)
            (tmp / _BACKEND_FILE).write_text(serialized, encoding="utf-8")
            (tmp / _WRAPPER_FILE).write_text(json.dumps(kwargs), encoding="utf-8")
            (tmp / "source.txt").write_text(source + "\n", encoding="utf-8")
            os.replace(tmp, folder)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not folder.is_dir():  # else another process stored it first: fine
                raise
    except OSError as err:
        logger.warning("could not cache the tokenizer of %s in %s: %s", source, folder, err)


def load_gguf_tokenizer(path: str | os.PathLike, use_cache: bool = True):
    """A GGUF file's tokenizer: from the cache when there, else built (and cached).

    Raises:
        UnsupportedTokenizer: a tokenizer kind this module does not build.
        ValueError: not a readable GGUF file.
    """
    start = time.perf_counter()
    folder = cache_dir() if use_cache else None
    if folder is not None:
        folder = folder / cache_key(path)
        cached = _load_cached(folder)
        if cached is not None:
            logger.info("loaded the tokenizer of %s from %s in %.2f s", path, folder,
                        time.perf_counter() - start)
            return cached
    tokenizer, serialized, kwargs = build_gguf_tokenizer(path, serialize=folder is not None)
    logger.info("built the tokenizer of %s from its GGUF metadata in %.2f s", path,
                time.perf_counter() - start)
    if folder is not None:
        _store(folder, serialized, kwargs, str(Path(path).resolve()))
    return tokenizer
