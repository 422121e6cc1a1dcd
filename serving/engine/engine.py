"""The engine: a request's life from arrival to last token.

1. ``AsyncEngine.add_request`` (asyncio thread) validates the prompt and
   sampling parameters, wraps them in a ``SequenceGroup`` and drops it in the
   inbox; it returns a ``RequestStream`` the caller iterates.
2. The engine thread loops ``LLMEngine.step()``: it drains the inbox into the
   ``Scheduler``, which picks this step's work (running sequences first, then
   new ones within the token/sequence/page budgets, chunking long prompts and
   preempting when pages run out) and the ``BlockManager`` maps tokens to
   pages (reusing cached prefix pages).
3. The ``ModelRunner`` turns the scheduled sequences into bucketed device
   arrays and runs the compiled steps (forward over the paged cache plus
   on-device sampling), donating the KV cache.
4. Back on the host, sampled tokens are appended, detokenized incrementally
   and checked against EOS, stop ids, stop strings and length limits;
   finished sequences free their pages at once.
5. A ``RequestOutput`` snapshot per touched request goes back to its asyncio
   queue via ``loop.call_soon_threadsafe``; the last one has ``finished``.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import os
import random
import threading
import time
from typing import Optional

from serving.engine.block_manager import BlockManager
from serving.engine.config import EngineConfig
from serving.engine.detokenizer import IncrementalDetokenizer, find_stop
from serving.engine.scheduler import Scheduler, SchedulerConfig
from serving.engine.sequence import Sequence, SequenceGroup
from serving.engine.types import (CompletionOutput, FinishReason, Logprob, RequestMetrics,
                                  RequestOutput, SamplingParams, ValidationError)

logger = logging.getLogger(__name__)

CPU_KV_CACHE_BYTES = 1 << 30  # default KV budget on a host without memory stats


class EngineOverloadedError(RuntimeError):
    """Too many waiting requests (the HTTP layer answers 503)."""


class EngineNotReadyError(RuntimeError):
    """The engine is starting, sleeping or shut down (503)."""


@dataclasses.dataclass
class _SeqState:
    seq: Sequence
    seed: int
    detok: IncrementalDetokenizer
    out: CompletionOutput
    full_text: str = ""


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
    """Synchronous engine core; ``step()`` runs one scheduling + device step.

    Thread-safety: ``submit``/``abort`` may be called from any thread (they go
    through the inbox); everything else runs on the engine thread.
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
        t0 = time.perf_counter()
        # mesh: this replica's devices (sharding.mesh); default: tp devices, or none at tp 1
        self.layout = TensorParallelLayout.for_engine(config.tensor_parallel_size, mesh)
        self.loaded = (self.layout.adopt(loaded) if loaded is not None else load_model(
            config.model, dtype=dtype, shardings_for=self.layout.shardings_for))
        logger.info("loaded %s (%s) in %.1fs", self.loaded.path, self.loaded.format,
                    time.perf_counter() - t0)
        self.model_config = self.loaded.config
        self.tokenizer = self.loaded.tokenizer
        self.model_path = str(self.loaded.path)
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
        self._build_core()
        self._build_runner()
        self._inbox: collections.deque = collections.deque()
        self._requests: dict[str, _RequestState] = {}
        self._rng = random.Random(config.seed)
        self.on_output = None  # callback(list[RequestOutput]) set by AsyncEngine
        self.counters = collections.Counter()
        self.last_step_seconds = 0.0

    # ---- construction -------------------------------------------------------
    def _plan_num_pages(self) -> int:
        import jax
        import numpy as np

        cfg, mc = self.config, self.model_config
        pages_per_seq = -(-self.max_model_len // self.page_size)
        if cfg.num_pages is not None:
            pages = cfg.num_pages
        else:
            itemsize = np.dtype(self.dtype if self.dtype != "bfloat16" else np.float16).itemsize
            per_page = 2 * mc.num_layers * self.page_size * mc.num_kv_heads * mc.head_dim * itemsize
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
            logger.info("KV cache: %d pages of %d tokens (%.1f MiB)", pages, self.page_size,
                        pages * per_page / 2**20)
        if pages < pages_per_seq + 1:
            raise ValueError(f"KV cache of {pages} pages cannot hold one sequence of "
                             f"max_model_len={self.max_model_len} ({pages_per_seq} pages of "
                             f"{self.page_size}); raise the memory budget or lower max_model_len")
        return pages

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

    def _build_runner(self) -> None:
        import jax.numpy as jnp

        from serving.engine.buckets import BucketPlan
        from serving.engine.runner import ModelRunner

        cfg = self.config
        self.plan = BucketPlan.build(cfg.max_num_seqs, cfg.max_num_batched_tokens,
                                     self.max_model_len, self.page_size,
                                     cfg.decode_buckets, cfg.prefill_buckets)
        from pallas_kernels.dispatch import resolve_backend
        from pallas_kernels.reference import BF16_STORAGE

        kv_dtype = jnp.dtype(self.dtype)
        if kv_dtype == jnp.bfloat16 and resolve_backend(cfg.attention_backend) == "xla":
            kv_dtype = jnp.dtype(BF16_STORAGE)  # in-place scatter on CPU (reference.py)
        self.runner = ModelRunner(
            self.loaded.graphdef, self.loaded.state, self.model_config,
            num_pages=self.num_pages, page_size=self.page_size, plan=self.plan,
            kv_dtype=kv_dtype, attention_backend=cfg.attention_backend,
            kv_sharding=self.layout.kv_sharding(), mesh=self.layout.mesh)

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
        max_tokens = params.max_tokens
        if max_tokens is None:
            max_tokens = self.max_model_len - n
        if n + max_tokens > self.max_model_len or max_tokens < 1:
            raise ValidationError(
                "prompt" if n >= self.max_model_len else "max_tokens",
                f"This model's maximum context length is {self.max_model_len} tokens. "
                f"However, you requested {n + max_tokens} tokens ({n} in the messages, "
                f"{max_tokens} in the completion). Please reduce the length of the "
                f"messages or completion.")
        return dataclasses.replace(params, max_tokens=max_tokens)

    def submit(self, request_id: str, prompt_token_ids: list[int],
               params: SamplingParams) -> None:
        """Queues a validated request (any thread)."""
        self._inbox.append(("add", request_id, list(prompt_token_ids), params))

    def abort(self, request_id: str) -> None:
        """Aborts a request (any thread); its pages free at the next step."""
        self._inbox.append(("abort", request_id, None, None))

    def has_work(self) -> bool:
        return bool(self._inbox) or self.scheduler.has_unfinished()

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
        """Runs one step; returns a snapshot of every request it touched."""
        outputs = self._drain_inbox()
        out = self.scheduler.schedule()
        for seq in out.finished:  # finished by the scheduler (max_model_len)
            st = self._requests.get(seq.request_id)
            if st is not None:
                outputs.extend(self._on_seq_finished(st, seq, FinishReason.LENGTH))
        if out.is_empty:
            return outputs
        self.counters["preemptions"] += len(out.preempted)
        t0 = time.perf_counter()
        items = [self._step_item(s) for s in out.scheduled]
        try:
            results = self.runner.execute(items)
        except Exception as exc:  # a device failure ends the requests in this step only
            logger.exception("step failed; failing %d requests", len(items))
            failed = {s.seq.request_id for s in out.scheduled}
            for rid in failed:
                st = self._requests.get(rid)
                if st is not None:
                    self.scheduler.abort(rid)
                    outputs.append(self._finish_request(st, FinishReason.ERROR, str(exc)))
            return outputs
        self.last_step_seconds = time.perf_counter() - t0
        self.counters["steps"] += 1
        self.counters["prompt_tokens"] += out.num_prefill_tokens
        sampled = {sid: r.token for sid, r in results.items() if r.token is not None}
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
        newly = self.scheduler.postprocess(out, sampled)
        now = time.time()
        for seq in newly:
            st = self._requests.get(seq.request_id)
            if st is None:
                continue
            try:
                reason = self._on_token(st, st.seqs[seq.seq_id], results[seq.seq_id], now)
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
        banned = ()
        if seq.num_output_tokens < p.min_tokens:
            banned = tuple(self.eos_ids) + tuple(p.stop_token_ids)
        plp = None
        next_ids = ()
        if p.prompt_logprobs is not None and seq.index == 0 and sch.start < seq.num_prompt_tokens - 1:
            plp = p.prompt_logprobs
            stop = min(sch.end, seq.num_prompt_tokens - 1)
            next_ids = seq.all_token_ids[sch.start + 1:stop + 1]
        return StepItem(seq_id=seq.seq_id, token_ids=toks, start_pos=sch.start,
                        block_table=seq.block_table, sample=sch.samples, params=p,
                        seed=st.seqs[seq.seq_id].seed, output_token_ids=seq.output_token_ids,
                        prompt_token_ids=seq.prompt_token_ids, banned_ids=banned,
                        prompt_logprobs=plp, next_token_ids=next_ids)

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


class RequestStream:
    """Async iterator of a request's ``RequestOutput`` snapshots."""

    def __init__(self, engine: "AsyncEngine", request_id: str):
        self._engine = engine
        self.request_id = request_id
        self._queue: asyncio.Queue = asyncio.Queue()
        self.finished = False

    def _put(self, item) -> None:
        self._queue.put_nowait(item)

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        try:
            item = await self._queue.get()
            while not item.finished and not self._queue.empty():
                item = self._queue.get_nowait()  # coalesce snapshots we fell behind on
        except asyncio.CancelledError:
            self.abort()
            raise
        if item.finished:
            self.finished = True
            self._engine._streams.pop(self.request_id, None)
        return item

    def abort(self) -> None:
        if not self.finished:
            self.finished = True
            self._engine.abort(self.request_id)

    async def aclose(self) -> None:
        self.abort()


class AsyncEngine:
    """Runs ``LLMEngine`` on its own thread and streams outputs to asyncio."""

    def __init__(self, config: EngineConfig, engine: Optional[LLMEngine] = None):
        _enable_compile_cache(config.compile_cache_dir)
        self.config = config
        self.engine = engine or build_engine(config)
        self._streams: dict[str, RequestStream] = {}
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._wake = threading.Event()
        self._stop = False
        self._ready = False
        self._sleeping = False
        self._lock = threading.Lock()

    # attributes the HTTP layer reads
    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def model_config(self):
        return self.engine.model_config

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def model_path(self) -> str:
        return self.engine.model_path

    def is_ready(self) -> bool:
        return self._ready and not self._sleeping

    async def start(self) -> None:
        """Compiles every bucket (unless disabled) and starts the engine thread."""
        self._loop = asyncio.get_running_loop()
        if self.config.precompile:
            await asyncio.to_thread(self.engine.runner.precompile)
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()
        self._ready = True

    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    params: SamplingParams) -> RequestStream:
        """Validates and queues a request; returns its output stream."""
        if not self.is_ready():
            raise EngineNotReadyError("The engine is not ready" +
                                      (" (sleeping)" if self._sleeping else ""))
        params = self.engine.validate(prompt_token_ids, params)
        if request_id in self._streams:
            raise ValidationError("request_id", f"request id {request_id!r} is already running")
        if self.engine.scheduler.num_waiting + len(self.engine._inbox) >= self.config.max_queue_size:
            raise EngineOverloadedError(
                f"The server is overloaded: {self.config.max_queue_size} requests are waiting")
        stream = RequestStream(self, request_id)
        self._streams[request_id] = stream
        self.engine.submit(request_id, prompt_token_ids, params)
        self._wake.set()
        return stream

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str):
        """Convenience: yields snapshots; aborts if the caller stops early."""
        stream = self.add_request(request_id, prompt_token_ids, params)
        try:
            async for out in stream:
                yield out
        finally:
            stream.abort()

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)
        self._wake.set()

    def stats(self) -> dict:
        return self.engine.stats()

    def flush_cache(self) -> bool:
        with self._lock:
            return self.engine.scheduler.flush_prefix_cache()

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                stream._put(out)
                if out.finished:
                    self._streams.pop(out.request_id, None)

    def _run(self) -> None:
        eng = self.engine
        while not self._stop:
            if not eng.has_work():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                with self._lock:
                    outputs = eng.step()
            except Exception:  # never let one bad step kill the loop
                logger.exception("engine step crashed; continuing")
                continue
            if outputs and self._loop is not None:
                self._loop.call_soon_threadsafe(self._deliver, outputs)

    async def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)
        self._ready = False

    # ---- sleep / wake-up and weight updates (native admin routes) ------------------
    def is_sleeping(self) -> bool:
        return self._sleeping

    def num_unfinished(self) -> int:
        return len(self._streams) + len(self.engine._inbox)

    def sleep(self, level: int = 1) -> None:
        """Frees the device memory of weights and KV cache (LMDeploy/vLLM sleep).

        Level 1 keeps a host copy of the weights for ``wake_up``; level 2
        discards them (``wake_up`` reloads from ``model_path``). Requests
        arriving meanwhile get EngineNotReadyError (503).

        Raises:
            RuntimeError: requests are still running.
        """
        import jax

        if self._sleeping:
            return
        self._sleeping = True
        with self._lock:
            if self.engine.has_work():
                self._sleeping = False
                raise RuntimeError(f"cannot sleep while {self.num_unfinished()} requests run")
            runner = self.engine.runner
            self._sleep_host_state = jax.device_get(runner.state) if level == 1 else None
            self._sleep_shardings = jax.tree.map(lambda a: a.sharding, runner.state)
            self.engine.block_manager.flush_prefix_cache()  # cached pages die with the KV
            runner.release()
            self.engine.loaded.state = None
        logger.info("engine asleep (level %d): weights and KV cache released", level)

    def wake_up(self) -> None:
        """Restores the weights and KV cache released by ``sleep``."""
        import jax

        if not self._sleeping:
            return
        with self._lock:
            host = self._sleep_host_state
            if host is None:
                from model.loader import load_model
                host = load_model(self.engine.model_path, dtype=self.engine.dtype,
                                  with_tokenizer=False).state
            state = jax.tree.map(jax.device_put, host, self._sleep_shardings)
            self.engine.runner.restore(state)
            self.engine.loaded.state = state
            self._sleep_host_state = self._sleep_shardings = None
        self._sleeping = False
        logger.info("engine awake")

    def update_weights_from_disk(self, model_path: str) -> tuple[bool, str]:
        """Loads new weights of the same architecture and shapes; swaps between steps.

        The new checkpoint is read and checked off the engine lock; only the swap
        holds it. On any failure the old weights keep serving.

        Returns:
            ``(success, message)`` worded as SGLang words them.
        """
        import jax

        from model.loader import load_model

        try:
            new = load_model(model_path, dtype=self.engine.dtype, with_tokenizer=False)
        except FileNotFoundError:
            return False, f"Failed to get weights iterator: {model_path} (repository not found)."
        except Exception as exc:  # noqa: BLE001 - reported to the client
            return False, (f"Failed to update weights: {exc}.\n"
                           "Rolling back to original weights.")
        old = self.engine.runner.state
        problem = _state_mismatch(old, new.state) if old is not None else "the engine is asleep"
        if problem is None and new.config.architecture != self.engine.model_config.architecture:
            problem = (f"architecture {new.config.architecture} does not match "
                       f"{self.engine.model_config.architecture}")
        if problem is not None:
            return False, f"Failed to update weights: {problem}.\nRolling back to original weights."
        state = jax.tree.map(lambda n, o: jax.device_put(n, o.sharding), new.state, old)
        with self._lock:
            self.engine.runner.state = state
            self.engine.loaded.state = state
            self.engine.model_path = str(new.path)
            self.engine.scheduler.flush_prefix_cache()  # refused (False) while requests run
        logger.info("updated weights from %s", model_path)
        return True, "Succeeded to update model weights."


