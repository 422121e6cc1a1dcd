"""``model.gguf_tokenizer`` against transformers' own GGUF tokenizer (the reference).

For SmolLM2-135M (byte-level BPE) and Gemma 3 270M (SentencePiece BPE), the
tokenizer built from the GGUF metadata -- freshly, and loaded back from the
on-disk cache -- equals ``AutoTokenizer.from_pretrained(folder, gguf_file=...)``:
the serialized backend, encodings of a varied corpus, decodes of random ids,
special tokens, chat templates, ids <-> tokens, vocabulary. The reference is slow
(seconds for SmolLM2, tens of seconds for Gemma 3 on two cores), so it is built
once per model for the whole module; the Gemma 3 half is marked slow.

Fast tests use small GGUF files written here with ``gguf.GGUFWriter``: a
byte-level vocabulary with the edge cases of the conversion, the cache, and the
fallback to transformers for kinds the builder does not support.
"""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from model import gguf_tokenizer as gt  # noqa: E402
from model.default import default_model_path, gemma3_270m_path  # noqa: E402

CORPUS = [
    "",
    " ",
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "  two leading spaces, trailing spaces   ",
    "tabs\tand\t\ttabs, newlines\n\nand\r\nCRLF\n",
    "          \n\n\n\t\t   ",
    "Ünïcödé: café, naïve, Straße, Ελληνικά, русский, עברית, مرحبا بالعالم",
    "中文分词测试。日本語のテキスト。한국어 텍스트.",
    "emoji 😀🎉🚀 👨‍👩‍👧‍👦 🏳️‍🌈 flags 🇫🇷🇯🇵 skin 👍🏽",
    "zero\u200bwidth\u200djoiner, nbsp\u00a0here, combining e\u0301 a\u0308",
    "numbers 0 7 42 1234567890 3.14159 -2.5e-10 1,000,000 0x1F 12:34",
    "def fibonacci(n):\n    if n < 2:\n        return n\n"
    "    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    '{"key": [1, 2, 3], "nested": {"a": null, "b": true}}  // trailing comment',
    "for (int i = 0; i < 10; ++i) { printf(\"%d\\n\", i); }",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text after<|endoftext|><|im_end|>",
    "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n",
    "<bos><eos><pad><unk><mask> and <start_of_image> then <end_of_image>",
    "<think>reasoning</think> and <|not_a_special|> and < |im_start| >",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "don't won't it's I'm we're they've y'all SHOUTING CamelCaseWord snake_case_word",
    "control \x00\x01\x07\x1b chars and \ufffd replacement",
    "https://example.com/path?query=1&x=y#frag user@example.org",
]

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Japan? 🇯🇵"},
]

# Gemma 3's file has no chat template: both tokenizers get this one explicitly.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>"
    "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

SPECIAL_ATTRS = ("bos_token", "eos_token", "unk_token", "pad_token", "mask_token",
                 "bos_token_id", "eos_token_id", "unk_token_id", "pad_token_id", "mask_token_id",
                 "all_special_tokens", "all_special_ids", "add_bos_token", "add_eos_token",
                 "padding_side", "truncation_side", "model_max_length",
                 "clean_up_tokenization_spaces")


def _reference(path: str):
    """transformers' tokenizer for a GGUF file (its GGUF reader needs torch)."""
    pytest.importorskip("torch")
    folder, name = os.path.split(path)
    return transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)


def _backend_json(tokenizer) -> dict:
    return json.loads(tokenizer.backend_tokenizer.to_str())


# --------------------------------------------------------------------------- real models


