"""Every decoder family vs transformers (PyTorch, float32) on tiny random checkpoints.

Each checkpoint goes through ``save_pretrained`` (safetensors) and
``model.loader.load_model``; the KV cache uses page size 4 and shuffled,
non-contiguous page ids.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from model import api
from model.attention import AttentionMetadata, KVCache
from model.generate import greedy_generate
from model.loader import load_model
from tests.model.tiny_hf import FAMILIES, save_hf_model

PAGE_SIZE = 4
NUM_PAGES = 40
RTOL = 1e-4

_forward = jax.jit(api.forward, static_argnums=0)
_logits = jax.jit(api.compute_logits, static_argnums=0)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_pair(request, tmp_path_factory):
    """``(family, transformers model, LoadedModel)`` for each family."""
    family = request.param
    path = tmp_path_factory.mktemp(family)
    hf = save_hf_model(family, path)
    loaded = load_model(str(path), with_tokenizer=False)
    assert loaded.format == "hf"
    return family, hf, loaded


def _hf_logits(hf, ids) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.tensor(np.asarray(ids))[None]).logits[0].numpy()  # [L, vocab]


def _assert_close(actual, expected, what=""):
    err = np.abs(np.asarray(actual) - expected).max() / np.abs(expected).max()
    assert err < RTOL, f"{what}: relative error {err:.2e}"


class Batch:
    """Host-side bookkeeping of a few sequences sharing one paged cache."""

    def __init__(self, num_seqs: int, pages_per_seq: int, seed: int = 0):
        ids = np.random.default_rng(seed).permutation(np.arange(1, NUM_PAGES))
        self.pages = ids[:num_seqs * pages_per_seq].reshape(num_seqs, pages_per_seq)
        self.cached = [0] * num_seqs

    def metadata(self, chunks: list[list[int]], pad_tokens: int = 2):
        """Inputs for one step: ``chunks[s]`` are sequence s's new tokens.

        Adds ``pad_tokens`` padding tokens (scratch slot 0) and a padding sequence.
        """
        ids, pos, slots, starts = [], [], [], [0]
        for s, chunk in enumerate(chunks):
            p = np.arange(self.cached[s], self.cached[s] + len(chunk))
            ids += chunk
            pos += list(p)
            slots += list(self.pages[s][p // PAGE_SIZE] * PAGE_SIZE + p % PAGE_SIZE)
            starts.append(starts[-1] + len(chunk))
            self.cached[s] += len(chunk)
        ids += [0] * pad_tokens
        pos += [0] * pad_tokens
        slots += [0] * pad_tokens
        block_tables = np.concatenate([self.pages, np.zeros_like(self.pages[:1])])
        md = AttentionMetadata(
            block_tables=jnp.asarray(block_tables, jnp.int32),
            seq_lens=jnp.asarray(self.cached + [0], jnp.int32),
            query_start_loc=jnp.asarray(starts + [starts[-1]], jnp.int32),
            slot_mapping=jnp.asarray(slots, jnp.int32),
            max_q_len=max(len(c) for c in chunks))
        return jnp.asarray(ids, jnp.int32), jnp.asarray(pos, jnp.int32), md, starts


def _step(loaded, cache, batch, chunks):
    ids, pos, md, starts = batch.metadata(chunks)
    hidden, cache = _forward(loaded.graphdef, loaded.state, ids, pos, cache, md)
    logits = np.asarray(_logits(loaded.graphdef, loaded.state, hidden))
    return [logits[a:b] for a, b in zip(starts[:-1], starts[1:])], cache


def _cache(config, dtype=jnp.float32):
    return KVCache.zeros(config.num_layers, NUM_PAGES, PAGE_SIZE, config.num_kv_heads,
                         config.head_dim, dtype)


def test_prefill_and_decode_match_transformers(family_pair):
    family, hf, loaded = family_pair
    ids = np.random.default_rng(1).integers(0, 128, 18).tolist()
    expected = _hf_logits(hf, ids)  # [18, vocab]

    batch = Batch(num_seqs=1, pages_per_seq=5)
    cache = _cache(loaded.config)
    (prefill,), cache = _step(loaded, cache, batch, [ids[:16]])
    _assert_close(prefill, expected[:16], f"{family} prefill")
    for i in (16, 17):  # decode steps reading 16+ cached tokens
        (decode,), cache = _step(loaded, cache, batch, [[ids[i]]])
        _assert_close(decode, expected[i:i + 1], f"{family} decode at {i}")


def test_ragged_batch_matches_single_sequences(family_pair):
    family, hf, loaded = family_pair
    rng = np.random.default_rng(2)
    seqs = [rng.integers(0, 128, n).tolist() for n in (13, 9, 6)]
    expected = [_hf_logits(hf, s) for s in seqs]

    batch = Batch(num_seqs=3, pages_per_seq=4, seed=3)
    cache = _cache(loaded.config)
    # Step 1: prefills of different lengths. Step 2: a chunked-prefill
    # continuation mixed with two decodes.
    step1 = [seqs[0][:10], seqs[1][:8], seqs[2][:5]]
    out, cache = _step(loaded, cache, batch, step1)
    for s, chunk in enumerate(step1):
        _assert_close(out[s], expected[s][:len(chunk)], f"{family} step 1 seq {s}")
    step2 = [seqs[0][10:], seqs[1][8:], seqs[2][5:]]
    out, cache = _step(loaded, cache, batch, step2)
    for s, chunk in enumerate(step2):
        start = len(step1[s])
        _assert_close(out[s], expected[s][start:start + len(chunk)], f"{family} step 2 seq {s}")


@pytest.mark.parametrize("family", ["llama", pytest.param("gemma3", marks=pytest.mark.slow)])
def test_greedy_generate_matches_transformers(family, tmp_path):
    hf = save_hf_model(family, tmp_path, seed=4)
    loaded = load_model(str(tmp_path), with_tokenizer=False)
    prompt = [5, 17, 99, 3, 42, 8, 61]
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)
    ours = greedy_generate(loaded, prompt, 8, page_size=4, eos_token_ids=())
    assert ours == ref[0, len(prompt):].tolist()


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_bfloat16_close_to_float32(family, tmp_path):
    hf = save_hf_model(family, tmp_path, seed=5)
    loaded = load_model(str(tmp_path), dtype="bfloat16", with_tokenizer=False)
    assert jax.tree.leaves(loaded.state)[0].dtype == jnp.bfloat16
    ids = np.random.default_rng(6).integers(0, 128, 12).tolist()
    batch = Batch(num_seqs=1, pages_per_seq=3)
    (logits,), _ = _step(loaded, _cache(loaded.config, jnp.bfloat16), batch, [ids])
    assert logits.dtype == np.float32
    expected = _hf_logits(hf, ids)
    err = np.abs(logits - expected).max() / np.abs(expected).max()
    assert err < 5e-2, err
