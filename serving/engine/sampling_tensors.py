"""Host side of sampling: a step's ``StepItem``s -> ``SamplingTensors`` (numpy only).

Every array's shape depends only on ``S`` (the padded rows) and server
constants (the vocabulary ``V``, ``max_model_len``, ``max_logprobs``), never
on what the requests ask for, so one compiled sampling program serves every
mix of temperature, top-k/p, min-p, penalties, logit bias, allowed/banned ids,
guided masks and logprobs: features are switched on per row by bits in
``FLAGS`` and per batch by ``lax.cond`` on device (``serving.engine.sampling``).

Layout (``W = max_model_len``, ``B = LOGIT_BIAS_WIDTH``, ``M = ceil(V / 32)``):

* ``row_f32 [S, 6] f32``: temperature (0 = greedy), top_p, min_p,
  repetition, frequency and presence penalty (columns ``F_*``).
* ``row_i32 [S, 4] i32``: top_k (V = off), seed (uint32 bits), step (tokens
  generated so far) and the row's feature flags (columns ``I_*``, bits ``FLAG_*``).
* ``history [S, W] i32``: the token history the penalties count; a prompt
  token ``t`` is stored as ``t`` (only for rows with a repetition penalty,
  the only penalty that looks at the prompt), a generated one as ``V + t``;
  padding is ``2V`` (dropped by the device's scatter). A row keeps its newest
  ``W`` entries (prompt + output never exceed ``max_model_len`` anyway).
* ``bias_ids [S, B] i32`` (pad ``V``, dropped) and ``bias_vals [S, B] f32``:
  ``logit_bias``. A row with more than ``B`` entries keeps the ``B`` largest
  in magnitude (and a warning is logged): the API layer should reject more
  than ``MAX_LOGIT_BIAS`` (OpenAI's 300) before a request gets here.
* ``token_bitmask [S, M] i32``: packed allowed-token bits (bit ``t % 32`` of
  word ``t // 32``), the AND of ``allowed_token_ids``, the step's bans
  (``banned_ids``: min_tokens' EOS/stop ids, bad words) and the guided-decoding
  mask; all ones where a row has none of them.

The class is a plain frozen dataclass here; ``serving.engine.sampling``
registers it as a jax pytree (every field is data except the static
``max_logprobs``, a server constant) on import.
"""

from __future__ import annotations

import dataclasses
import logging
import weakref
from typing import Sequence

import numpy as np

logger = logging.getLogger(__name__)

MAX_LOGIT_BIAS = 300  # what the API should accept (OpenAI's cap)
LOGIT_BIAS_WIDTH = 320  # the table's fixed width (>= MAX_LOGIT_BIAS)

# row_f32 columns
F_TEMPERATURE, F_TOP_P, F_MIN_P, F_REPETITION, F_FREQUENCY, F_PRESENCE = range(6)
NUM_F32 = 6
# row_i32 columns
I_TOP_K, I_SEED, I_STEP, I_FLAGS = range(4)
NUM_I32 = 4
# per-row feature bits (row_i32[:, I_FLAGS])
FLAG_TOP = 1  # top-k / top-p / min-p filter (sampled rows only)
FLAG_PENALTY = 2  # repetition / frequency / presence penalty
FLAG_BIAS = 4  # logit_bias entries
FLAG_MASK = 8  # token_bitmask row is not all ones
FLAG_LOGPROBS = 16  # the row wants ranks and the top-K alternatives


@dataclasses.dataclass(frozen=True)
class SamplingTensors:
    """Per-row sampling settings for one step; ``S`` is the padded batch."""

    row_f32: np.ndarray  # [S, 6] f32, columns F_*
    row_i32: np.ndarray  # [S, 4] i32, columns I_*
    history: np.ndarray  # [S, W] i32: prompt t, output V + t, pad 2V
    bias_ids: np.ndarray  # [S, B] i32 (pad V)
    bias_vals: np.ndarray  # [S, B] f32
    token_bitmask: np.ndarray  # [S, ceil(V/32)] i32, all ones = unconstrained
    max_logprobs: int = 0  # static: K, the top alternatives computed when a row asks

    # named views (work on numpy and on traced jax arrays alike)
    @property
    def temperature(self):
        return self.row_f32[:, F_TEMPERATURE]

    @property
    def top_p(self):
        return self.row_f32[:, F_TOP_P]

    @property
    def min_p(self):
        return self.row_f32[:, F_MIN_P]

    @property
    def rep_pen(self):
        return self.row_f32[:, F_REPETITION]

    @property
    def freq_pen(self):
        return self.row_f32[:, F_FREQUENCY]

    @property
    def pres_pen(self):
        return self.row_f32[:, F_PRESENCE]

    @property
    def top_k(self):
        return self.row_i32[:, I_TOP_K]

    @property
    def steps(self):
        return self.row_i32[:, I_STEP]

    @property
    def flags(self):
        return self.row_i32[:, I_FLAGS]


