"""The model runner: turns scheduled work into device arrays and runs compiled steps.

One engine step becomes at most one *decode* call (every sequence that adds a
single token, batched) plus one *prefill* call per sequence that adds a chunk
of several tokens. Each call runs a jitted program for a bucketed shape
(``buckets.BucketPlan``) with the KV cache donated, so it updates in place.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from functools import partial
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from model import api as model_api
from model.attention import KVCache
from model.ragged import pack_ragged
from serving.engine.buckets import BucketPlan, round_up
from serving.engine.guided import bitmask_table
from serving.engine.pipeline import StepHandle, device_input_ids
from serving.engine.sampling import SampleResult, SamplingTensors, prompt_logprobs, sample
from serving.engine.types import SamplingParams
from sharding.step import jit_step, zeros_sharded

logger = logging.getLogger(__name__)

LOGPROB_WIDTH = SamplingParams.MAX_LOGPROBS  # top-k alternatives computed when any row asks


@dataclasses.dataclass
class StepItem:
    """One sequence's share of a step, in host terms.

    token_ids are the tokens to compute at positions start_pos...; if ``sample``
    is set the last one's logits are sampled.
    """

    seq_id: int
    token_ids: Sequence[int]
    start_pos: int
    block_table: Sequence[int]
    sample: bool
    params: SamplingParams
    seed: int
    output_token_ids: Sequence[int] = ()
    prompt_token_ids: Sequence[int] = ()
    banned_ids: Sequence[int] = ()  # e.g. EOS while below min_tokens
    prompt_logprobs: Optional[int] = None  # compute logprobs of these prompt tokens
    next_token_ids: Sequence[int] = ()  # token after each position (prompt logprobs)
    token_bitmask: Optional[np.ndarray] = None  # [ceil(V/32)] i32 guided-decoding mask


@dataclasses.dataclass
class ItemResult:
    token: Optional[int] = None
    logprob: float = 0.0
    rank: int = 1
    top_ids: Optional[np.ndarray] = None
    top_logprobs: Optional[np.ndarray] = None
    # prompt logprobs for the computed positions (aligned with next_token_ids)
    prompt_lp: Optional[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = None


def _pad_to(values: Sequence[int], width: int, fill: int) -> np.ndarray:
    out = np.full((width,), fill, np.int32)
    n = min(len(values), width)
    out[:n] = np.asarray(values[:n], np.int32)
    return out


def _width(n: int) -> int:
    """Bucketed width for variable-length side arrays (penalty history etc.)."""
    return 0 if n == 0 else max(8, 1 << (n - 1).bit_length())


class ModelRunner:
    """Owns the weights, the KV cache and the compiled step programs."""

    def __init__(self, graphdef, state, model_config, *, num_pages: int, page_size: int,
                 plan: BucketPlan, kv_dtype, attention_backend: str = "auto",
                 kv_sharding=None, mesh=None):
        self.graphdef = graphdef
        self.mesh = mesh  # tensor-parallel mesh (sharding.mesh); None: one device
        self.state = state
        self.config = model_config
        self.page_size = page_size
        self.num_pages = num_pages
        self.plan = plan
        self.attention_backend = attention_backend
        self.vocab_size = model_config.vocab_size
        self.kv_dtype = kv_dtype
        self.kv_sharding = kv_sharding
        self.kv = self._alloc_kv()
        self._step = jit_step(partial(_run_step, graphdef), mesh, state, kv_sharding,
                              num_host_inputs=5, num_host_outputs=1)
        self._step_plp = jit_step(partial(_run_step_prompt_lp, graphdef), mesh, state,
                                  kv_sharding, num_host_inputs=6, num_host_outputs=2,
                                  static_argnames=("num_lp",))
        self.compile_seconds: dict[tuple, float] = {}

    # ---- memory -----------------------------------------------------------
    def _alloc_kv(self) -> KVCache:
        c = self.config

        def make():
            return KVCache.zeros(c.num_layers, self.num_pages, self.page_size, c.num_kv_heads,
                                 c.head_dim, self.kv_dtype)
        if self.kv_sharding is not None:
            return zeros_sharded(make, self.kv_sharding)  # each device allocates its shard
        return make()

    def release(self) -> None:
        """Drops weights and KV cache from the device (sleep)."""
        self.state = None
        self.kv = None

    def restore(self, state) -> None:
        self.state = state
        self.kv = self._alloc_kv()

    # ---- compilation ------------------------------------------------------
    def precompile(self, run: Optional[bool] = None) -> float:
        """Compiles every bucket with default sampling flags; returns seconds.

        Each bucket is *run* once on dummy inputs (padding only: every write
        goes to the scratch page): ``jit(f).lower(...).compile()`` alone does
        not fill jit's dispatch cache, so the first real step of each bucket
        would trace, lower and load it again (~1 s per bucket for SmolLM2,
        seen as multi-second stalls under load). Multi-host steps (which need
        every process) are only lowered and compiled here: ``run=False``
        from a follower, and the leader's broadcasting step is detected.
        """
        total = 0.0
        if run is None:
            run = not hasattr(self._step, "leader")
        for kind, size, pages in self.plan.all_shapes():
            t0 = time.perf_counter()
            args = self._dummy_args(kind, size, pages)
            if run:
                *out, self.kv = self._step(self.state, self.kv, *args)
                jax.block_until_ready(out)
            else:
                self._step.lower(self.state, self.kv, *args).compile()
            dt = time.perf_counter() - t0
            self.compile_seconds[(kind, size, pages)] = dt
            total += dt
            logger.info("compiled %s bucket size=%d ctx_pages=%d in %.2fs", kind, size, pages, dt)
        logger.info("compiled %d buckets in %.1fs", len(self.plan.all_shapes()), total)
        return total

    def _dummy_args(self, kind: str, size: int, pages: int):
        """Host inputs of a padding-only step, typed exactly as ``_launch`` builds them."""
        num_seqs = size if kind == "decode" else 1
        batch = pack_ragged([], [], [], page_size=self.page_size, num_tokens=size,
                            num_seqs=num_seqs, pages_per_seq=pages,
                            max_q_len=1 if kind == "decode" else size,
                            attention_backend=self.attention_backend)
        st = _default_sampling(num_seqs, self.vocab_size)
        return (jnp.asarray(batch.input_ids), batch.positions, batch.metadata,
                batch.logits_indices, st)

    # ---- execution --------------------------------------------------------
    def launch(self, items: list[StepItem], prev: Optional[StepHandle] = None) -> StepHandle:
        """Dispatches one engine step without waiting for the device.

        Items whose last token is ``PENDING_TOKEN`` take it from ``prev`` (the
        step before, still in flight): a small jitted gather feeds the device
        array of its sampled tokens straight into this step's input ids.
        """
        decode = [it for it in items if len(it.token_ids) == 1 and it.prompt_logprobs is None]
        prefill = [it for it in items if not (len(it.token_ids) == 1
                                              and it.prompt_logprobs is None)]
        calls = []
        if decode:
            for start in range(0, len(decode), self.plan.decode_seqs[-1]):
                chunk = decode[start:start + self.plan.decode_seqs[-1]]
                calls.append((chunk, self._launch(chunk, decode=True, prev=prev)))
        for it in prefill:
            calls.append(([it], self._launch([it], decode=False, prev=prev)))
        # only a lone decode call feeds the next step (max_num_seqs fits one bucket)
        single = decode and len(decode) <= self.plan.decode_seqs[-1]
        return StepHandle(calls, calls[0] if single else None)

    def collect(self, handle: StepHandle) -> dict[int, ItemResult]:
        """Waits for a launched step; returns results keyed by seq_id."""
        results: dict[int, ItemResult] = {}
        for chunk, out in handle.calls:
            results.update(self._collect(chunk, out))
        return results

    def _launch(self, items: list[StepItem], decode: bool, prev=None):
        ps = self.page_size
        ctx_needed = max(it.start_pos + len(it.token_ids) for it in items)
        pages = round_up(-(-ctx_needed // ps), self.plan.ctx_pages)
        if decode:
            num_seqs = round_up(len(items), self.plan.decode_seqs)
            num_tokens = num_seqs
        else:
            num_seqs = 1
            num_tokens = round_up(len(items[0].token_ids), self.plan.prefill_tokens)
        batch = pack_ragged([it.token_ids for it in items], [it.start_pos for it in items],
                            [it.block_table for it in items], page_size=ps,
                            num_tokens=num_tokens, num_seqs=num_seqs, pages_per_seq=pages,
                            max_q_len=1 if decode else num_tokens,
                            attention_backend=self.attention_backend)
        input_ids, positions, md = batch.input_ids, batch.positions, batch.metadata
        logits_idx = batch.logits_indices
        st = self._sampling_tensors(items, num_seqs)
        input_ids = device_input_ids(input_ids, items, prev)
        plp = [it for it in items if it.prompt_logprobs is not None]
        if plp:
            next_ids = np.zeros((num_tokens,), np.int32)
            it = plp[0]
            next_ids[:len(it.next_token_ids)] = it.next_token_ids
            result, lp, self.kv = self._step_plp(
                self.state, self.kv, input_ids, positions, md, logits_idx, st, next_ids,
                num_lp=LOGPROB_WIDTH)
            return result, lp
        result, self.kv = self._step(self.state, self.kv, input_ids, positions, md,
                                     logits_idx, st)
        return result, None

    def _sampling_tensors(self, items: list[StepItem], num_seqs: int) -> SamplingTensors:
        vocab = self.vocab_size
        temp = np.zeros((num_seqs,), np.float32)
        top_k = np.full((num_seqs,), vocab, np.int32)
        top_p = np.ones((num_seqs,), np.float32)
        min_p = np.zeros((num_seqs,), np.float32)
        seeds = np.zeros((num_seqs,), np.uint32)
        steps = np.zeros((num_seqs,), np.int32)
        rep = np.ones((num_seqs,), np.float32)
        freq = np.zeros((num_seqs,), np.float32)
        pres = np.zeros((num_seqs,), np.float32)
        has_allowed = np.zeros((num_seqs,), bool)
        biases, alloweds, outs, prompts, masks = [], [], [], [], []
        do_top = do_pen = False
        num_lp = 0
        for i, it in enumerate(items):
            p = it.params
            temp[i] = 0.0 if p.greedy else p.temperature
            if not p.greedy and (p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0):
                do_top = True
                top_k[i] = p.top_k if p.top_k > 0 else vocab
                top_p[i], min_p[i] = p.top_p, p.min_p
            seeds[i] = it.seed & 0xFFFFFFFF
            steps[i] = len(it.output_token_ids)
            if (p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0
                    or p.presence_penalty != 0.0):
                do_pen = True
                rep[i], freq[i], pres[i] = (p.repetition_penalty, p.frequency_penalty,
                                            p.presence_penalty)
                outs.append((i, it.output_token_ids))
                if p.repetition_penalty != 1.0:
                    prompts.append((i, it.prompt_token_ids))
            bias = dict(p.logit_bias)
            for t in it.banned_ids:
                bias[int(t)] = -1e30
            if bias:
                biases.append((i, bias))
            if p.allowed_token_ids is not None:
                has_allowed[i] = True
                alloweds.append((i, p.allowed_token_ids))
            if it.token_bitmask is not None:
                masks.append((i, it.token_bitmask))
            if p.logprobs is not None:
                num_lp = LOGPROB_WIDTH

        def table(rows, width_of):
            width = _width(max((len(width_of(v)) for _, v in rows), default=0)) or 1
            arr = np.full((num_seqs, width), vocab, np.int32)
            for i, v in rows:
                arr[i] = _pad_to(list(width_of(v)), width, vocab)
            return arr

        bias_ids = table(biases, lambda b: list(b.keys()))
        bias_vals = np.zeros(bias_ids.shape, np.float32)
        for i, b in biases:
            bias_vals[i, :len(b)] = list(b.values())
        return SamplingTensors(
            temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p, seeds=seeds,
            steps=steps, bias_ids=bias_ids, bias_vals=bias_vals,
            allowed_ids=table(alloweds, list), has_allowed=has_allowed,
            rep_pen=rep, freq_pen=freq, pres_pen=pres,
            out_tokens=table(outs, list), prompt_tokens=table(prompts, list),
            do_top=do_top, do_penalties=do_pen, do_bias=bool(biases),
            do_allowed=bool(alloweds), num_logprobs=num_lp,
            token_bitmask=bitmask_table(masks, num_seqs, vocab), do_mask=bool(masks))

    def _collect(self, items: list[StepItem], out) -> dict[int, ItemResult]:
        result, plp = out
        res: SampleResult = jax.device_get(result)
        plp_host = jax.device_get(plp) if plp is not None else None
        results = {}
        for i, it in enumerate(items):
            r = ItemResult()
            if it.sample:
                r.token = int(res.tokens[i])
                r.logprob = float(res.logprobs[i])
                r.rank = int(res.ranks[i])
                if res.top_ids.shape[1]:
                    r.top_ids, r.top_logprobs = res.top_ids[i], res.top_logprobs[i]
            if plp_host is not None:
                n = len(it.next_token_ids)
                r.prompt_lp = tuple(a[:n] for a in plp_host)
            results[it.seq_id] = r
        return results


def _default_sampling(num_seqs: int, vocab: int) -> SamplingTensors:
    z = np.zeros((num_seqs,), np.float32)
    ids = np.full((num_seqs, 1), vocab, np.int32)
    return SamplingTensors(
        temperature=z, top_k=np.full((num_seqs,), vocab, np.int32), top_p=z + 1, min_p=z,
        seeds=np.zeros((num_seqs,), np.uint32), steps=np.zeros((num_seqs,), np.int32),
        bias_ids=ids, bias_vals=np.zeros((num_seqs, 1), np.float32), allowed_ids=ids,
        has_allowed=np.zeros((num_seqs,), bool), rep_pen=z + 1, freq_pen=z, pres_pen=z,
        out_tokens=ids, prompt_tokens=ids, token_bitmask=bitmask_table([], num_seqs, vocab))


def _run_step(graphdef, state, kv, input_ids, positions, md, logits_idx, st):
    """Forward + sampling. input_ids/positions: [T]; logits_idx: [S]."""
    hidden, kv = model_api.forward(graphdef, state, input_ids, positions, kv, md)
    logits = model_api.compute_logits(graphdef, state, hidden[logits_idx])  # [S, V]
    return sample(logits, st), kv


def _run_step_prompt_lp(graphdef, state, kv, input_ids, positions, md, logits_idx, st,
                        next_ids, *, num_lp):
    """Like ``_run_step`` but also scores every position's next token: [T]."""
    hidden, kv = model_api.forward(graphdef, state, input_ids, positions, kv, md)
    all_logits = model_api.compute_logits(graphdef, state, hidden)  # [T, V]
    result = sample(all_logits[logits_idx], st)
    return result, prompt_logprobs(all_logits, next_ids, num_lp), kv
