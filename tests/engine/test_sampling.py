"""On-device sampling vs numpy expectations on crafted logits."""

import dataclasses

import jax
import numpy as np
import pytest

from serving.engine import sampling_tensors as T
from serving.engine.sampling import prompt_logprobs
from serving.engine.sampling import sample as _sample
from serving.engine.types import SamplingParams

V = 16
sample = jax.jit(_sample)  # as the runner runs it (eagerly, every lax.cond would retrace)


def _st(num, *, do_top=False, num_logprobs=0, **cols):
    """Default tensors with per-row columns overridden (temperature, seeds, ...)."""
    st = T.default_sampling_tensors(num, vocab_size=V, max_model_len=8, max_logprobs=4)
    f, i = st.row_f32.copy(), st.row_i32.copy()
    fcols = {"temperature": T.F_TEMPERATURE, "top_p": T.F_TOP_P, "min_p": T.F_MIN_P}
    icols = {"top_k": T.I_TOP_K, "seeds": T.I_SEED, "steps": T.I_STEP}
    for k, v in cols.items():
        if k in fcols:
            f[:, fcols[k]] = v
        else:
            i[:, icols[k]] = np.asarray(v).astype(np.uint32).view(np.int32)
    i[:, T.I_FLAGS] = (T.FLAG_TOP if do_top else 0) | (T.FLAG_LOGPROBS if num_logprobs else 0)
    return dataclasses.replace(st, row_f32=f, row_i32=i)


@dataclasses.dataclass
class _Item:
    params: SamplingParams
    seed: int = 0
    output_token_ids: tuple = ()
    prompt_token_ids: tuple = ()
    banned_ids: tuple = ()
    token_bitmask: object = None


def _built(items):
    return T.build_sampling_tensors(items, len(items), vocab_size=V, max_model_len=8,
                                    max_logprobs=4)


def _logits(rows, seed=0):
    return np.random.default_rng(seed).normal(size=(rows, V)).astype(np.float32) * 3


def test_greedy_is_argmax_and_logprobs_are_raw():
    x = _logits(3)
    res = sample(x, _st(3, num_logprobs=4))
    np.testing.assert_array_equal(res.tokens, x.argmax(-1))
    lse = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
    np.testing.assert_allclose(res.logprobs, x.max(-1) - lse, rtol=1e-5)
    np.testing.assert_array_equal(res.ranks, [1, 1, 1])
    np.testing.assert_array_equal(res.top_ids[:, 0], x.argmax(-1))
    assert res.top_ids.shape == (3, 4)


def test_seeded_rows_do_not_depend_on_the_batch():
    x = _logits(1, seed=3)
    alone = sample(x, _st(1, temperature=[1.0], seeds=[7], steps=[2])).tokens
    batch = np.concatenate([_logits(5, seed=9), x])
    st = _st(6, temperature=[1.0] * 6, seeds=[1, 2, 3, 4, 5, 7], steps=[0, 0, 0, 0, 0, 2])
    assert sample(batch, st).tokens[5] == alone[0]


def test_sampling_follows_the_distribution():
    x = np.log(np.array([[0.5, 0.3, 0.2] + [1e-9] * (V - 3)], np.float32))
    x = np.repeat(x, 2000, axis=0)
    st = _st(2000, temperature=[1.0] * 2000, seeds=np.arange(2000), steps=[0] * 2000)
    counts = np.bincount(np.asarray(sample(x, st).tokens), minlength=V)[:3] / 2000
    np.testing.assert_allclose(counts, [0.5, 0.3, 0.2], atol=0.04)


@pytest.mark.parametrize("kind", ["top_k", "top_p", "min_p"])
def test_top_filters_restrict_the_support(kind):
    probs = np.array([0.4, 0.3, 0.2, 0.1] + [0.0] * (V - 4)) + 1e-12
    x = np.repeat(np.log(probs / probs.sum())[None].astype(np.float32), 500, axis=0)
    over = dict(temperature=[1.0] * 500, seeds=np.arange(500), steps=[0] * 500, do_top=True)
    if kind == "top_k":
        over["top_k"] = [2] * 500
        allowed = {0, 1}
    elif kind == "top_p":
        over["top_p"] = [0.65] * 500  # 0.4 + 0.3 >= 0.65: nucleus {0, 1}
        allowed = {0, 1}
    else:
        over["min_p"] = [0.6] * 500  # keep p >= 0.24
        allowed = {0, 1}
    toks = set(np.asarray(sample(x, _st(500, **over)).tokens).tolist())
    assert toks == allowed


