"""``AsyncEngine``: runs an ``EngineCore`` on its own thread for asyncio callers.

The HTTP layer calls ``add_request`` and iterates the returned
``RequestStream``; the engine thread loops ``EngineCore.step()`` (one
``LLMEngine``, or a ``DataParallelEngine`` of several) and hands each step's
``RequestOutput`` snapshots back with ``loop.call_soon_threadsafe``.
Sleep/wake-up and weight updates (the native admin routes) go to every
replica (``EngineCore.replicas``) between steps, under the engine lock; each
replica's runner is the only holder of its weights.

``AsyncEngine`` implements ``serving.engine.protocol.EngineClient`` for the
task "generate"; its pooling members raise ``UnsupportedOperationError``.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import os
import threading
import time
from typing import Optional

from serving.engine import compile_log
from serving.engine.config import EngineConfig
from serving.engine.engine import build_core
from serving.engine.errors import (EngineNotReadyError, EngineOverloadedError,
                                   RequestFailedError, UnsupportedOperationError,
                                   ValidationError)
from serving.engine.loop_thread import LoopThread
from serving.engine.protocol import EngineCore
from serving.engine.types import RequestOutput, SamplingParams

logger = logging.getLogger(__name__)


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


class AsyncEngine(LoopThread):
    """Runs an ``EngineCore`` on its own thread and streams outputs to asyncio.

    Args:
        config: the EngineConfig.
        engine: the core to drive; default: ``build_core(config)``.
    """

    task = "generate"
    id2label: dict = {}  # a generation model has no classifier labels
    normalize = False  # nor embeddings

    def __init__(self, config: EngineConfig, engine: Optional[EngineCore] = None):
        _enable_compile_cache(config.compile_cache_dir)
        self._compile_log = compile_log.install()
        self.startup: dict = {}  # seconds per start-up phase, filled by start()
        self.config = config
        self.engine: EngineCore = engine or build_core(config)
        self._streams: dict[str, RequestStream] = {}
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._init_loop()
        self._sleeping = False
        self._sleep_host_state = None  # level-1 sleep: one host copy of the weights
        self._lock = threading.Lock()
        self._update_lock = threading.Lock()  # serializes tensor updates
        self._pending: dict = {}  # state path -> host array staged by update_weights_from_tensors
        self._health_ids = itertools.count()

    # ---- what the HTTP layer reads
    @property
    def hf_config(self) -> dict:
        return self.engine.hf_config

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
        before = self._compile_log.snapshot()
        t0 = time.perf_counter()
        if self.config.precompile:
            await asyncio.to_thread(self.engine.precompile)
        self._report_startup(before, time.perf_counter() - t0)
        # The model, tokenizer and compiled programs live as long as the server:
        # moving them out of the collector's generations keeps its periodic full
        # passes (~4% of a decode step here) to the objects requests create.
        gc.freeze()
        self._start_loop("engine-loop")

    def _report_startup(self, before: dict, precompile_s: float) -> None:
        after = self._compile_log.snapshot()
        report = self.engine.startup_report()
        self.startup = {
            "load_s": report["load_s"], "tokenizer_s": report["tokenizer_s"],
            "prepare_s": report["prepare_s"],
            "trace_s": (after["trace_s"] + after["lower_s"]
                        - before["trace_s"] - before["lower_s"]),
            "compile_s": after["compile_s"] - before["compile_s"],
            "precompile_s": precompile_s, "ready_s": compile_log.process_age(),
            "programs": report["programs"], "programs_from_cache": report["programs_from_cache"],
            "xla_compilations": after["backend_compiles"],
            "compiles_after_ready": 0,
        }
        s = self.startup
        logger.info("start-up: load %.1fs, tokenizer %.1fs, prepare %.1fs, trace+lower %.1fs, "
                    "compile %.1fs; %d step programs (%d from the program cache, %d XLA "
                    "compilations in all); ready %.1fs after launch", s["load_s"],
                    s["tokenizer_s"], s["prepare_s"], s["trace_s"], s["compile_s"],
                    s["programs"], s["programs_from_cache"], s["xla_compilations"],
                    s["ready_s"])
        if self.config.precompile:  # else programs build on first use, as asked
            self._compile_log.mark_ready()

    def startup_info(self) -> dict:
        """The start-up report, with the programs traced since (should stay 0)."""
        return {**self.startup, "compiles_after_ready": self._compile_log.after_ready}

    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    params: SamplingParams) -> RequestStream:
        """Validates and queues a request; returns its output stream."""
        if not self.is_ready():
            raise EngineNotReadyError("The engine is not ready" +
                                      (" (sleeping)" if self._sleeping else ""))
        params = self.engine.validate(prompt_token_ids, params)
        if request_id in self._streams:
            raise ValidationError("request_id", f"request id {request_id!r} is already running")
        if self.engine.num_queued() >= self.config.max_queue_size:
            raise EngineOverloadedError(
                f"{self.config.max_queue_size} requests are waiting")
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
        """Drops the prefix cache; False (nothing done) while requests run."""
        with self._lock:
            return self.engine.flush_prefix_cache()

    async def health_check(self) -> None:
        """Generates one greedy token end to end.

        Raises:
            EngineNotReadyError: starting, sleeping or shut down.
            RequestFailedError: the request failed or produced no token.
        """
        tok = self.tokenizer
        bos = getattr(tok, "bos_token_id", None)
        ids = [bos] if bos is not None else (tok.encode("hi")[:1] or [0])
        last = None
        async for out in self.generate(ids, SamplingParams(max_tokens=1, temperature=0.0),
                                       f"health-check-{next(self._health_ids)}"):
            last = out
        if last is None or last.error or not last.outputs or not last.outputs[0].token_ids:
            reason = (last.error if last is not None else None) or "no token generated"
            raise RequestFailedError(f"health check failed: {reason}")

    # ---- pooling: not served by a generation model
    def _no_pooling(self, what: str) -> UnsupportedOperationError:
        return UnsupportedOperationError(f"This server runs a generation model "
                                         f"({self.model_path}); {what} is not available.")

    async def embed(self, inputs: list, normalize: Optional[bool] = None):
        raise self._no_pooling("embedding")

    async def score(self, pairs: list):
        raise self._no_pooling("scoring")

    async def classify(self, inputs: list):
        raise self._no_pooling("classification")

    async def token_embeddings(self, inputs: list, normalize: bool = False) -> list:
        raise self._no_pooling("token embedding")

    def count_tokens(self, inputs: list, pairs: bool = False) -> list[int]:
        raise self._no_pooling("pooling")

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

    # ---- sleep / wake-up and weight updates (native admin routes) ------------------
    def is_sleeping(self) -> bool:
        return self._sleeping

    def sleep(self, level: int = 1) -> None:
        """Frees the device memory of weights and KV cache (LMDeploy/vLLM sleep).

        Every data-parallel replica sleeps. Level 1 keeps one host copy of the
        weights (replicas hold the same weights) for ``wake_up``; level 2
        discards them (``wake_up`` reloads from ``model_path``, so weights set
        by ``update_weights_from_tensors`` are lost). Requests arriving
        meanwhile get EngineNotReadyError (503).

        Raises:
            RuntimeError: requests are still running (not an engine error:
                the caller retries once they finish).
        """
        import jax

        if self._sleeping:
            return
        self._sleeping = True
        with self._lock:
            if self.engine.has_work():
                self._sleeping = False
                raise RuntimeError(f"cannot sleep while {len(self._streams)} requests run")
            replicas = self.engine.replicas
            self._sleep_host_state = jax.device_get(replicas[0].state) if level == 1 else None
            for r in replicas:
                r.release()
        logger.info("engine asleep (level %d): weights and KV cache of %d replica(s) released",
                    level, len(replicas))

    def wake_up(self) -> None:
        """Restores the weights and KV cache released by ``sleep`` (every replica)."""
        if not self._sleeping:
            return
        with self._lock:
            replicas = self.engine.replicas
            host = self._sleep_host_state
            if host is None:  # level 2: reload what served last
                host = replicas[0].read_checkpoint(replicas[0].model_path).state
            for r in replicas:
                r.restore(host)
            self._sleep_host_state = None
        self._sleeping = False
        logger.info("engine awake")

    def _swap_states(self, states: list, model_path: Optional[str] = None) -> None:
        """Installs one new state per replica between steps; drops the prefix cache."""
        with self._lock:
            for r, state in zip(self.engine.replicas, states):
                r.swap_state(state, model_path)
            self.engine.flush_prefix_cache()  # refused (False) while requests run

    def update_weights_from_disk(self, model_path: str) -> tuple[bool, str]:
        """Loads new weights of the same architecture and shapes; swaps between steps.

        The new checkpoint is read, checked and placed on every replica's
        devices off the engine lock; only the swap holds it. On any failure
        the old weights keep serving.

        Returns:
            ``(success, message)`` worded as SGLang words them.
        """
        replicas = self.engine.replicas
        try:
            new = replicas[0].read_checkpoint(model_path)
        except FileNotFoundError:
            return False, f"Failed to get weights iterator: {model_path} (repository not found)."
        except Exception as exc:  # noqa: BLE001 - reported to the client
            return False, (f"Failed to update weights: {exc}.\n"
                           "Rolling back to original weights.")
        old = replicas[0].state
        problem = _state_mismatch(old, new.state) if old is not None else "the engine is asleep"
        if problem is None and new.config.architecture != self.engine.model_config.architecture:
            problem = (f"architecture {new.config.architecture} does not match "
                       f"{self.engine.model_config.architecture}")
        if problem is not None:
            return False, f"Failed to update weights: {problem}.\nRolling back to original weights."
        states = [r.place(new.state) for r in replicas]
        self._swap_states(states, str(new.path))
        logger.info("updated weights of %d replica(s) from %s", len(replicas), model_path)
        return True, "Succeeded to update model weights."

    def update_weights_from_tensors(self, tensors: dict, finished: bool = True
                                    ) -> tuple[bool, str]:
        """Stages named Hugging Face tensors; swaps them in when ``finished`` (LMDeploy).

        Each call's tensors are checked (names through ``model.weights``'
        name map, shapes against the parameters) and kept on the host; the
        call with ``finished=True`` places everything staged on every
        replica's devices and swaps it in between steps, so requests never see
        a half-updated model. Tensors not sent keep their values. A bad call
        discards everything staged since the last swap.

        Args:
            tensors: ``{hf_name: numpy array}`` in the Hugging Face layout.
            finished: the last call of this update.

        Returns:
            ``(success, message)``; on failure the old weights keep serving.
        """
        from model.weights import apply_update, paths_from_hf_update

        with self._update_lock:
            if self._sleeping or self.engine.replicas[0].state is None:
                self._pending = {}
                return False, "Failed to update weights: the engine is asleep; POST /wakeup first."
            if self.config.quantization:
                self._pending = {}
                return False, ("Failed to update weights: tensor updates are not supported "
                               f"with --quantization {self.config.quantization}; use "
                               "/update_weights_from_disk.")
            try:
                updates = paths_from_hf_update(self.engine.model_config, tensors)
            except (KeyError, ValueError) as exc:
                self._pending = {}
                return False, (f"Failed to update weights: {exc}.\n"
                               "Rolling back to original weights.")
            self._pending.update(updates)
            if not finished:
                return True, (f"Staged {len(updates)} tensor(s), {len(self._pending)} in all; "
                              "they take effect with finished=true.")
            pending, self._pending = self._pending, {}

            # q, k, v, gate, up land in their slices of the fused leaves
            states = [apply_update(self.engine.model_config, r.state, pending)
                      for r in self.engine.replicas]
            self._swap_states(states)
        logger.info("updated %d tensor(s) on %d replica(s) from serialized tensors",
                    len(pending), len(states))
        return True, "Succeeded to update model weights."

    def drop_staged_weights(self) -> None:
        """Forgets tensors staged by ``update_weights_from_tensors`` (nothing swapped yet)."""
        with self._update_lock:
            self._pending = {}


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
