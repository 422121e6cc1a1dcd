"""Submitting engine requests and merging their output streams.

A completion with several prompts becomes one engine request per prompt; their
streams are merged into one async iterator of ``(prompt_index, RequestOutput)``.
Whatever ends the iteration early -- the client disconnecting (Quart cancels
the handler task), an exception, the generator being closed -- aborts every
engine request that has not finished, so its KV pages are freed at once.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from typing import Any, AsyncIterator

from serving.api.errors import APIError
from serving.api.metrics import RequestTimer
from serving.api.protocol import random_uuid
from serving.engine.types import SamplingParams, ValidationError

logger = logging.getLogger(__name__)


def _engine_errors():
    try:
        from serving.engine.types import EngineNotReadyError, EngineOverloadedError
        return EngineOverloadedError, EngineNotReadyError
    except ImportError:  # the engine module has not landed yet
        return (), ()


class Generation:
    """The engine requests behind one HTTP request.

    Args:
        state: the ServerState.
        base_id: the HTTP request's id; engine ids are ``{base_id}-{salt}-{i}``.
        prompts: prompt token ids, one list per engine request.
        params: the sampling params of each prompt (their max_tokens may differ).
    """

    def __init__(self, state, base_id: str, prompts: list[list[int]],
                 params: list[SamplingParams]):
        self._state = state
        self.base_id = base_id
        self.prompts = prompts
        self.params = params
        # A short random part keeps engine ids unique when clients reuse an X-Request-Id.
        salt = random_uuid()[:8]
        self.request_ids = [f"{base_id}-{salt}-{i}" for i in range(len(prompts))]
        self._streams: list[Any] = []
        self._finished: set[int] = set()
        self._timers: list[RequestTimer] = []
        # Ids added but not finished. If the HTTP task dies before the body is
        # ever iterated (a disconnect right after the headers), the finalizer
        # still aborts them when this object is collected.
        self._pending: set[str] = set()
        weakref.finalize(self, _abort_ids, state.engine, self._pending)

    def submit(self) -> None:
        """Adds every engine request; on any failure aborts those already added.

        Raises:
            APIError: 400 for a request the engine rejects, 503 when it is not
                ready or its queue is full.
        """
        overloaded, not_ready = _engine_errors()
        engine = self._state.engine
        try:
            for rid, ids, params in zip(self.request_ids, self.prompts, self.params):
                self._streams.append(engine.add_request(rid, ids, params))
                self._pending.add(rid)
                self._timers.append(self._state.metrics.timer())
        except ValidationError as exc:
            self.abort()
            raise APIError(str(exc), 400, exc.param) from None
        except Exception as exc:
            self.abort()
            if overloaded and isinstance(exc, overloaded):
                raise APIError(f"The server is overloaded: {exc}", 503) from None
            if not_ready and isinstance(exc, not_ready):
                raise APIError(f"The engine is not ready: {exc}", 503) from None
            if isinstance(exc, ValueError):
                raise APIError(str(exc), 400) from None
            raise

    def abort(self) -> None:
        """Aborts every engine request that has not finished."""
        _abort_ids(self._state.engine, self._pending)
        self._finished.update(range(len(self._streams)))

    async def outputs(self) -> AsyncIterator[tuple[int, Any]]:
        """Yields ``(prompt_index, RequestOutput)`` as they come, from every stream."""
        try:
            if len(self._streams) == 1:
                async for out in self._streams[0]:
                    self._record(0, out)
                    yield 0, out
                return
            queue: asyncio.Queue = asyncio.Queue()
            done = object()

            async def pump(i: int, stream) -> None:
                try:
                    async for out in stream:
                        await queue.put((i, out))
                except BaseException as exc:  # handed to the consumer
                    await queue.put((i, exc))
                    return
                await queue.put((i, done))

            tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(self._streams)]
            try:
                remaining = len(tasks)
                while remaining:
                    i, item = await queue.get()
                    if item is done:
                        remaining -= 1
                        continue
                    if isinstance(item, BaseException):
                        raise item
                    self._record(i, item)
                    yield i, item
            finally:
                for t in tasks:
                    t.cancel()
        finally:
            self.abort()

    def _record(self, i: int, out) -> None:
        timer = self._timers[i]
        timer.on_output(out.num_generated_tokens)
        if out.finished:
            self._finished.add(i)
            self._pending.discard(self.request_ids[i])
            reasons = [o.finish_reason for o in out.outputs]
            reason = "error" if out.error or "error" in reasons else (reasons[0] if reasons else None)
            timer.on_finish(reason, out.num_prompt_tokens)


def _abort_ids(engine, pending: set[str]) -> None:
    """Aborts each id in ``pending`` and empties it (safe to call twice)."""
    while pending:
        rid = pending.pop()
        try:
            engine.abort(rid)
        except Exception:  # never let cleanup mask the real error
            logger.exception("abort of %s failed", rid)