def test_bias_allowed_and_penalties():
    x = np.zeros((3, V), np.float32)
    x[:, 5] = 2.0
    st = _built([_Item(SamplingParams(temperature=0, logit_bias={3: 5.0})),
                 _Item(SamplingParams(temperature=0, allowed_token_ids=[7, 8])),
                 _Item(SamplingParams(temperature=0))])
    np.testing.assert_array_equal(sample(x, st).tokens, [3, 7, 5])
    # repetition penalty divides positive logits of seen tokens; presence subtracts
    y = np.zeros((2, V), np.float32)
    y[:, 5], y[:, 6] = 2.0, 1.5
    st = _built([_Item(SamplingParams(temperature=0, repetition_penalty=2.0),
                       output_token_ids=(5,)),
                 _Item(SamplingParams(temperature=0, presence_penalty=1.0),
                       output_token_ids=(5,))])
    np.testing.assert_array_equal(sample(y, st).tokens, [6, 6])


def test_prompt_logprobs_score_the_next_tokens():
    x = _logits(4)
    nxt = np.array([1, 2, 3, 4], np.int32)
    lp, rank, top_ids, top_lp = prompt_logprobs(x, nxt, 2)
    ref = x - np.log(np.exp(x).sum(-1, keepdims=True))
    np.testing.assert_allclose(lp, ref[np.arange(4), nxt], rtol=1e-5, atol=1e-5)
    assert top_ids.shape == (4, 2)


def test_first_argmax_takes_the_first_of_tied_maxima():
    from serving.engine.sampling import first_argmax
    x = np.array([[1.0, 3.0, 3.0, 0.0], [-1e30, -1e30, -1e30, -1e30], [0.0, 0.0, 0.0, 5.0],
                  [0.0, np.nan, 9.0, np.nan], [-np.inf, -np.inf, -np.inf, -np.inf]], np.float32)
    np.testing.assert_array_equal(first_argmax(x), x.argmax(-1))
    y = _logits(64, seed=5)
    np.testing.assert_array_equal(first_argmax(y), y.argmax(-1))


def test_mixed_batch_greedy_rows_stay_greedy_and_sampled_rows_vary():
    x = np.zeros((8, V), np.float32)
    x[:, 3] = 0.5  # a flat-ish distribution: argmax 3, but sampling spreads out
    temps = [0.0, 1.0] * 4
    toks = [np.asarray(sample(x, _st(8, temperature=temps, seeds=np.arange(8) + 100 * s,
                                     steps=[s] * 8)).tokens) for s in range(20)]
    toks = np.stack(toks)  # [steps, rows]
    assert (toks[:, 0::2] == 3).all()
    assert len(set(toks[:, 1::2].ravel().tolist())) > 5


def test_row_uniforms_are_uniform_and_keyed_by_seed_and_step():
    from serving.engine.sampling import row_uniforms
    u = np.asarray(row_uniforms(np.array([1, 1, 2], np.uint32), np.array([0, 1, 0], np.int32),
                                50_000))
    assert ((u > 0) & (u < 1)).all()
    for row in u:  # each decile holds ~10% of the draws
        hist = np.histogram(row, bins=10, range=(0, 1))[0] / row.size
        np.testing.assert_allclose(hist, 0.1, atol=0.01)
    assert abs(np.corrcoef(u[0], u[1])[0, 1]) < 0.02  # the step changes the stream
    assert abs(np.corrcoef(u[0], u[2])[0, 1]) < 0.02  # so does the seed
    again = np.asarray(row_uniforms(np.array([2], np.uint32), np.array([0], np.int32), 50_000))
    np.testing.assert_array_equal(again[0], u[2])