@pytest.fixture(scope="module")
def tokenizer_cache(tmp_path_factory):
    """An empty tokenizer cache for this module (``JAX_SERVE_TOKENIZER_CACHE``)."""
    folder = tmp_path_factory.mktemp("tokenizer-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(gt.CACHE_ENV, str(folder))
        yield folder


def _model_path(name: str) -> str:
    try:
        return default_model_path() if name == "smollm2" else gemma3_270m_path()
    except RuntimeError as err:  # model package not installed
        pytest.skip(str(err))


@pytest.fixture(scope="module", params=["smollm2", pytest.param("gemma3", marks=pytest.mark.slow)])
def model(request, tokenizer_cache):
    """``(name, path, reference, {"built": ..., "cached": ...})``, once per model."""
    name = request.param
    path = _model_path(name)
    entry = tokenizer_cache / gt.cache_key(path)
    assert not entry.exists()
    built = gt.load_gguf_tokenizer(path)  # builds, and writes the cache entry
    assert (entry / "tokenizer.json").is_file() and (entry / "wrapper.json").is_file()
    with pytest.MonkeyPatch.context() as mp:  # the second load must not build
        mp.setattr(gt, "build_gguf_tokenizer", _must_not_build)
        cached = gt.load_gguf_tokenizer(path)
    return name, path, _reference(path), {"built": built, "cached": cached}


def _must_not_build(*args, **kwargs):
    raise AssertionError("the tokenizer was rebuilt instead of loaded from the cache")


@pytest.fixture(params=["built", "cached"])
def pair(request, model):
    """``(name, ours, reference)`` for the freshly built and the cached tokenizer."""
    name, _, ref, ours = model
    return name, ours[request.param], ref


def _special_corpus(ref, seed: int = 0) -> list[str]:
    """Texts made of the vocabulary's added (control / user-defined) tokens, glued with words."""
    rng = random.Random(seed)
    added = sorted(str(t) for t in ref.added_tokens_decoder.values())
    picks = rng.sample(added, min(len(added), 60))
    texts = ["".join(picks[i:i + 6]) for i in range(0, len(picks), 6)]
    texts += [f" {a} word{b}\n{c}  " for a, b, c in zip(picks, picks[1:], picks[2:])][:20]
    return texts


def test_backend_equals_transformers(pair):
    _, ours, ref = pair
    mine, theirs = ours.backend_tokenizer.to_str(), ref.backend_tokenizer.to_str()
    if mine != theirs:  # show where
        assert json.loads(mine) == json.loads(theirs)


def test_encode_matches(pair):
    _, ours, ref = pair
    texts = CORPUS + _special_corpus(ref)
    for text in texts:
        assert ours(text).input_ids == ref(text).input_ids, text
        assert ours(text, add_special_tokens=False).input_ids == \
            ref(text, add_special_tokens=False).input_ids, text
        assert ours.tokenize(text) == ref.tokenize(text), text
        assert ours.encode(text) == ref.encode(text), text
        mine = ours(text, return_offsets_mapping=True)["offset_mapping"]
        assert mine == ref(text, return_offsets_mapping=True)["offset_mapping"], text
    batch_ours = ours(texts[:8], padding=True)
    batch_ref = ref(texts[:8], padding=True)
    assert batch_ours.input_ids == batch_ref.input_ids
    assert batch_ours.attention_mask == batch_ref.attention_mask


def test_decode_random_ids_matches(pair):
    _, ours, ref = pair
    rng = np.random.default_rng(0)
    n = len(ref)
    special = list(ref.all_special_ids)
    for _ in range(200):
        ids = rng.integers(0, n, size=int(rng.integers(1, 40))).tolist()
        if rng.random() < 0.3:
            ids.insert(int(rng.integers(0, len(ids))), int(rng.choice(special)))
        for skip in (False, True):
            mine = ours.decode(ids, skip_special_tokens=skip)
            assert mine == ref.decode(ids, skip_special_tokens=skip), ids
    # round trips of the corpus, and the byte-level pieces of multi-byte characters
    for text in CORPUS:
        ids = ref.encode(text, add_special_tokens=False)
        assert ours.decode(ids) == ref.decode(ids)
        assert ours.batch_decode([ids, ids[:1]]) == ref.batch_decode([ids, ids[:1]])


def test_special_tokens_match(pair):
    name, ours, ref = pair
    for attr in SPECIAL_ATTRS:
        assert getattr(ours, attr) == getattr(ref, attr), attr
    if name == "smollm2":  # what the file states (SmolLM2: ChatML)
        assert _special_ids(ours) == (1, 2, 0, 2)
        assert ours.eos_token == "<|im_end|>"
    else:
        assert _special_ids(ours) == (2, 1, 3, 0)
        assert ours.add_bos_token is True
        assert ours("hi").input_ids[0] == 2


def _special_ids(tok) -> tuple:
    return tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.pad_token_id


def test_chat_template_matches(pair):
    name, ours, ref = pair
    assert ours.chat_template == ref.chat_template
    template = None
    if name == "gemma3":
        assert ours.chat_template is None  # not in the file
        template = GEMMA_TEMPLATE
    else:
        assert "<|im_start|>" in ours.chat_template
    for messages in (CONVERSATION[:2], CONVERSATION):
        for gen in (False, True):
            kwargs = dict(chat_template=template, add_generation_prompt=gen)
            text = ours.apply_chat_template(messages, tokenize=False, **kwargs)
            assert text == ref.apply_chat_template(messages, tokenize=False, **kwargs)
            kwargs.update(tokenize=True, return_dict=False)
            assert ours.apply_chat_template(messages, **kwargs) == \
                ref.apply_chat_template(messages, **kwargs)


def test_ids_and_tokens_match(pair):
    _, ours, ref = pair
    n = len(ref)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, n, size=2000).tolist() + list(range(300)) + list(range(n - 300, n))
    ids += list(ref.all_special_ids)
    assert ours.convert_ids_to_tokens(ids) == ref.convert_ids_to_tokens(ids)
    assert ours.convert_ids_to_tokens(ids, skip_special_tokens=True) == \
        ref.convert_ids_to_tokens(ids, skip_special_tokens=True)
    tokens = ref.convert_ids_to_tokens(ids) + ["definitely-not-a-token-☃"]
    assert ours.convert_tokens_to_ids(tokens) == ref.convert_tokens_to_ids(tokens)


