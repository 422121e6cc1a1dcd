"""``AsyncEngine``: runs an ``LLMEngine`` on its own thread for asyncio callers.

The HTTP layer calls ``add_request`` and iterates the returned
``RequestStream``; the engine thread loops ``LLMEngine.step()`` and hands each
step's ``RequestOutput`` snapshots back with ``loop.call_soon_threadsafe``.
Sleep/wake-up and weight updates (the native admin routes) swap device state
between steps under the engine lock.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import threading
from typing import Optional

from serving.engine.config import EngineConfig
from serving.engine.engine import LLMEngine, build_engine
from serving.engine.loop_thread import LoopThread
from serving.engine.types import (EngineNotReadyError, EngineOverloadedError, RequestOutput,
                                  SamplingParams, ValidationError)

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
    """Runs ``LLMEngine`` on its own thread and streams outputs to asyncio."""

    def __init__(self, config: EngineConfig, engine: Optional[LLMEngine] = None):
        _enable_compile_cache(config.compile_cache_dir)
        self.config = config
        self.engine = engine or build_engine(config)
        self._streams: dict[str, RequestStream] = {}
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._init_loop()
        self._sleeping = False
        self._lock = threading.Lock()
        self._update_lock = threading.Lock()  # serializes tensor updates
        self._pending: dict = {}  # state path -> host array staged by update_weights_from_tensors

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
        # The model, tokenizer and compiled programs live as long as the server:
        # moving them out of the collector's generations keeps its periodic full
        # passes (~4% of a decode step here) to the objects requests create.
        gc.freeze()
        self._start_loop("engine-loop")

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

    # ---- sleep / wake-up and weight updates (native admin routes) ------------------
    def is_sleeping(self) -> bool:
        return self._sleeping

    def num_unfinished(self) -> int:
        return len(self._streams) + len(self.engine._inbox)

    def _replicas(self) -> list:
        """The ``LLMEngine``s behind this engine: one, or each data-parallel replica."""
        return list(getattr(self.engine, "engines", None) or [self.engine])

    def sleep(self, level: int = 1) -> None:
        """Frees the device memory of weights and KV cache (LMDeploy/vLLM sleep).

        Every data-parallel replica sleeps. Level 1 keeps one host copy of the
        weights (replicas hold the same weights) for ``wake_up``; level 2
        discards them (``wake_up`` reloads from ``model_path``, so weights set
        by ``update_weights_from_tensors`` are lost). Requests arriving
        meanwhile get EngineNotReadyError (503).

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
            replicas = self._replicas()
            self._sleep_host_state = (jax.device_get(replicas[0].runner.state)
                                      if level == 1 else None)
            self._sleep_shardings = [jax.tree.map(lambda a: a.sharding, r.runner.state)
                                     for r in replicas]
            for r in replicas:
                r.block_manager.flush_prefix_cache()  # cached pages die with the KV
                r.runner.release()
                r.loaded.state = None
        logger.info("engine asleep (level %d): weights and KV cache of %d replica(s) released",
                    level, len(replicas))

    def wake_up(self) -> None:
        """Restores the weights and KV cache released by ``sleep`` (every replica)."""
        import jax

        if not self._sleeping:
            return
        with self._lock:
            replicas = self._replicas()
            host = self._sleep_host_state
            if host is None:
                from model.loader import load_model
                host = replicas[0].quantize(load_model(
                    replicas[0].model_path, dtype=replicas[0].dtype, with_tokenizer=False)).state
            for r, shardings in zip(replicas, self._sleep_shardings):
                state = jax.tree.map(jax.device_put, host, shardings)
                r.runner.restore(state)
                r.loaded.state = state
            self._sleep_host_state = self._sleep_shardings = None
        self._sleeping = False
        logger.info("engine awake")

    def _swap_states(self, states: list, model_path: Optional[str] = None) -> None:
        """Installs one new state per replica between steps; drops the prefix cache."""
        with self._lock:
            for r, state in zip(self._replicas(), states):
                r.runner.state = state
                r.loaded.state = state
                if model_path is not None:
                    r.model_path = model_path
            if model_path is not None:
                self.engine.model_path = model_path
            self.engine.scheduler.flush_prefix_cache()  # refused (False) while requests run

    def update_weights_from_disk(self, model_path: str) -> tuple[bool, str]:
        """Loads new weights of the same architecture and shapes; swaps between steps.

        The new checkpoint is read, checked and placed on every replica's
        devices off the engine lock; only the swap holds it. On any failure
        the old weights keep serving.

        Returns:
            ``(success, message)`` worded as SGLang words them.
        """
        import jax

        from model.loader import load_model

        replicas = self._replicas()
        try:
            new = replicas[0].quantize(
                load_model(model_path, dtype=replicas[0].dtype, with_tokenizer=False))
        except FileNotFoundError:
            return False, f"Failed to get weights iterator: {model_path} (repository not found)."
        except Exception as exc:  # noqa: BLE001 - reported to the client
            return False, (f"Failed to update weights: {exc}.\n"
                           "Rolling back to original weights.")
        old = replicas[0].runner.state
        problem = _state_mismatch(old, new.state) if old is not None else "the engine is asleep"
        if problem is None and new.config.architecture != self.engine.model_config.architecture:
            problem = (f"architecture {new.config.architecture} does not match "
                       f"{self.engine.model_config.architecture}")
        if problem is not None:
            return False, f"Failed to update weights: {problem}.\nRolling back to original weights."
        states = [jax.tree.map(lambda n, o: jax.device_put(n, o.sharding), new.state,
                               r.runner.state) for r in replicas]
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
        import jax

        from model.weights import paths_from_hf_update

        with self._update_lock:
            if self._sleeping or self._replicas()[0].runner.state is None:
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

            def replace(keypath, leaf):
                path = tuple(k.key for k in keypath if isinstance(k, jax.tree_util.DictKey))
                if path not in pending:
                    return leaf
                return jax.device_put(pending[path].astype(leaf.dtype), leaf.sharding)

            states = [jax.tree_util.tree_map_with_path(replace, r.runner.state)
                      for r in self._replicas()]
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
