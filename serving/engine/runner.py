"""The model runner: turns scheduled work into device arrays and runs compiled steps.

One engine step is one compiled call: every scheduled sequence's new tokens
(decode rows and prefill chunks alike) packed into one token-major ragged
batch (``model/ragged.py``), padded to a token bucket (``buckets.BucketPlan``),
run by the program of that bucket with the KV cache donated. The programs
are a small fixed set, built at start-up (``precompile``): one per token
bucket, plus one small prompt-logprobs program per bucket. Sampling settings
are data of the program (``sampling_tensors``), so no request compiles
anything; a program built after start-up is logged at WARNING.

The weights are held in the stacked form of ``model/stacked.py`` (layers run
as a loop), so tracing and compiling a program costs one layer. Programs are
``jax.stages.Compiled`` objects, kept in a table keyed by their shape and,
with a ``ProgramCache``, serialized to disk so a second start skips tracing,
lowering and compiling altogether.
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

from model import stacked
from model.attention import KVCache
from model.ragged import pack_ragged
from serving.engine import compile_log
from serving.engine.buckets import BucketPlan, StepShape
from serving.engine.pipeline import StepHandle, pending_sources
from serving.engine.sampling import SampleResult, prompt_logprobs, sample
from serving.engine.sampling_tensors import build_sampling_tensors, default_sampling_tensors
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


class ModelRunner:
    """Owns the weights, the KV cache and the compiled step programs.

    Args:
      graphdef, state: the model (``nnx.split``), placed on this replica's devices.
      model_config: its ``ModelConfig``.
      num_pages, page_size: the KV cache's geometry.
      plan: the step shapes (``BucketPlan``).
      kv_dtype: the cache's storage dtype.
      attention_backend: ``pallas_kernels.dispatch.BACKENDS``.
      kv_sharding, mesh: the tensor-parallel layout (None: one device).
      max_model_len: the context length (the penalty history's width).
      program_cache: a ``ProgramCache`` to load and store compiled programs.
    """

    def __init__(self, graphdef, state, model_config, *, num_pages: int, page_size: int,
                 plan: BucketPlan, kv_dtype, attention_backend: str = "auto",
                 kv_sharding=None, mesh=None, max_model_len: Optional[int] = None,
                 program_cache=None):
        self.mesh = mesh  # tensor-parallel mesh (sharding.mesh); None: one device
        self.config = model_config
        self.page_size = page_size
        self.num_pages = num_pages
        self.plan = plan
        self.attention_backend = attention_backend
        self.vocab_size = model_config.vocab_size
        self.max_model_len = max_model_len or plan.ctx_pages[-1] * page_size
        self.kv_dtype = kv_dtype
        self.kv_sharding = kv_sharding
        self.program_cache = program_cache
        self.feed_width = plan.max_num_seqs  # rows of the sampled tokens fed to the next step
        self._graphdef = graphdef
        self.scan, self.params = stacked.stack(graphdef, state)
        self.kv = self._alloc_kv()
        self._jit_step = jit_step(partial(_run_step, self.scan, self.feed_width), mesh,
                                  self.params, kv_sharding, num_host_inputs=7,
                                  num_host_outputs=3)
        self._jit_plp = jax.jit(partial(_run_prompt_lp, self.scan))
        self._programs: dict[StepShape, jax.stages.Compiled] = {}
        self._plp_programs: dict[int, jax.stages.Compiled] = {}
        self._last_hidden = None
        self._no_feed = np.zeros((self.feed_width,), np.int32)
        self.warm = False  # set after precompile: later builds are logged as warnings
        self.compile_seconds: dict[str, float] = {}
        self.programs_loaded = 0  # programs read from the program cache
        self._from_cache: set[str] = set()

    # ---- weights and memory ---------------------------------------------------
    @property
    def state(self):
        """The weights in module form (a view: layer slices are copies); None asleep."""
        if self.params is None:
            return None
        return stacked.unstack(self.scan, self.params)[1]

    @state.setter
    def state(self, state) -> None:
        """Serves ``state`` (module form, placed as the current weights) from the next step."""
        self.scan, self.params = stacked.stack(self._graphdef, state)

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
        self.params = None
        self.kv = None
        self._last_hidden = None

    def restore(self, state) -> None:
        self.state = state
        self.kv = self._alloc_kv()

    # ---- programs -----------------------------------------------------------------
    def num_programs(self) -> int:
        return len(self._programs) + len(self._plp_programs)

    def _program(self, shape: StepShape, args) -> jax.stages.Compiled:
        prog = self._programs.get(shape)
        if prog is None:
            prog = self._build(self._name(shape), shape.describe(), self._jit_step,
                               (self.params, self.kv, *args))
            self._programs[shape] = prog
        return prog

    @staticmethod
    def _name(shape: StepShape) -> str:
        return (f"step-{shape.num_tokens}-{shape.num_seqs}-{shape.ctx_pages}"
                f"-{shape.max_q_len}")

    def _plp_program(self, hidden, next_ids) -> jax.stages.Compiled:
        t = hidden.shape[0]
        prog = self._plp_programs.get(t)
        if prog is None:
            prog = self._build(f"plp-{t}", f"prompt logprobs T={t}", self._jit_plp,
                               (self.params, hidden, next_ids))
            self._plp_programs[t] = prog
        return prog

    def _build(self, name: str, what: str, jitted, args) -> jax.stages.Compiled:
        if self.warm:
            logger.warning("compiling %s after start-up (a shape start-up did not build)", what)
        t0 = time.perf_counter()
        prog = self.program_cache.load(name, args) if self.program_cache else None
        if prog is not None:
            self.programs_loaded += 1
            self._from_cache.add(name)
        else:
            prog = self._compile(name, jitted, args)
        self.compile_seconds[name] = time.perf_counter() - t0
        return prog

    def _compile(self, name: str, jitted, args) -> jax.stages.Compiled:
        if not self.program_cache:
            return jitted.lower(*args).compile()
        # An executable XLA read from its own persistent cache does not
        # serialize whole (running the copy fails: "Function ... not found"),
        # so programs bound for the program cache are compiled afresh.
        log = compile_log.install()
        hits = log.snapshot()["cache_hits"]
        previous = jax.config.jax_enable_compilation_cache
        jax.config.update("jax_enable_compilation_cache", False)
        try:
            prog = jitted.lower(*args).compile()
        finally:
            jax.config.update("jax_enable_compilation_cache", previous)
        if log.snapshot()["cache_hits"] == hits:
            self.program_cache.store(name, prog)
        return prog

    def _rebuild(self, name: str, jitted, args, exc: Exception) -> jax.stages.Compiled:
        """A cached program that failed to run: drop it, compile it afresh."""
        logger.warning("program cache: %s failed to run (%s); compiling it again", name, exc)
        self.program_cache.drop(name)
        self._from_cache.discard(name)
        self.programs_loaded -= 1
        return self._compile(name, jitted, args)

    def _run_once(self, name: str, table: dict, key, jitted, make_args):
        """Runs ``table[key]`` on ``make_args()`` (warm-up); a cached one that fails is rebuilt."""
        try:
            return jax.block_until_ready(table[key](*make_args()))
        except jax.errors.JaxRuntimeError as exc:
            if name not in self._from_cache:
                raise
            self.kv = self._alloc_kv()  # the failed call may have consumed the donated cache
            table[key] = self._rebuild(name, jitted, make_args(), exc)
            return jax.block_until_ready(table[key](*make_args()))

    def precompile(self, run: Optional[bool] = None) -> float:
        """Builds every program of the plan and runs each once; returns seconds.

        Each step program is run on padding-only inputs (every write goes to
        the scratch page), so first-use costs (allocations) are paid here.
        Multi-host steps need every process: ``run=False`` from a follower,
        and the leader's broadcasting step is detected.
        """
        t_start = time.perf_counter()
        if run is None:
            run = not hasattr(self._step, "leader")
        for shape in self.plan.all_shapes():
            t0 = time.perf_counter()
            args = self._dummy_args(shape)
            prog = self._program(shape, args)
            hidden = None
            if run:
                _, _, hidden, self.kv = self._run_once(
                    self._name(shape), self._programs, shape, self._jit_step,
                    lambda: (self.params, self.kv, *args))
            if shape.max_q_len == shape.num_tokens and shape.num_tokens not in self._plp_programs:
                if hidden is None:
                    out = prog.out_info[2]
                    hidden = jax.ShapeDtypeStruct(out.shape, out.dtype)
                next_ids = np.zeros((shape.num_tokens,), np.int32)
                self._plp_program(hidden, next_ids)
                if run:
                    self._run_once(f"plp-{shape.num_tokens}", self._plp_programs,
                                   shape.num_tokens, self._jit_plp,
                                   lambda: (self.params, hidden, next_ids))
            logger.info("built step %s in %.2fs", shape.describe(), time.perf_counter() - t0)
        total = time.perf_counter() - t_start
        self.warm = True
        logger.info("built %d programs (%d from the program cache) in %.1fs",
                    self.num_programs(), self.programs_loaded, total)
        return total

    def _dummy_args(self, shape: StepShape):
        """Host inputs of a padding-only step, typed exactly as ``launch`` builds them."""
        batch = pack_ragged([], [], [], page_size=self.page_size, num_tokens=shape.num_tokens,
                            num_seqs=shape.num_seqs, pages_per_seq=shape.ctx_pages,
                            max_q_len=shape.max_q_len, attention_backend=self.attention_backend)
        st = default_sampling_tensors(shape.num_seqs, vocab_size=self.vocab_size,
                                      max_model_len=self.max_model_len,
                                      max_logprobs=LOGPROB_WIDTH)
        src = np.full((shape.num_tokens,), -1, np.int32)
        return (batch.input_ids, src, self._no_feed, batch.positions, batch.metadata,
                batch.logits_indices, st)

    # ---- the compiled calls (multi-host: sharding.distributed wraps these two) -------
    def _step(self, params, kv, input_ids, src, feed, positions, md, logits_idx, st):
        shape = StepShape(input_ids.shape[0], logits_idx.shape[0], md.block_tables.shape[1],
                          md.max_q_len)
        args = (input_ids, src, feed, positions, md, logits_idx, st)
        result, feed_out, hidden, kv = self._program(shape, args)(params, kv, *args)
        self._last_hidden = hidden
        return result, feed_out, kv

    def _step_plp(self, params, kv, next_ids):
        """Prompt logprobs of the last step's hidden states (kv passes through)."""
        hidden = self._last_hidden
        return (*self._plp_program(hidden, next_ids)(params, hidden, next_ids), kv)

    # ---- execution --------------------------------------------------------------
    def launch(self, items: list[StepItem], prev: Optional[StepHandle] = None) -> StepHandle:
        """Dispatches one engine step (one compiled call) without waiting for the device.

        Items whose last token is ``PENDING_TOKEN`` take it from ``prev`` (the
        step before, still in flight): the step program gathers it from
        ``prev``'s sampled tokens on the device.
        """
        total = sum(len(it.token_ids) for it in items)
        context = max(it.start_pos + len(it.token_ids) for it in items)
        decode_only = all(len(it.token_ids) == 1 and it.prompt_logprobs is None
                          for it in items)
        shape = self.plan.shape_for(total, len(items), context, decode_only)
        batch = pack_ragged([it.token_ids for it in items], [it.start_pos for it in items],
                            [it.block_table for it in items], page_size=self.page_size,
                            num_tokens=shape.num_tokens, num_seqs=shape.num_seqs,
                            pages_per_seq=shape.ctx_pages, max_q_len=shape.max_q_len,
                            attention_backend=self.attention_backend)
        st = build_sampling_tensors(items, shape.num_seqs, vocab_size=self.vocab_size,
                                    max_model_len=self.max_model_len,
                                    max_logprobs=LOGPROB_WIDTH)
        input_ids = np.where(batch.input_ids < 0, 0, batch.input_ids).astype(np.int32)
        src = pending_sources(batch.input_ids, items, prev)
        feed = prev.feed if prev is not None and (src >= 0).any() else self._no_feed
        result, feed_out, self.kv = self._step(self.params, self.kv, input_ids, src, feed,
                                               batch.positions, batch.metadata,
                                               batch.logits_indices, st)
        plp = None
        if any(it.prompt_logprobs is not None for it in items):
            next_ids = np.zeros((shape.num_tokens,), np.int32)
            cursor = 0
            for it in items:
                if it.prompt_logprobs is not None:
                    n = len(it.next_token_ids)
                    next_ids[cursor:cursor + n] = it.next_token_ids
                cursor += len(it.token_ids)
            *plp, self.kv = self._step_plp(self.params, self.kv, next_ids)
        return StepHandle(items, (result, plp), feed_out)

    def collect(self, handle: StepHandle) -> dict[int, ItemResult]:
        """Waits for a launched step; returns results keyed by seq_id."""
        result, plp = handle.outputs
        res: SampleResult = jax.device_get(result)
        plp_host = jax.device_get(tuple(plp)) if plp is not None else None
        results = {}
        cursor = 0
        for i, it in enumerate(handle.items):
            r = ItemResult()
            if it.sample:
                r.token = int(res.tokens[i])
                r.logprob = float(res.logprobs[i])
                r.rank = int(res.ranks[i])
                if it.params.logprobs is not None:
                    r.top_ids, r.top_logprobs = res.top_ids[i], res.top_logprobs[i]
            if plp_host is not None and it.prompt_logprobs is not None:
                n = len(it.next_token_ids)
                r.prompt_lp = tuple(a[cursor:cursor + n] for a in plp_host)
            cursor += len(it.token_ids)
            results[it.seq_id] = r
        return results


def _run_step(scan, feed_width, params, kv, input_ids, src, feed, positions, md, logits_idx,
              st):
    """Forward + sampling of one ragged batch.

    input_ids/src/positions: [T] (``src >= 0``: the id is row ``src`` of the
    previous step's ``feed``); logits_idx: [S]. Returns ``(SampleResult, feed
    [feed_width] the sampled tokens for the next step, hidden [T, H], kv)``.
    """
    input_ids = jnp.where(src >= 0, feed[jnp.clip(src, 0)], input_ids)
    hidden, kv = stacked.forward(scan, params, input_ids, positions, kv, md)
    logits = stacked.compute_logits(scan, params, hidden[logits_idx])  # [S, V]
    result = sample(logits, st)
    feed_out = jnp.zeros((feed_width,), jnp.int32).at[:result.tokens.shape[0]].set(
        result.tokens)
    return result, feed_out, hidden, kv


def _run_prompt_lp(scan, params, hidden, next_ids):
    """Logprobs of each position's next token: ``hidden [T, H], next_ids [T]``."""
    logits = stacked.compute_logits(scan, params, hidden)
    return prompt_logprobs(logits, next_ids, LOGPROB_WIDTH)
