"""The engine: a request's life from arrival to last token.

1. ``AsyncEngine.add_request`` (async_engine.py, asyncio thread) validates the
   prompt and sampling parameters (``EngineCore.validate``) and submits them to
   the inbox; it returns a ``RequestStream`` the caller iterates.
2. The engine thread loops ``LLMEngine.step()``, which reads as schedule ->
   launch -> complete. It drains the inbox into the ``Scheduler``, which picks
   this step's work (running sequences first, then new ones within the
   token/sequence/page budgets, chunking long prompts and preempting when pages
   run out) while the ``BlockManager`` maps tokens to pages (reusing cached
   prefix pages).
3. The ``ModelRunner`` turns the scheduled sequences into bucketed device
   arrays and launches the compiled steps (forward over the paged cache plus
   on-device sampling), donating the KV cache. With async scheduling the
   ``Pipeline`` (pipeline.py) keeps this step in flight while the next one is
   scheduled; its sampled tokens feed that step on the device.
4. When a step is read back, sampled tokens are appended, detokenized
   incrementally and checked against EOS, stop ids, stop strings and length
   limits; finished sequences free their pages at once.
5. A ``RequestOutput`` snapshot per touched request goes back to its asyncio
   queue via ``loop.call_soon_threadsafe``; the last one has ``finished``.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import random
import time
from typing import Optional

from serving.engine.block_manager import BlockManager
from serving.engine.config import EngineConfig
from serving.engine.detokenizer import IncrementalDetokenizer, find_stop
from serving.engine.errors import ValidationError, context_length_message
from serving.engine.guided import GuideCompiler, GuideMatcher
from serving.engine.pipeline import InFlight, Pipeline, settle
from serving.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from serving.engine.sequence import Sequence, SequenceGroup
from serving.engine.types import (CompletionOutput, FinishReason, Logprob, RequestMetrics,
                                  RequestOutput, SamplingParams)

logger = logging.getLogger(__name__)

CPU_KV_CACHE_BYTES = 1 << 30  # default KV budget on a host without memory stats


@dataclasses.dataclass
class _SeqState:
    seq: Sequence
    seed: int
    detok: IncrementalDetokenizer
    out: CompletionOutput
    full_text: str = ""
    guide: Optional[GuideMatcher] = None  # grammar state for guided decoding


class _RequestState:
    def __init__(self, request_id: str, group: SequenceGroup, params: SamplingParams,
                 tokenizer, seed: int):
        self.request_id = request_id
        self.group = group
        self.params = params
        self.metrics = RequestMetrics(arrival_time=time.time())
        self.seqs: dict[int, _SeqState] = {}
        for seq in group.seqs:
            base = seed if params.seed is None else params.seed
            self.seqs[seq.seq_id] = _SeqState(
                seq=seq, seed=(base + 1_000_003 * seq.index) & 0xFFFFFFFF,
                detok=IncrementalDetokenizer(tokenizer, group.prompt_token_ids,
                                             params.skip_special_tokens,
                                             params.spaces_between_special_tokens),
                out=CompletionOutput(index=seq.index,
                                     logprobs=[] if params.logprobs is not None else None))
        self.prompt_logprobs: Optional[list] = (
            [None] if params.prompt_logprobs is not None else None)
        self.finished = False
        self.error: Optional[str] = None

    def snapshot(self) -> RequestOutput:
        outs = [dataclasses.replace(s.out, token_ids=list(s.out.token_ids),
                                    logprobs=list(s.out.logprobs) if s.out.logprobs is not None
                                    else None)
                for s in self.seqs.values()]
        if self.finished and self.params.best_of > self.params.n:
            outs.sort(key=lambda o: o.cumulative_logprob, reverse=True)
            outs = outs[:self.params.n]
            for i, o in enumerate(outs):
                o.index = i
        elif not self.finished and self.params.best_of > self.params.n:
            outs = []  # vLLM streams nothing until best_of picks the winners
        return RequestOutput(request_id=self.request_id,
                             prompt_token_ids=self.group.prompt_token_ids, outputs=outs,
                             finished=self.finished, prompt_logprobs=self.prompt_logprobs,
                             metrics=self.metrics, error=self.error)


class LLMEngine:
    """Synchronous engine core (one replica); ``step()`` runs one scheduling + device step.

    Implements ``serving.engine.protocol.EngineCore``. Thread-safety:
    ``submit``/``abort`` may be called from any thread (they go through the
    inbox); everything else runs on the engine thread.

    The weights have one owner, the ``ModelRunner``: ``state`` reads them, and
    sleep and weight updates go through ``release``/``restore``/``swap_state``.
    """

    def __init__(self, config: EngineConfig, loaded=None, mesh=None):
        from model.loader import load_model  # heavy imports stay off the host-only path
        from sharding.layout import TensorParallelLayout

        self.config = config
        dtype = config.dtype
        if dtype == "auto":
            import jax
            dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
        self.dtype = dtype
        # the KV cache's dtype: the model's unless --kv-cache-dtype says otherwise
        self.kv_dtype = dtype if config.kv_cache_dtype == "auto" else config.kv_cache_dtype
        t0 = time.perf_counter()
        # mesh: this replica's devices (sharding.mesh); default: tp devices, or none at tp 1
        self.layout = TensorParallelLayout.for_engine(config.tensor_parallel_size, mesh)
        loaded = (self.layout.adopt(loaded) if loaded is not None else load_model(
            config.model, dtype=dtype, shardings_for=self.layout.shardings_for))
        load_s = time.perf_counter() - t0
        logger.info("loaded %s (%s) in %.1fs", loaded.path, loaded.format, load_s)
        t_prep = time.perf_counter()
        if config.quantization:
            loaded = self.quantize(loaded)
            logger.info("quantized the MLP, embedding and LM head weights (%s)",
                        config.quantization)
        self.model_config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.model_path = str(loaded.path)
        self.hf_config = dict(loaded.hf_config or {})
        mc = self.model_config
        limit = mc.max_position_embeddings or 4096
        if config.max_model_len is not None and config.max_model_len > limit:
            raise ValueError(f"max_model_len ({config.max_model_len}) is greater than the "
                             f"model's max_position_embeddings ({limit})")
        self.max_model_len = config.max_model_len or min(limit, 4096)
        self.page_size = config.page_size
        self.num_pages = self._plan_num_pages()
        self.eos_ids = set(mc.eos_token_ids or ())
        if getattr(self.tokenizer, "eos_token_id", None) is not None:
            self.eos_ids.add(int(self.tokenizer.eos_token_id))
        self.vocab_size = mc.vocab_size
        self.guides = GuideCompiler(self.tokenizer, self.eos_ids)  # llguidance, built lazily
        self._build_core()
        self._build_runner(loaded)
        tok_s = loaded.timings.get("tokenizer_s", 0.0)
        self.timings = {"load_s": load_s - tok_s, "tokenizer_s": tok_s,
                        "prepare_s": time.perf_counter() - t_prep}
        # everything but the weights, which the runner owns (see ``loaded``)
        self._checkpoint = dataclasses.replace(loaded, state=None)
        self._sleep_shardings = None  # the weights' layout while released (sleep)
        self._inbox: collections.deque = collections.deque()
        self._requests: dict[str, _RequestState] = {}
        self._rng = random.Random(config.seed)
        self.counters = collections.Counter()
        self.last_step_seconds = 0.0
        # async scheduling: multi-host steps run in lockstep, so synchronously
        self.pipeline = Pipeline(config.async_scheduling and config.nnodes == 1,
                                 self.max_model_len)

    # ---- construction -------------------------------------------------------
    def _plan_num_pages(self) -> int:
        import jax

        from sharding.memory import kv_page_bytes_per_device

        cfg, mc = self.config, self.model_config
        pages_per_seq = -(-self.max_model_len // self.page_size)
        if cfg.num_pages is not None:
            pages = cfg.num_pages
        else:
            # per device: the cache's KV-head axis may be split over the tensor axis
            per_page = kv_page_bytes_per_device(mc, self.page_size, self.kv_dtype,
                                                self.layout.plan)
            if cfg.kv_cache_memory_bytes is not None:
                budget = cfg.kv_cache_memory_bytes
            else:
                stats = jax.local_devices()[0].memory_stats() or {}
                if "bytes_limit" in stats:
                    budget = int(stats["bytes_limit"] * cfg.gpu_memory_utilization
                                 - stats.get("bytes_in_use", 0))
                else:
                    budget = int(CPU_KV_CACHE_BYTES * cfg.gpu_memory_utilization)
            pages = budget // per_page
            pages = min(pages, cfg.max_num_seqs * pages_per_seq + 1)
            logger.info("KV cache: %d pages of %d tokens (%.1f MiB per device)", pages,
                        self.page_size, pages * per_page / 2**20)
        if pages < pages_per_seq + 1:
            raise ValueError(f"KV cache of {pages} pages cannot hold one sequence of "
                             f"max_model_len={self.max_model_len} ({pages_per_seq} pages of "
                             f"{self.page_size}); raise the memory budget or lower max_model_len")
        return pages

    def quantize(self, loaded):
        """``loaded`` with ``--quantization`` applied (itself when there is none)."""
        if not self.config.quantization:
            return loaded
        from model.quant import quantize_model

        from pallas_kernels.dispatch import resolve_backend

        cfg = self.config
        # The CPU int8 kernel takes whole (unsharded) weights on the CPU backend.
        packed = (resolve_backend(cfg.attention_backend) == "cpu"
                  and cfg.tensor_parallel_size == 1 and cfg.nnodes == 1)
        graphdef, state = quantize_model(loaded.graphdef, loaded.state, cfg.quantization,
                                         packed=packed)
        return dataclasses.replace(loaded, graphdef=graphdef, state=state)

    def _build_core(self) -> None:
        cfg = self.config
        self.block_manager = BlockManager(self.num_pages, self.page_size,
                                          cfg.enable_prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(max_num_seqs=cfg.max_num_seqs,
                            max_num_batched_tokens=max(cfg.max_num_batched_tokens, 1),
                            max_model_len=self.max_model_len,
                            enable_chunked_prefill=cfg.enable_chunked_prefill),
            self.block_manager)

    def _build_runner(self, loaded) -> None:
        import jax.numpy as jnp

        from serving.engine.buckets import BucketPlan
        from serving.engine.runner import ModelRunner

        cfg = self.config
        from pallas_kernels.dispatch import resolve_backend
        from pallas_kernels.reference import BF16_STORAGE

        self.plan = BucketPlan.build(cfg.max_num_seqs, cfg.max_num_batched_tokens,
                                     self.max_model_len, self.page_size,
                                     cfg.decode_buckets, cfg.prefill_buckets,
                                     backend=resolve_backend(cfg.attention_backend))

        kv_dtype = jnp.dtype(self.kv_dtype)
        if kv_dtype == jnp.bfloat16 and resolve_backend(cfg.attention_backend) in ("xla", "cpu"):
            kv_dtype = jnp.dtype(BF16_STORAGE)  # in-place scatter on CPU (reference.py)
        self.runner = ModelRunner(
            loaded.graphdef, loaded.state, self.model_config,
            num_pages=self.num_pages, page_size=self.page_size, plan=self.plan,
            kv_dtype=kv_dtype, attention_backend=cfg.attention_backend,
            kv_sharding=self.layout.kv_sharding(), mesh=self.layout.mesh,
            max_model_len=self.max_model_len, program_cache=self._program_cache(loaded))

    def _program_cache(self, loaded):
        """The on-disk cache of compiled step programs (None: --compile-cache-dir '')."""
        if not self.config.compile_cache_dir or not self.config.precompile:
            return None
        from serving.engine.program_cache import ProgramCache

        return ProgramCache.for_engine(self.config, loaded, mesh=self.layout.mesh,
                                       num_pages=self.num_pages,
                                       max_model_len=self.max_model_len)

    # ---- the weights (owned by the runner) -------------------------------------
    @property
    def replicas(self) -> list["LLMEngine"]:
        """Itself: one replica (``DataParallelEngine`` has several)."""
        return [self]

    @property
    def state(self):
        """The weights serving now (an ``nnx.State`` on this replica's devices; None asleep)."""
        return self.runner.state

    @property
    def loaded(self):
        """The checkpoint as a ``model.loader.LoadedModel`` with the serving weights.

        A view built on each call (for reference loops such as
        ``model.generate.greedy_generate``); the runner keeps the only
        reference to the weights.
        """
        return dataclasses.replace(self._checkpoint, state=self.runner.state)

    def read_checkpoint(self, path: str):
        """Loads weights for this engine (its dtype and ``--quantization``) on the host.

        Returns:
            A ``LoadedModel`` without a tokenizer; ``place`` puts its state on
            a replica's devices.
        """
        from model.loader import load_model

        return self.quantize(load_model(path, dtype=self.dtype, with_tokenizer=False))

    def place(self, host_state):
        """``host_state`` on this replica's devices, laid out as the serving weights."""
        import jax

        shardings = self._sleep_shardings
        if shardings is None:
            shardings = jax.tree.map(lambda a: a.sharding, self.state)
        return jax.tree.map(jax.device_put, host_state, shardings)

    def swap_state(self, state, model_path: Optional[str] = None) -> None:
        """Serves ``state`` (already placed) from the next step on.

        Call between steps; the caller drops the prefix cache (its KV came
        from the old weights).
        """
        self.runner.state = state
        if model_path is not None:
            self.model_path = model_path
            self._checkpoint = dataclasses.replace(self._checkpoint, path=model_path)

    def release(self) -> None:
        """Frees the device memory of the weights and the KV cache (sleep).

        The prefix cache goes with the KV. ``restore`` brings both back with
        the same layout.
        """
        import jax

        self._sleep_shardings = jax.tree.map(lambda a: a.sharding, self.state)
        self.block_manager.flush_prefix_cache()
        self.runner.release()

    def restore(self, host_state) -> None:
        """Places ``host_state`` as the weights released by ``release``; a fresh KV cache."""
        self.runner.restore(self.place(host_state))
        self._sleep_shardings = None

    # ---- requests -------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> SamplingParams:
        """Checks a request against the model; returns params with max_tokens set."""
        n = len(prompt_token_ids)
        if n == 0:
            raise ValidationError("prompt", "The prompt must contain at least one token.")
        bad = [t for t in prompt_token_ids if not 0 <= int(t) < self.vocab_size]
        if bad:
            raise ValidationError("prompt", f"Token ids {bad[:5]} are out of vocabulary "
                                            f"(vocab size {self.vocab_size}).")
        params.validate_vocab(self.vocab_size)
        if params.guide is not None:
            self.guides.check(params.guide)
        max_tokens = params.max_tokens
        if max_tokens is None:
            max_tokens = self.max_model_len - n
        if n >= self.max_model_len:
            raise ValidationError("prompt", context_length_message(self.max_model_len, n, None))
        if n + max_tokens > self.max_model_len or max_tokens < 1:
            raise ValidationError("max_tokens", context_length_message(self.max_model_len, n,
                                                                       max_tokens))
        return dataclasses.replace(params, max_tokens=max_tokens)

    def submit(self, request_id: str, prompt_token_ids: list[int],
               params: SamplingParams) -> None:
        """Queues a validated request (any thread)."""
        self._inbox.append(("add", request_id, list(prompt_token_ids), params))

    def abort(self, request_id: str) -> None:
        """Aborts a request (any thread); its pages free at the next step."""
        self._inbox.append(("abort", request_id, None, None))

    def num_queued(self) -> int:
        """Sequences submitted or waiting, not yet running (load shedding, placement)."""
        return self.scheduler.num_waiting + len(self._inbox)

    def num_running(self) -> int:
        """Sequences admitted (holding pages)."""
        return self.scheduler.num_running

    def has_work(self) -> bool:
        return bool(self._inbox) or self.scheduler.has_unfinished() or self.pipeline.busy

    def precompile(self) -> float:
        """Compiles (and warms) every step program; returns the seconds spent."""
        return self.runner.precompile()

    def startup_report(self) -> dict:
        """Seconds per start-up phase (load, tokenizer, prepare) and the programs built."""
        return {**self.timings, "programs": self.runner.num_programs(),
                "programs_from_cache": self.runner.programs_loaded}

    def flush_prefix_cache(self) -> bool:
        """Drops the prefix cache; False (nothing done) while requests are unfinished."""
        return self.scheduler.flush_prefix_cache()

    def _drain_inbox(self) -> list[RequestOutput]:
        outputs = []
        while self._inbox:
            kind, request_id, prompt, params = self._inbox.popleft()
            if kind == "add":
                if request_id in self._requests:
                    logger.warning("duplicate request id %s ignored", request_id)
                    continue
                group = SequenceGroup(request_id, prompt, params)
                state = _RequestState(request_id, group, params, self.tokenizer,
                                      self._rng.getrandbits(31))
                self._requests[request_id] = state
                if params.guide is not None:  # one grammar matcher per sequence
                    for s in state.seqs.values():
                        s.guide = self.guides.matcher(params.guide)
                self.scheduler.add(group)
            else:
                state = self._requests.get(request_id)
                if state is None:
                    continue
                self.scheduler.abort(request_id)
                outputs.append(self._finish_request(state, FinishReason.ABORT))
        return outputs

    def _finish_request(self, state: _RequestState, reason: FinishReason,
                        error: Optional[str] = None) -> RequestOutput:
        for s in state.seqs.values():
            if s.out.finish_reason is None:
                s.out.finish_reason = reason.value
                s.out.text = s.full_text
        state.finished = True
        state.error = error
        state.metrics.finished_time = time.time()
        self._requests.pop(state.request_id, None)
        self.counters["requests_" + reason.value] += 1
        return state.snapshot()

    # ---- the step --------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Runs one step: schedule -> launch -> complete; a snapshot of every request touched.

        With async scheduling (``serving.engine.pipeline``) the step read here
        is usually the one launched by the previous call, so the host's work
        overlaps the device's; steps whose successor needs their tokens on the
        host are read at once.
        """
        outputs = self._drain_inbox()
        out, ended = self._schedule()
        outputs += ended
        if out.is_empty:
            return outputs + self._complete(self.pipeline.take())
        outputs += self._launch(out)
        return outputs + self._complete(self.pipeline.take_if_sync())

    def _schedule(self) -> tuple[SchedulerOutput, list[RequestOutput]]:
        """This step's work, and the requests the scheduler itself ended (max_model_len)."""
        out = self.scheduler.schedule()
        self.counters["preemptions"] += len(out.preempted)
        ended = []
        for seq in out.finished:
            st = self._requests.get(seq.request_id)
            if st is not None:
                ended += self._on_seq_finished(st, seq, FinishReason.LENGTH)
        return out, ended

    def _launch(self, out: SchedulerOutput) -> list[RequestOutput]:
        """Launches ``out`` on the device and makes it the step in flight.

        The step that was in flight is read after the launch, while ``out``
        runs; returns its outputs. A launch that fails ends ``out``'s requests.
        """
        prev = self.pipeline.take()
        try:
            handle = self.runner.launch([self._step_item(s) for s in out.scheduled],
                                        prev.handle if prev is not None else None)
        except Exception as exc:  # a device failure ends the requests in this step only
            logger.exception("step failed; failing %d requests", len(out.scheduled))
            return self._complete(prev) + self._fail(out, exc)
        if prev is not None:
            self.counters["overlapped_steps"] += 1
        outputs = self._complete(prev)
        self.pipeline.launched(out, handle, self.scheduler.advance(out))
        return outputs

    def _fail(self, out, exc: Exception) -> list[RequestOutput]:
        """Ends every request of a failed step with an error."""
        outputs = []
        for rid in {s.seq.request_id for s in out.scheduled}:
            st = self._requests.get(rid)
            if st is not None:
                self.scheduler.abort(rid)
                outputs.append(self._finish_request(st, FinishReason.ERROR, str(exc)))
        return outputs

    def _complete(self, fl: Optional[InFlight]) -> list[RequestOutput]:
        """Reads a launched step's results (none: nothing) and hands its tokens on."""
        if fl is None:
            return []
        out = fl.out
        try:
            results = self.runner.collect(fl.handle)
        except Exception as exc:
            logger.exception("step failed; failing %d requests", len(out.scheduled))
            return self._fail(out, exc)
        self.last_step_seconds = time.perf_counter() - fl.launched_at
        outputs: list[RequestOutput] = []
        self.counters["steps"] += 1
        self.counters["prompt_tokens"] += out.num_prefill_tokens
        touched: dict[str, _RequestState] = {}
        for sch in out.scheduled:
            st = self._requests.get(sch.seq.request_id)
            if st is None:
                continue
            if st.metrics.first_scheduled_time is None:
                st.metrics.first_scheduled_time = time.time()
                st.metrics.num_cached_tokens = sch.seq.num_cached_tokens
                self.counters["prefix_cache_queries"] += sch.seq.num_prompt_tokens
                self.counters["prefix_cache_hits"] += sch.seq.num_cached_tokens
            r = results.get(sch.seq.seq_id)
            if r is not None and r.prompt_lp is not None and sch.seq.index == 0:
                self._add_prompt_logprobs(st, r.prompt_lp, sch.start)
            touched[st.request_id] = st
        now = time.time()
        for seq, is_pending in fl.samplers:
            st = self._requests.get(seq.request_id)
            if st is None or seq.is_finished:
                continue  # aborted or finished while the step ran: its token is dropped
            r = results[seq.seq_id]
            settle(seq, is_pending, r.token)
            try:
                reason = self._on_token(st, st.seqs[seq.seq_id], r, now)
            except Exception as exc:  # e.g. a detokenizer failure: end this request only
                logger.exception("request %s failed", st.request_id)
                self.scheduler.abort(st.request_id)
                outputs.append(self._finish_request(st, FinishReason.ERROR, str(exc)))
                touched.pop(st.request_id, None)
                continue
            if reason is not None:
                self.scheduler.finish(seq, reason)
                outputs.extend(self._on_seq_finished(st, seq, reason))
                if st.finished:
                    touched.pop(st.request_id, None)
        outputs.extend(st.snapshot() for st in touched.values() if not st.finished)
        return outputs

    def _step_item(self, sch):
        from serving.engine.runner import StepItem

        seq = sch.seq
        st = self._requests[seq.request_id]
        p = st.params
        toks = seq.all_token_ids[sch.start:sch.end]
        banned = tuple(p.bad_word_bans(seq.output_token_ids)) if p.bad_words_ids else ()
        if seq.num_output_tokens < p.min_tokens:
            banned += tuple(self.eos_ids) + tuple(p.stop_token_ids)
        plp = None
        next_ids = ()
        if p.prompt_logprobs is not None and seq.index == 0 and sch.start < seq.num_prompt_tokens - 1:
            plp = p.prompt_logprobs
            stop = min(sch.end, seq.num_prompt_tokens - 1)
            next_ids = seq.all_token_ids[sch.start + 1:stop + 1]
        guide = st.seqs[seq.seq_id].guide  # needs the previous token consumed (needs_sync)
        mask = guide.next_mask() if guide is not None and sch.samples else None
        return StepItem(seq_id=seq.seq_id, token_ids=toks, start_pos=sch.start,
                        block_table=seq.block_table, sample=sch.samples, params=p,
                        seed=st.seqs[seq.seq_id].seed, output_token_ids=seq.output_token_ids,
                        prompt_token_ids=seq.prompt_token_ids, banned_ids=banned,
                        prompt_logprobs=plp, next_token_ids=next_ids, token_bitmask=mask)

    def _decode_one(self, token_id: int) -> str:
        return self.tokenizer.decode([int(token_id)])

    def _position_logprobs(self, token: int, lp: float, rank: int, top_ids, top_lps,
                           k: int) -> dict[int, Logprob]:
        entry = {int(token): Logprob(float(lp), int(rank), self._decode_one(token))}
        if top_ids is not None:
            for r, (tid, tlp) in enumerate(zip(top_ids[:k], top_lps[:k]), start=1):
                if int(tid) not in entry:
                    entry[int(tid)] = Logprob(float(tlp), r, self._decode_one(tid))
        return entry

    def _add_prompt_logprobs(self, st: _RequestState, plp, start: int) -> None:
        lps, ranks, top_ids, top_lps = plp
        seq = st.group.seqs[0]
        for j in range(len(lps)):
            tok = seq.all_token_ids[start + j + 1]
            st.prompt_logprobs.append(self._position_logprobs(
                tok, lps[j], ranks[j], top_ids[j], top_lps[j], st.params.prompt_logprobs))

    def _on_token(self, st: _RequestState, ss: _SeqState, r, now: float):
        """Records a sampled token; returns a FinishReason if the sequence ends."""
        p = st.params
        seq, out = ss.seq, ss.out
        token = r.token
        self.counters["generation_tokens"] += 1
        if st.metrics.first_token_time is None:
            st.metrics.first_token_time = now
        st.metrics.last_token_time = now
        out.token_ids.append(token)
        out.cumulative_logprob += r.logprob
        if out.logprobs is not None:
            out.logprobs.append(self._position_logprobs(token, r.logprob, r.rank, r.top_ids,
                                                        r.top_logprobs, p.logprobs))
        num_out = len(out.token_ids)
        can_stop = num_out >= p.min_tokens
        if can_stop and not p.ignore_eos and token in self.eos_ids:
            out.text = ss.full_text
            return FinishReason.STOP
        if can_stop and token in p.stop_token_ids:
            out.stop_reason = token
            out.text = ss.full_text
            return FinishReason.STOP
        guide_done = ss.guide is not None and ss.guide.advance(token)
        delta = ss.detok.add(token)
        ss.full_text += delta
        if can_stop and p.stop:
            hit = find_stop(ss.full_text, len(delta), p.stop)
            if hit is not None:
                stop, idx = hit
                ss.full_text = ss.full_text[:idx + len(stop) if p.include_stop_str_in_output
                                            else idx]
                out.text, out.stop_reason = ss.full_text, stop
                return FinishReason.STOP
        if guide_done:  # the grammar is complete: nothing but EOS could follow
            out.text = ss.full_text
            return FinishReason.STOP
        if num_out >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            out.text = ss.full_text
            return FinishReason.LENGTH
        hold = max((len(s) for s in p.stop), default=1) - 1 if p.stop else 0
        out.text = ss.full_text[:len(ss.full_text) - hold] if hold else ss.full_text
        return None

    def _on_seq_finished(self, st: _RequestState, seq: Sequence,
                         reason: FinishReason) -> list[RequestOutput]:
        ss = st.seqs[seq.seq_id]
        if ss.out.finish_reason is None:
            ss.out.finish_reason = reason.value
            ss.out.text = ss.full_text
        if all(s.out.finish_reason is not None for s in st.seqs.values()):
            return [self._finish_request(st, reason)]
        return []

    # ---- state ---------------------------------------------------------------------
    def stats(self) -> dict:
        bm = self.block_manager
        usable = bm.num_usable_pages
        c = self.counters
        return {
            "num_running": self.scheduler.num_running,
            "num_waiting": self.scheduler.num_waiting + len(self._inbox),
            "num_total_pages": usable,
            "num_free_pages": bm.num_free_pages,
            "num_cached_pages": bm.num_cached_pages,
            "kv_cache_usage": bm.usage,
            "page_size": self.page_size,
            "prompt_tokens_total": c["prompt_tokens"],
            "generation_tokens_total": c["generation_tokens"],
            "num_preemptions_total": c["preemptions"],
            "num_steps_total": c["steps"],
            "prefix_cache_queries_total": c["prefix_cache_queries"],
            "prefix_cache_hits_total": c["prefix_cache_hits"],
            "prefix_cache_hit_rate": (c["prefix_cache_hits"] / c["prefix_cache_queries"]
                                      if c["prefix_cache_queries"] else 0.0),
            "last_step_seconds": self.last_step_seconds,
            "requests_finished": {k[len("requests_"):]: v for k, v in c.items()
                                  if k.startswith("requests_")},
        }


def build_core(config: EngineConfig):
    """The ``EngineCore`` for ``config``: one ``LLMEngine``, or a ``DataParallelEngine`` of
    ``data_parallel_size`` replicas (``AsyncEngine`` drives it)."""
    if config.nnodes > 1:  # rank 0 of a multi-host mesh: steps run on every node
        from sharding.distributed import Leader
        engine = LLMEngine(config)
        Leader(config.dist_init_addr, config.nnodes - 1).attach(engine.runner)
        return engine
    if config.data_parallel_size == 1:
        return LLMEngine(config)
    from sharding.data_parallel import DataParallelEngine
    from sharding.mesh import make_mesh, replica_mesh

    mesh = make_mesh(config.tensor_parallel_size, config.data_parallel_size)
    return DataParallelEngine([LLMEngine(config, mesh=replica_mesh(mesh, i))
                               for i in range(config.data_parallel_size)])