def test_vocab_matches(pair):
    name, ours, ref = pair
    assert ours.vocab_size == ref.vocab_size
    assert len(ours) == len(ref) == (49152 if name == "smollm2" else 262144)
    assert ours.get_vocab() == ref.get_vocab()
    assert {i: repr(t) for i, t in ours.added_tokens_decoder.items()} == \
        {i: repr(t) for i, t in ref.added_tokens_decoder.items()}


def test_save_pretrained_round_trip(model, tmp_path):
    """Other tests save the served tokenizer and load it back with AutoTokenizer."""
    _, _, ref, ours = model
    ours = ours["built"]
    ours.save_pretrained(tmp_path)
    again = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in CORPUS[:12]:
        assert again(text).input_ids == ref(text).input_ids
    assert again.eos_token_id == ref.eos_token_id and again.chat_template == ref.chat_template


def test_default_model_takes_the_fast_path(monkeypatch, tmp_path):
    """``load_tokenizer`` builds SmolLM2's tokenizer itself, never through transformers."""
    from model import tokenizer as tokenizer_mod

    path = _model_path("smollm2")
    monkeypatch.setenv(gt.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(tokenizer_mod, "_transformers_gguf_tokenizer", _must_not_fallback)
    tokenizer_mod._gguf_tokenizer.cache_clear()
    try:
        tok = tokenizer_mod.load_tokenizer(path, "gguf")
    finally:
        tokenizer_mod._gguf_tokenizer.cache_clear()
    assert tok.eos_token == "<|im_end|>" and tok.chat_template
    assert list(tmp_path.iterdir())  # and cached it


def _must_not_fallback(*args, **kwargs):
    raise AssertionError("fell back to transformers' GGUF tokenizer")


def test_reader_reads_tokenizer_keys_only():
    meta = gt.read_tokenizer_metadata(_model_path("smollm2"))
    assert all(k.startswith("tokenizer.") or k == "general.architecture" for k in meta)
    assert meta["general.architecture"] == "llama"
    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert len(meta["tokenizer.ggml.tokens"]) == 49152
    assert len(meta["tokenizer.ggml.merges"]) == 48900
    assert meta["tokenizer.ggml.token_type"].dtype == np.int32
    assert meta["tokenizer.ggml.eos_token_id"] == 2
    assert meta["tokenizer.ggml.add_bos_token"] is False


# --------------------------------------------------------------------------- small files


BYTES = gt._bytes_to_unicode()


def _write_gguf(path: Path, *, model: str = "gpt2", tokens: list[str], merges=None, types=None,
                scores=None, arch: str = "llama", **fields) -> Path:
    """A tiny GGUF: llama-shaped config keys, the given tokenizer, one small tensor."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_block_count(1)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model(model)
    w.add_token_list(tokens)
    if merges is not None:
        w.add_token_merges(merges)
    if types is not None:
        w.add_token_types(types)
    if scores is not None:
        w.add_token_scores(scores)
    for key, value in fields.items():
        getattr(w, f"add_{key}")(value)
    w.add_array("general.tags", ["a", "b"])  # a string array the reader skips
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _small_gpt2(folder: Path, name: str = "small.gguf", **fields) -> Path:
    # control tokens first; the 256 byte symbols; merged pieces; a user-defined
    # token (<think>); a token outside the byte alphabet ("é", respelled); and a
    # "control" token outside it, which transformers skips as a mislabel.
    tokens = (["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [BYTES[b] for b in range(256)]
              + ["he", "ll", "hell", "hello", "Ġw", "Ġwo", "Ġwor", "<think>", "é", "<ctl-é>"])
    merges = ["h e", "l l", "he ll", "hell o", "Ġ w", "Ġw o", "Ġwo r"]
    types = [3, 3, 3] + [1] * 256 + [1, 1, 1, 1, 1, 1, 1, 4, 1, 3]
    defaults = dict(bos_token_id=1, eos_token_id=2, pad_token_id=2, add_bos_token=True,
                    chat_template="{% for m in messages %}<|im_start|>{{ m['content'] }}"
                                  "<|im_end|>{% endfor %}")
    defaults.update(fields)
    return _write_gguf(folder / name, tokens=tokens, merges=merges, types=types, **defaults)


@pytest.mark.parametrize("pre", [None, "qwen2", "llama-bpe"])
def test_small_gpt2_matches_transformers(tmp_path, pre):
    fields = {} if pre is None else {"tokenizer_pre": pre}
    path = _small_gpt2(tmp_path, **fields)
    ours = gt.load_gguf_tokenizer(path, use_cache=False)
    ref = _reference(str(path))
    assert _backend_json(ours) == _backend_json(ref)
    for text in ["hello world <think> é <|im_start|>x<ctl-é>", "", "  hello\n\nworld 123 ☃"]:
        assert ours(text).input_ids == ref(text).input_ids
    for attr in SPECIAL_ATTRS:
        assert getattr(ours, attr) == getattr(ref, attr), attr
    assert ours.apply_chat_template(CONVERSATION[:2], tokenize=False) == \
        ref.apply_chat_template(CONVERSATION[:2], tokenize=False)


def test_gemma_merges_equal_generate_merges():
    """The sort-free merge recovery equals transformers' ``generate_merges`` (with duplicates)."""
    from transformers.tokenization_utils_base import generate_merges

    rng = random.Random(0)
    alphabet = "ab▁c"
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>"] + list(alphabet)
    tokens += ["".join(rng.choice(alphabet) for _ in range(rng.randint(2, 6))) for _ in range(400)]
    tokens += ["ab", "▁▁", "ab"]  # duplicates: the last index wins in the vocabulary
    vocab = {t: i for i, t in enumerate(tokens)}
    expected = generate_merges(vocab, {t: -i for i, t in enumerate(tokens)})
    assert gt._gemma_merges(tokens, vocab) == expected


def test_cache_round_trip_and_keys(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv(gt.CACHE_ENV, str(cache))
    path = _small_gpt2(tmp_path)
    first = gt.load_gguf_tokenizer(path)
    entries = list(cache.iterdir())
    assert len(entries) == 1 and entries[0].name == gt.cache_key(path)
    assert json.loads((entries[0] / "wrapper.json").read_text())["eos_token"] == "<|im_end|>"

    monkeypatch.setattr(gt, "build_gguf_tokenizer", _must_not_build)
    second = gt.load_gguf_tokenizer(path)
    monkeypatch.undo()
    monkeypatch.setenv(gt.CACHE_ENV, str(cache))
    assert _backend_json(second) == _backend_json(first)
    assert second("hello <think>").input_ids == first("hello <think>").input_ids

    st = path.stat()  # a new version of the file (mtime) has a new key
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert gt.cache_key(path) != entries[0].name
    gt.load_gguf_tokenizer(path)
    assert len(list(cache.iterdir())) == 2


def test_damaged_cache_entry_is_rebuilt(tmp_path, monkeypatch, caplog):
    cache = tmp_path / "cache"
    monkeypatch.setenv(gt.CACHE_ENV, str(cache))
    path = _small_gpt2(tmp_path)
    good = gt.load_gguf_tokenizer(path)
    entry = cache / gt.cache_key(path)
    (entry / "tokenizer.json").write_text("{not json")
    with caplog.at_level(logging.WARNING, logger=gt.__name__):
        again = gt.load_gguf_tokenizer(path)
    assert "damaged" in caplog.text
    assert _backend_json(again) == _backend_json(good)
    json.loads((entry / "tokenizer.json").read_text())  # stored afresh


def test_cache_can_be_turned_off(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("JAX_SERVE_CACHE", str(tmp_path / "jax-serve"))
    monkeypatch.setenv(gt.CACHE_ENV, "off")
    assert gt.cache_dir() is None
    gt.load_gguf_tokenizer(_small_gpt2(tmp_path))
    assert not (tmp_path / "jax-serve").exists() and not (tmp_path / "home").exists()
    monkeypatch.delenv(gt.CACHE_ENV)
    assert gt.cache_dir() == tmp_path / "jax-serve" / "tokenizers"


def test_unsupported_kind_falls_back_to_transformers(tmp_path, monkeypatch, caplog):
    from model import tokenizer as tokenizer_mod

    tokens = ["<unk>", "<s>", "</s>", "▁a", "▁b"]
    # a llama-kind (SentencePiece) vocabulary of a non-Gemma architecture
    path = _write_gguf(tmp_path / "spm.gguf", model="llama", tokens=tokens,
                       scores=[0.0, 0.0, 0.0, -1.0, -2.0], types=[2, 3, 3, 1, 1])
    with pytest.raises(gt.UnsupportedTokenizer, match="'llama'"):
        gt.load_gguf_tokenizer(path, use_cache=False)

    monkeypatch.setattr(tokenizer_mod, "_transformers_gguf_tokenizer", lambda file: _Fake())
    with caplog.at_level(logging.WARNING, logger=tokenizer_mod.__name__):
        tok = tokenizer_mod.load_tokenizer(path, "gguf")
    assert isinstance(tok, _Fake)
    assert "with transformers instead" in caplog.text
    assert any(r.levelno == logging.WARNING for r in caplog.records)


class _Fake:
    chat_template = None


def test_not_a_gguf_file(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 16 + b"\x00" * 8)
    with pytest.raises(ValueError):
        gt.read_tokenizer_metadata(junk)
    short = tmp_path / "short.gguf"
    short.write_bytes(b"GGU")
    with pytest.raises(ValueError):
        gt.read_tokenizer_metadata(short)