# Read-only tables for rows/batches that use nothing, shared between steps:
# filling S x max_model_len every step would cost more than the rest of the
# build. Keyed by (kind, shape, fill).
_CONST: dict[tuple, np.ndarray] = {}


def _const(kind: str, shape: tuple, fill, dtype) -> np.ndarray:
    key = (kind, shape, fill)
    arr = _CONST.get(key)
    if arr is None:
        if len(_CONST) > 256:
            _CONST.clear()
        arr = np.full(shape, fill, dtype)
        arr.flags.writeable = False
        _CONST[key] = arr
    return arr


def _default_rows(num_seqs: int, vocab_size: int):
    f = np.zeros((num_seqs, NUM_F32), np.float32)
    f[:, F_TOP_P] = 1.0
    f[:, F_REPETITION] = 1.0
    i = np.zeros((num_seqs, NUM_I32), np.int32)
    i[:, I_TOP_K] = vocab_size
    return f, i


def default_sampling_tensors(num_seqs: int, *, vocab_size: int, max_model_len: int,
                             max_logprobs: int) -> SamplingTensors:
    """Greedy, featureless settings for ``num_seqs`` rows (padding-only/dummy steps)."""
    f, i = _default_rows(num_seqs, vocab_size)
    words = (vocab_size + 31) // 32
    return SamplingTensors(
        row_f32=f, row_i32=i,
        history=_const("hist", (num_seqs, max_model_len), 2 * vocab_size, np.int32),
        bias_ids=_const("bias_ids", (num_seqs, LOGIT_BIAS_WIDTH), vocab_size, np.int32),
        bias_vals=_const("bias_vals", (num_seqs, LOGIT_BIAS_WIDTH), 0.0, np.float32),
        token_bitmask=_const("mask", (num_seqs, words), -1, np.int32),
        max_logprobs=max_logprobs)


def _ids(values: Sequence[int], vocab_size: int) -> np.ndarray:
    a = np.asarray(values, np.int64).reshape(-1)
    return a[(a >= 0) & (a < vocab_size)]


def _clear_bits(row: np.ndarray, ids: np.ndarray) -> None:
    """Clears token ``ids``' bits in one packed row (in place)."""
    bits = (np.int64(1) << (ids & 31)).astype(np.uint32).view(np.int32)
    np.bitwise_and.at(row, ids >> 5, ~bits)


def _whitelist_row(ids: np.ndarray, words: int) -> np.ndarray:
    keep = np.zeros((words * 32,), bool)
    keep[ids] = True
    return np.packbits(keep, bitorder="little").view("<i4").astype(np.int32, copy=False)


# A request's whitelist is the same every step: its packed row is kept, keyed by
# the SamplingParams (weakly: the entry goes when the params do) and the list.
_WHITELISTS: dict[int, tuple] = {}


def _forget(ref, key: int) -> None:
    hit = _WHITELISTS.get(key)
    if hit is not None and hit[0] is ref:
        del _WHITELISTS[key]


def _whitelist(params, vocab_size: int, words: int) -> np.ndarray:
    allowed = params.allowed_token_ids
    key = id(params)
    hit = _WHITELISTS.get(key)
    if (hit is not None and hit[0]() is params and hit[1] is allowed
            and hit[2] == (len(allowed), vocab_size)):
        return hit[3]
    row = _whitelist_row(_ids(allowed, vocab_size), words)
    row.flags.writeable = False
    try:
        ref = weakref.ref(params, lambda r, k=key: _forget(r, k))
    except TypeError:  # not weak-referenceable: no caching
        return row
    _WHITELISTS[key] = (ref, allowed, (len(allowed), vocab_size), row)
    return row


