"""Fixed-shape sampling tensors: one compiled ``sample`` for every feature mix,
and its results against a plain numpy reference (vLLM's semantics)."""

from __future__ import annotations

import dataclasses
import time
from typing import Optional

import jax
import numpy as np
import pytest

from serving.engine import sampling_tensors as T
from serving.engine.sampling import row_uniforms, sample
from serving.engine.sampling_tensors import build_sampling_tensors, default_sampling_tensors
from serving.engine.types import SamplingParams

V = 300  # not a multiple of 32: the packed mask has a partial last word
WORDS = (V + 31) // 32
S = 8
W = 64  # max_model_len
K = 5  # max_logprobs


@dataclasses.dataclass
class Item:  # the fields of runner.StepItem that sampling reads
    params: SamplingParams
    seed: int = 0
    output_token_ids: tuple = ()
    prompt_token_ids: tuple = ()
    banned_ids: tuple = ()
    token_bitmask: Optional[np.ndarray] = None


def _build(items, num_seqs=S):
    return build_sampling_tensors(items, num_seqs, vocab_size=V, max_model_len=W,
                                  max_logprobs=K)


def _logits(seed=0, rows=S):
    return (np.random.default_rng(seed).normal(size=(rows, V)) * 3).astype(np.float32)


def _pack(allowed: np.ndarray) -> np.ndarray:
    """[n] bool (n <= 32 * words) -> packed int32 words, as guided.py packs them."""
    bits = np.zeros((-(-len(allowed) // 32) * 32,), bool)
    bits[:len(allowed)] = allowed
    return np.packbits(bits, bitorder="little").view("<i4").astype(np.int32)


# ---- the numpy reference ------------------------------------------------------

def _ref_adjusted(x: np.ndarray, it: Item) -> np.ndarray:
    """Penalties (vLLM), logit bias, whitelist, bans and guide mask on one row."""
    p = it.params
    x = x.astype(np.float64).copy()
    out = np.asarray(it.output_token_ids, np.int64)
    counts = np.bincount(out, minlength=V)[:V].astype(np.float64)
    if p.repetition_penalty != 1.0:
        seen = counts > 0
        seen[np.asarray(it.prompt_token_ids, np.int64)] = True
        x = np.where(seen, np.where(x > 0, x / p.repetition_penalty,
                                    x * p.repetition_penalty), x)
    x -= p.frequency_penalty * counts
    x -= p.presence_penalty * (counts > 0)
    for t, b in p.logit_bias.items():
        x[t] += b
    ok = np.ones((V,), bool)
    if p.allowed_token_ids is not None:
        ok[:] = False
        ok[p.allowed_token_ids] = True
    ok[list(it.banned_ids)] = False
    if it.token_bitmask is not None:
        words = np.asarray(it.token_bitmask, np.int32)
        bits = np.unpackbits(words.view(np.uint8), bitorder="little").astype(bool)
        g = np.zeros((V,), bool)
        g[:min(V, len(bits))] = bits[:V]
        ok &= g
    return np.where(ok, x, -np.inf)


def _ref_filter(scaled: np.ndarray, p: SamplingParams) -> np.ndarray:
    """min-p, then top-k, then top-p on the renormalised rest (vLLM's order)."""
    order = np.argsort(-scaled, kind="stable")
    srt = scaled[order]
    probs = np.exp(srt - srt[0])
    probs /= probs.sum()
    keep = probs >= p.min_p * probs[0]
    if p.top_k > 0:
        keep[p.top_k:] = False
    kept = np.where(keep, probs, 0.0)
    kept /= kept.sum()
    if p.top_p < 1.0:
        keep &= (np.cumsum(kept) - kept) < p.top_p
    keep[0] = True
    out = scaled.copy()
    out[order[~keep]] = -np.inf
    return out


def _ref_tokens(logits: np.ndarray, items) -> np.ndarray:
    toks = []
    for r, it in enumerate(items):
        x = _ref_adjusted(logits[r], it)
        p = it.params
        if p.greedy:
            toks.append(int(np.argmax(x)))
            continue
        scaled = _ref_filter(x / p.temperature, p)
        probs = np.exp(scaled - scaled.max())
        u = np.asarray(row_uniforms(np.array([it.seed & 0xFFFFFFFF], np.uint32),
                                    np.array([len(it.output_token_ids)], np.int32), V))[0]
        toks.append(int(np.argmax(probs / -np.log(u.astype(np.float64)))))
    return np.array(toks)


def _check(res, logits: np.ndarray, items) -> None:
    n = len(items)
    tokens = np.asarray(res.tokens)[:n]
    np.testing.assert_array_equal(tokens, _ref_tokens(logits, items))
    lp = logits.astype(np.float64)
    lp = lp - (np.log(np.exp(lp - lp.max(-1, keepdims=True)).sum(-1, keepdims=True))
               + lp.max(-1, keepdims=True))
    np.testing.assert_allclose(np.asarray(res.logprobs)[:n], lp[np.arange(n), tokens],
                               rtol=1e-4, atol=1e-4)
    assert res.top_ids.shape == (S, K) and res.top_logprobs.shape == (S, K)
    if any(it.params.logprobs is not None for it in items):
        ranks = (lp[:n] > lp[np.arange(n), tokens][:, None]).sum(-1) + 1
        np.testing.assert_array_equal(np.asarray(res.ranks)[:n], ranks)
        top = np.argsort(-lp[:n], axis=-1, kind="stable")[:, :K]
        np.testing.assert_array_equal(np.asarray(res.top_ids)[:n], top)
        np.testing.assert_allclose(np.asarray(res.top_logprobs)[:n],
                                   np.take_along_axis(lp[:n], top, -1), rtol=1e-4, atol=1e-4)
    else:
        np.testing.assert_array_equal(np.asarray(res.ranks), 1)


# ---- feature mixes --------------------------------------------------------------

def _guide(seed: int) -> np.ndarray:
    allowed = np.random.default_rng(seed).random(V - 20) < 0.3  # tokenizer narrower than V
    return _pack(allowed)


def _rows(kind: str):
    """S rows for one feature mix (the odd rows plain greedy, so mixes share batches)."""
    P = SamplingParams
    hist = dict(output_token_ids=(3, 3, 7, 11, 250), prompt_token_ids=(1, 2, 3, 40, 41))
    make = {
        "greedy": lambda i: Item(P(temperature=0.0)),
        "temperature": lambda i: Item(P(temperature=0.7), seed=i + 1),
        "top_k": lambda i: Item(P(temperature=1.0, top_k=3), seed=i + 11),
        "top_p": lambda i: Item(P(temperature=0.9, top_p=0.9), seed=i + 21),
        "min_p": lambda i: Item(P(temperature=1.3, min_p=0.2), seed=i + 31),
        "repetition": lambda i: Item(P(temperature=0.0, repetition_penalty=1.7), **hist),
        "frequency": lambda i: Item(P(temperature=0.0, frequency_penalty=1.5), **hist),
        "presence": lambda i: Item(P(temperature=0.0, presence_penalty=2.0), **hist),
        "logit_bias": lambda i: Item(P(temperature=0.0, logit_bias={5 + i: 9.0, 0: -100.0})),
        "allowed": lambda i: Item(P(temperature=0.0, allowed_token_ids=[7, 100 + i, 299])),
        "banned": lambda i: Item(P(temperature=0.0), banned_ids=tuple(range(0, V, 2))),
        "bitmask": lambda i: Item(P(temperature=0.0), token_bitmask=_guide(i)),
        "logprobs": lambda i: Item(P(temperature=0.0, logprobs=3 if i % 4 == 0 else None)),
        "all": lambda i: Item(
            P(temperature=[0.0, 0.8, 1.1][i % 3], top_k=[-1, 50, 7][i % 3],
              top_p=[1.0, 0.8, 0.95][i % 3], min_p=[0.0, 0.05, 0.0][i % 3],
              repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.3,
              logit_bias={3: 4.0, 250 + i: 2.5}, allowed_token_ids=list(range(0, V, 3)),
              logprobs=K if i % 2 else 0),
            seed=1000 + i, banned_ids=(6, 9), token_bitmask=_guide(50 + i), **hist),
    }[kind]
    return [make(i) if i % 2 == 0 or kind == "all" else Item(P(temperature=0.0))
            for i in range(S - 1)]  # the last row is padding


KINDS = ["greedy", "temperature", "top_k", "top_p", "min_p", "repetition", "frequency",
         "presence", "logit_bias", "allowed", "banned", "bitmask", "logprobs", "all"]


@pytest.fixture(scope="module")
def jitted():
    return jax.jit(sample)


@pytest.mark.parametrize("kind", KINDS)
def test_each_feature_matches_the_numpy_reference(jitted, kind):
    items = _rows(kind)
    logits = _logits(seed=KINDS.index(kind))
    _check(jitted(logits, _build(items)), logits, items)


def test_one_program_serves_every_feature_mix(jitted):
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, *_a, **_k: compiles.append(name)
        if name == "/jax/core/compile/backend_compile_duration" else None)
    f = jax.jit(lambda logits, st: sample(logits, st))  # its own dispatch cache
    logits = _logits(seed=99)
    jax.block_until_ready(f(logits, default_sampling_tensors(
        S, vocab_size=V, max_model_len=W, max_logprobs=K)))
    assert f._cache_size() == 1
    before = len(compiles)
    batches = [_rows(kind) for kind in KINDS]
    batches.append([_rows(k)[0] for k in KINDS[:S - 1]])  # one feature per row, one batch
    results = [jax.block_until_ready(f(logits, _build(items))) for items in batches]
    assert f._cache_size() == 1
    assert len(compiles) == before, "a feature mix compiled a new program"
    for items, res in zip(batches, results):  # (the reference compiles its own helpers)
        _check(res, logits, items)


def test_shapes_depend_only_on_rows_and_server_constants():
    shapes = {tuple((k, np.shape(v)) for k, v in dataclasses.asdict(_build(_rows(kind))).items()
                    if k != "max_logprobs")
              for kind in KINDS}
    shapes.add(tuple((k, np.shape(v)) for k, v in dataclasses.asdict(default_sampling_tensors(
        S, vocab_size=V, max_model_len=W, max_logprobs=K)).items() if k != "max_logprobs"))
    assert len(shapes) == 1
    assert dict(next(iter(shapes))) == {
        "row_f32": (S, T.NUM_F32), "row_i32": (S, T.NUM_I32), "history": (S, W),
        "bias_ids": (S, T.LOGIT_BIAS_WIDTH), "bias_vals": (S, T.LOGIT_BIAS_WIDTH),
        "token_bitmask": (S, WORDS)}


# ---- the host builder --------------------------------------------------------------

def test_builder_layout():
    P = SamplingParams
    guide = _pack(np.arange(V - 40) % 5 == 0)  # narrower than the model's vocab
    items = [
        Item(P(temperature=0.5, top_p=0.8), seed=-1, output_token_ids=(4, 4)),
        Item(P(temperature=0.0, top_k=10, repetition_penalty=1.2), seed=2**40 + 5,
             output_token_ids=(9, 8), prompt_token_ids=(1, 2, 3)),
        Item(P(temperature=1.0, frequency_penalty=0.5), output_token_ids=(7,),
             prompt_token_ids=(1, 2)),
        Item(P(temperature=0.0, allowed_token_ids=[1, 33, 299], logprobs=2),
             banned_ids=(33,), token_bitmask=None),
        Item(P(temperature=0.0), token_bitmask=guide, banned_ids=(5,)),
    ]
    st = _build(items)
    f, i = st.row_f32, st.row_i32
    np.testing.assert_allclose(f[:, T.F_TEMPERATURE], [0.5, 0, 1.0, 0, 0, 0, 0, 0])
    np.testing.assert_allclose(f[0, [T.F_TOP_P, T.F_MIN_P]], [0.8, 0.0], rtol=1e-6)
    assert i[0, T.I_TOP_K] == V and i[1, T.I_TOP_K] == V  # greedy rows skip the filter
    np.testing.assert_array_equal(i[:, T.I_SEED].view(np.uint32)[:2], [2**32 - 1, 5])
    np.testing.assert_array_equal(i[:5, T.I_STEP], [2, 2, 1, 0, 0])
    np.testing.assert_array_equal(i[:, T.I_FLAGS], [
        T.FLAG_TOP, T.FLAG_PENALTY, T.FLAG_PENALTY, T.FLAG_MASK | T.FLAG_LOGPROBS,
        T.FLAG_MASK, 0, 0, 0])
    # history: outputs as V + t, the prompt only for a repetition penalty, pad 2V
    assert sorted(st.history[1][st.history[1] < 2 * V].tolist()) == [1, 2, 3, V + 8, V + 9]
    assert st.history[2][st.history[2] < 2 * V].tolist() == [V + 7]
    assert (st.history[[0, 3, 4, 5]] == 2 * V).all()
    f32 = np.unpackbits(st.token_bitmask.view(np.uint8), axis=1, bitorder="little")[:, :V]
    assert np.flatnonzero(f32[3]).tolist() == [1, 299]  # whitelist minus the ban
    expect = np.zeros((V,), bool)
    expect[:V - 40] = np.arange(V - 40) % 5 == 0
    expect[5] = False
    np.testing.assert_array_equal(f32[4].astype(bool), expect)
    assert f32[[0, 1, 2, 5]].all()
    assert (st.bias_ids == V).all() and (st.bias_vals == 0).all()


def test_logit_bias_beyond_the_table_keeps_the_largest(caplog):
    n = T.LOGIT_BIAS_WIDTH + 30
    bias = {t: (1.0 if t < n - 5 else 50.0) for t in range(n)}
    with pytest.raises(ValueError, match="logit_bias"):  # the API never gets this far
        SamplingParams(temperature=0.0, logit_bias=bias)
    params = SamplingParams(temperature=0.0)
    params.logit_bias = bias  # past validation: the builder still copes
    st = build_sampling_tensors([Item(params)], 2,
                                vocab_size=1000, max_model_len=W, max_logprobs=K)
    row = dict(zip(st.bias_ids[0].tolist(), st.bias_vals[0].tolist()))
    assert len(row) == T.LOGIT_BIAS_WIDTH
    assert all(row[t] == 50.0 for t in range(n - 5, n))
    assert "logit_bias" in caplog.text


def test_default_tensors_share_read_only_tables():
    a = default_sampling_tensors(S, vocab_size=V, max_model_len=W, max_logprobs=K)
    b = _build([Item(SamplingParams(temperature=0.7))])
    assert a.history is b.history and a.token_bitmask is b.token_bitmask
    assert not a.history.flags.writeable
    assert (a.row_i32[:, T.I_FLAGS] == 0).all() and (a.temperature == 0).all()


def test_builder_is_fast_on_the_host():
    """No per-vocabulary Python work: 32 featureless rows well under a millisecond
    on a quiet machine (the bound here is loose: CI machines are shared)."""
    V_big, W_big = 49152, 4096
    items = [Item(SamplingParams(temperature=0.7, top_p=0.9), seed=i,
                  output_token_ids=tuple(range(20))) for i in range(32)]
    build = lambda: build_sampling_tensors(items, 32, vocab_size=V_big, max_model_len=W_big,
                                           max_logprobs=20)
    build()
    ts = []
    for _ in range(50):
        t = time.perf_counter()
        build()
        ts.append(time.perf_counter() - t)
    assert np.median(ts) < 5e-3


def test_whitelist_rows_are_cached_per_request_and_dropped_with_it():
    import gc
    p = SamplingParams(temperature=0.0, allowed_token_ids=[4, 5])
    first = _build([Item(p)]).token_bitmask[0].copy()
    assert id(p) in T._WHITELISTS
    p.allowed_token_ids = [6]  # a new list: not the cached row
    again = _build([Item(p)]).token_bitmask[0]
    bits = np.unpackbits(np.stack([first, again]).view(np.uint8), axis=1, bitorder="little")
    assert np.flatnonzero(bits[0]).tolist() == [4, 5]
    assert np.flatnonzero(bits[1]).tolist() == [6]
    key = id(p)
    del p
    gc.collect()
    assert key not in T._WHITELISTS