def build_engine(config: EngineConfig):
    """One ``LLMEngine``, or a ``DataParallelEngine`` of ``data_parallel_size`` replicas."""
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


def _enable_compile_cache(path: Optional[str]) -> None:
    """Turns on JAX's persistent compilation cache (second starts are quick)."""
    if not path:
        return
    import jax

    path = os.path.expanduser(path)
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _state_mismatch(old, new) -> Optional[str]:
    """Why ``new`` cannot replace ``old`` (None when every leaf matches), PyTorch-worded."""
    import jax

    old_leaves = dict(jax.tree_util.tree_leaves_with_path(old))
    new_leaves = dict(jax.tree_util.tree_leaves_with_path(new))
    for path, a in old_leaves.items():
        b = new_leaves.get(path)
        if b is None:
            continue
        if a.shape != b.shape:
            if len(a.shape) == len(b.shape):
                dim = next(i for i, (x, y) in enumerate(zip(a.shape, b.shape)) if x != y)
                return (f"The size of tensor a ({b.shape[dim]}) must match the size of tensor "
                        f"b ({a.shape[dim]}) at non-singleton dimension {dim}")
            return (f"parameter {jax.tree_util.keystr(path)} has shape {tuple(b.shape)}, "
                    f"expected {tuple(a.shape)}")
    if old_leaves.keys() != new_leaves.keys():
        missing = sorted(map(jax.tree_util.keystr, old_leaves.keys() - new_leaves.keys()))[:3]
        extra = sorted(map(jax.tree_util.keystr, new_leaves.keys() - old_leaves.keys()))[:3]
        return f"parameter names differ (missing {missing}, unexpected {extra})"
    return None
