"""Submitting engine requests, merging their streams, and reading them back.

A request with several prompts becomes one engine request per prompt; their
streams are merged into one async iterator of ``(prompt_index, RequestOutput)``.
Whatever ends the iteration early -- the client disconnecting (Quart cancels
the handler task), an exception, the generator being closed -- aborts every
engine request that has not finished, so its KV pages are freed at once.

Every dialect reads outputs through the two helpers here: :meth:`Generation.finals`
(the last snapshot of each prompt, for a non-streamed answer) and
:class:`Deltas` (what is new in a snapshot since the last chunk, for a
stream). A request that failed inside the engine raises the same error
(``errors.request_failed``: 500) on every route.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import weakref
from typing import Any, AsyncIterator, Optional

from serving.api.errors import APIError, from_engine_error, request_failed
from serving.api.protocol import random_uuid
from serving.engine.errors import EngineError, EngineOverloadedError
from serving.engine.types import CompletionOutput, RequestOutput

logger = logging.getLogger(__name__)


class Generation:
    """The engine requests behind one HTTP request.

    Args:
        state: the ServerState.
        base_id: the HTTP request's id; engine ids are ``{base_id}-{salt}-{i}``.
        prompts: prompt token ids, one list per engine request.
        params: the sampling params of each prompt (their max_tokens may differ).
        request_ids: explicit engine ids (SGLang ``rid``), one per prompt.
        abort_keys: keys (SGLang ``rid``) under which ``/abort_request``
            finds this generation while it runs.
        session_id: LMDeploy's ``session_id`` (None or < 0: none), another
            such key; a session that is still running cannot be reused (400).
    """

    def __init__(self, state, base_id: str, prompts: list[list[int]], params: list,
                 request_ids: Optional[list[str]] = None, abort_keys: tuple[str, ...] = (),
                 session_id: Optional[int] = None):
        self._state = state
        self.base_id = base_id
        self.prompts = prompts
        self.params = params
        # A short random part keeps engine ids unique when clients reuse an X-Request-Id.
        salt = random_uuid()[:8]
        self.request_ids = list(request_ids or [f"{base_id}-{salt}-{i}"
                                                for i in range(len(prompts))])
        self.session = str(session_id) if session_id is not None and session_id >= 0 else None
        self.abort_keys = tuple(abort_keys) + ((self.session,) if self.session else ())
        self._streams: list[Any] = []
        self._timers: list = []
        # Ids added but not finished. If the HTTP task dies before the body is
        # ever iterated (a disconnect right after the headers), the finalizer
        # still aborts them when this object is collected.
        self._pending: set[str] = set()
        weakref.finalize(self, _abort_ids, state.engine, self._pending)

    def submit(self) -> "Generation":
        """Adds every engine request; on any failure aborts those already added.

        Raises:
            APIError: the engine's error, mapped by ``errors.from_engine_error``.
        """
        state, engine = self._state, self._state.engine
        state.check_ready()
        if self.session is not None and self.session in state.running:
            raise APIError(f"The session_id {int(self.session)!r} is occupied.", 400,
                           "session_id")
        try:
            for rid, ids, params in zip(self.request_ids, self.prompts, self.params):
                self._streams.append(engine.add_request(rid, ids, params))
                self._pending.add(rid)
                self._timers.append(state.metrics.timer())
        except EngineError as exc:
            self.abort()
            if isinstance(exc, EngineOverloadedError):
                state.metrics.on_rejected()
            raise from_engine_error(exc) from None
        for key in self.abort_keys:
            state.running[key] = self
        return self

    def abort(self) -> None:
        """Aborts every engine request that has not finished."""
        _abort_ids(self._state.engine, self._pending)
        self._release()

    def _release(self) -> None:
        running = self._state.running
        for key in self.abort_keys:
            if running.get(key) is self:
                del running[key]

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
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

    async def checked_outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """:meth:`outputs`, raising ``request_failed`` (500) for a failed request."""
        async for i, out in self.outputs():
            if out.error:
                raise request_failed(out.error)
            yield i, out

    async def finals(self) -> list[RequestOutput]:
        """The finished snapshot of every prompt, in prompt order (500 if one failed)."""
        final: dict[int, RequestOutput] = {}
        async for i, out in self.checked_outputs():
            if out.finished:
                final[i] = out
        missing = [i for i in range(len(self.prompts)) if i not in final]
        if missing:
            raise APIError("The request ended before the engine finished it.", 500)
        return [final[i] for i in range(len(self.prompts))]

    def _record(self, i: int, out: RequestOutput) -> None:
        timer = self._timers[i]
        timer.on_output(out.num_generated_tokens)
        if out.finished:
            self._pending.discard(self.request_ids[i])
            reasons = [o.finish_reason for o in out.outputs]
            reason = "error" if out.error or "error" in reasons else (reasons[0] if reasons else None)
            timer.on_finish(reason, out.num_prompt_tokens)


@dataclasses.dataclass
class Delta:
    """What one completion gained since the last chunk sent for it."""

    first: bool  # the first chunk of this completion
    text: str
    token_ids: list[int]
    logprobs: list  # the new tokens' PositionLogprobs (None-padded)
    text_offset: int  # characters of this completion sent before
    finished: bool  # the completion is finished (this is its last chunk)


class Deltas:
    """Tracks what each ``(prompt, completion)`` stream has sent.

    ``update`` returns the :class:`Delta` of a snapshot, or None when nothing
    is new (and the completion's last chunk has already gone out). Each
    completion's finish is reported exactly once.
    """

    def __init__(self):
        self._sent: dict[tuple[int, int], tuple[int, int]] = {}
        self._done: set[tuple[int, int]] = set()

    def update(self, i: int, comp: CompletionOutput, force_first: bool = False
               ) -> Optional[Delta]:
        """The delta of ``comp`` since the last chunk, marked as sent."""
        delta = self.peek(i, comp, force_first)
        if delta is not None:
            self.commit(i, comp)
        return delta

    def peek(self, i: int, comp: CompletionOutput, force_first: bool = False
             ) -> Optional[Delta]:
        """The delta of ``comp`` without marking it sent (a chunk held back)."""
        key = (i, comp.index)
        if key in self._done:
            return None
        first = key not in self._sent
        t0, k0 = self._sent.get(key, (0, 0))
        text, ids = comp.text[t0:], list(comp.token_ids[k0:])
        if not text and not ids and not comp.finished and not (first and force_first):
            return None
        steps = list((comp.logprobs or [])[k0:k0 + len(ids)])
        steps += [None] * (len(ids) - len(steps))
        return Delta(first, text, ids, steps, t0, comp.finished)

    def commit(self, i: int, comp: CompletionOutput) -> None:
        """Marks everything in ``comp`` as sent."""
        key = (i, comp.index)
        self._sent[key] = (len(comp.text), len(comp.token_ids))
        if comp.finished:
            self._done.add(key)


def _abort_ids(engine, pending: set[str]) -> None:
    """Aborts each id in ``pending`` and empties it (safe to call twice)."""
    while pending:
        rid = pending.pop()
        try:
            engine.abort(rid)
        except Exception:  # never let cleanup mask the real error
            logger.exception("abort of %s failed", rid)
