"""``AsyncEngine``: runs an ``LLMEngine`` on its own thread for asyncio callers.

The HTTP layer calls ``add_request`` and iterates the returned
``RequestStream``; the engine thread loops ``LLMEngine.step()`` and hands each
step's ``RequestOutput`` snapshots back with ``loop.call_soon_threadsafe``.
Sleep/wake-up and weight updates (the native admin routes) swap device state
between steps under the engine lock.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from typing import Optional

from serving.engine.config import EngineConfig
from serving.engine.engine import LLMEngine, build_engine
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