def build_sampling_tensors(items: Sequence, num_seqs: int, *, vocab_size: int,
                           max_model_len: int, max_logprobs: int) -> SamplingTensors:
    """The step's sampling tensors for ``items`` (runner ``StepItem``s) in rows 0...

    Rows past ``len(items)`` are padding (greedy, no features).

    Args:
        items: objects with ``params`` (``SamplingParams``), ``seed``,
            ``output_token_ids``, ``prompt_token_ids``, ``banned_ids`` and
            ``token_bitmask`` (``[ceil(V_tok/32)]`` i32 or None), as ``StepItem``.
        num_seqs: S, the padded number of rows (>= len(items)).
        vocab_size: V, the logits' width.
        max_model_len: W, the history width.
        max_logprobs: K, the fixed number of top alternatives.
    """
    V, W = vocab_size, max_model_len
    f, iv = _default_rows(num_seqs, V)
    seeds = np.zeros((num_seqs,), np.uint32)
    words = (V + 31) // 32
    hist = bias_ids = bias_vals = mask = None
    for r, it in enumerate(items):
        p = it.params
        flags = 0
        seeds[r] = it.seed & 0xFFFFFFFF
        out = it.output_token_ids
        iv[r, I_STEP] = len(out)
        if not p.greedy:
            f[r, F_TEMPERATURE] = p.temperature
            if p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0:
                flags |= FLAG_TOP
                iv[r, I_TOP_K] = p.top_k if 0 < p.top_k < V else V
                f[r, F_TOP_P] = p.top_p
                f[r, F_MIN_P] = p.min_p
        if (p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0
                or p.presence_penalty != 0.0):
            flags |= FLAG_PENALTY
            f[r, F_REPETITION] = p.repetition_penalty
            f[r, F_FREQUENCY] = p.frequency_penalty
            f[r, F_PRESENCE] = p.presence_penalty
            if hist is None:
                hist = np.full((num_seqs, W), 2 * V, np.int32)
            n_out = min(len(out), W)
            if n_out:
                hist[r, :n_out] = np.asarray(out[len(out) - n_out:], np.int32) + V
            if p.repetition_penalty != 1.0:
                prompt = it.prompt_token_ids
                n_p = min(len(prompt), W - n_out)
                if n_p:
                    hist[r, n_out:n_out + n_p] = prompt[len(prompt) - n_p:]
        if p.logit_bias:
            flags |= FLAG_BIAS
            if bias_ids is None:
                bias_ids = np.full((num_seqs, LOGIT_BIAS_WIDTH), V, np.int32)
                bias_vals = np.zeros((num_seqs, LOGIT_BIAS_WIDTH), np.float32)
            ids = np.fromiter(p.logit_bias.keys(), np.int64, len(p.logit_bias))
            vals = np.fromiter(p.logit_bias.values(), np.float32, len(p.logit_bias))
            ok = (ids >= 0) & (ids < V)
            if not ok.all():
                ids, vals = ids[ok], vals[ok]
            if len(ids) > LOGIT_BIAS_WIDTH:
                logger.warning("logit_bias with %d entries: only the %d largest are applied",
                               len(ids), LOGIT_BIAS_WIDTH)
                keep = np.argsort(-np.abs(vals), kind="stable")[:LOGIT_BIAS_WIDTH]
                ids, vals = ids[keep], vals[keep]
            bias_ids[r, :len(ids)] = ids
            bias_vals[r, :len(ids)] = vals
        allowed = p.allowed_token_ids
        guide = it.token_bitmask
        banned = it.banned_ids
        if allowed is not None or guide is not None or len(banned):
            flags |= FLAG_MASK
            if mask is None:
                mask = np.full((num_seqs, words), -1, np.int32)
            row = mask[r]
            if allowed is not None:
                row[:] = _whitelist(p, V, words)
            if guide is not None:
                g = np.asarray(guide, np.int32)
                n = min(len(g), words)
                row[:n] &= g[:n]
                row[n:] = 0
            if len(banned):
                _clear_bits(row, _ids(banned, V))
        if p.logprobs is not None:
            flags |= FLAG_LOGPROBS
        iv[r, I_FLAGS] = flags
    iv[:, I_SEED] = seeds.view(np.int32)
    if hist is None:
        hist = _const("hist", (num_seqs, W), 2 * V, np.int32)
    if bias_ids is None:
        bias_ids = _const("bias_ids", (num_seqs, LOGIT_BIAS_WIDTH), V, np.int32)
        bias_vals = _const("bias_vals", (num_seqs, LOGIT_BIAS_WIDTH), 0.0, np.float32)
    if mask is None:
        mask = _const("mask", (num_seqs, words), -1, np.int32)
    return SamplingTensors(row_f32=f, row_i32=iv, history=hist, bias_ids=bias_ids,
                           bias_vals=bias_vals, token_bitmask=mask,
                           max_logprobs=max_logprobs)
