"""Async scheduling: the step in flight on the device and the tokens it has not returned.

With async scheduling (the default) the engine launches step N+1 before it
reads step N's results, so the host's scheduling, input building and
detokenizing hide behind the device:

1. ``LLMEngine.step`` launches step N and hands it to :meth:`Pipeline.launched`.
   Each sequence N samples that surely takes another step gets
   ``PENDING_TOKEN`` as its last token, so the next ``Scheduler.schedule``
   gives it one more token to compute without knowing which one.
2. ``ModelRunner.launch`` builds step N+1's inputs; :func:`pending_sources`
   says which row of N's sampled tokens fills each ``PENDING_TOKEN``
   position, and the step program gathers it on the device, so nothing
   waits for the host.
3. The engine then reads step N (``ModelRunner.collect``, which blocks until
   N is done) and :func:`settle` replaces each placeholder with its sampled
   id before detokenizing and checking stops.

A step whose successor needs its tokens on the host first -- guided decoding
(the next token mask comes from the grammar state), penalties (they count
the generated tokens), or every step when async scheduling is off
(``--no-async-scheduling``, multi-host lockstep) -- is read at the end of its
own ``step()`` (:meth:`Pipeline.take_if_sync`), so the next step is built
from real tokens. At most one step is in flight.

No jax import at module level: the engine's host side imports this.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import TYPE_CHECKING, Optional

import numpy as np

if TYPE_CHECKING:
    from serving.engine.scheduler import SchedulerOutput
    from serving.engine.sequence import Sequence

PENDING_TOKEN = -1  # a sampled token still on the device


@dataclasses.dataclass
class StepHandle:
    """A launched step (one compiled call), not yet read.

    Built by ``ModelRunner.launch``: its ``StepItem``s in packing order, the
    device outputs (sampled tokens and prompt logprobs), and ``feed``, the
    device array of sampled tokens (row ``i``: item ``i``) that the next step
    takes its pending tokens from.
    """

    items: list
    outputs: tuple
    feed: object = None

    def feeds(self, seq_id: int) -> bool:
        """Whether the next step can take this sequence's token from the device."""
        return self.feed is not None and seq_id in self.rows

    @functools.cached_property
    def rows(self) -> dict[int, int]:
        """seq_id -> row of ``feed``, for the items this step samples."""
        return {it.seq_id: row for row, it in enumerate(self.items) if it.sample}


@dataclasses.dataclass
class InFlight:
    """A launched step whose results the host has not read.

    Attributes:
        out: the ``SchedulerOutput`` it runs.
        handle: its device outputs (``StepHandle``).
        samplers: ``(sequence, pending)`` for each sequence it samples;
            ``pending`` when that sequence's last token is ``PENDING_TOKEN``.
        sync_next: read it before the next schedule (the next step needs
            its tokens on the host).
        launched_at: ``time.perf_counter()`` at launch.
    """

    out: "SchedulerOutput"
    handle: StepHandle
    samplers: list[tuple["Sequence", bool]]
    sync_next: bool
    launched_at: float = dataclasses.field(default_factory=time.perf_counter)


class Pipeline:
    """Owns the step in flight (at most one) and the pending tokens it will return.

    Args:
        overlap: launch step N+1 before reading step N (async scheduling).
        max_model_len: the context length; a sequence at its end takes no
            further step, so it gets no pending token.
    """

    def __init__(self, overlap: bool, max_model_len: int):
        self.overlap = overlap
        self.max_model_len = max_model_len
        self._inflight: Optional[InFlight] = None

    @property
    def busy(self) -> bool:
        """Whether a launched step has not been read yet."""
        return self._inflight is not None

    def launched(self, out: "SchedulerOutput", handle: StepHandle,
                 samplers: list["Sequence"]) -> None:
        """Records a launched step as the one in flight.

        Each sampler the next step can feed from the device, and that surely
        takes another step (below ``max_tokens`` and ``max_model_len``), gets
        a ``PENDING_TOKEN``; the others get their token when the step is read.
        """
        assert self._inflight is None, "a step is already in flight"
        sync_next = not self.overlap or any(s.params.needs_sync() for s in samplers)
        marked = []
        for seq in samplers:
            pending = (not sync_next and handle.feeds(seq.seq_id)
                       and seq.num_output_tokens + 1 < seq.params.max_tokens
                       and seq.num_tokens + 1 < self.max_model_len)
            if pending:
                seq.append_token(PENDING_TOKEN)
            marked.append((seq, pending))
        self._inflight = InFlight(out, handle, marked, sync_next)

    def take(self) -> Optional[InFlight]:
        """The step in flight (None if none), which the caller now reads."""
        fl, self._inflight = self._inflight, None
        return fl

    def take_if_sync(self) -> Optional[InFlight]:
        """The step in flight if the next step needs its tokens on the host, else None."""
        return self.take() if self._inflight is not None and self._inflight.sync_next else None


def settle(seq: "Sequence", pending: bool, token: int) -> None:
    """Gives ``seq`` the token its step sampled: fills its placeholder, or appends it."""
    if pending:
        assert seq.last_token_id == PENDING_TOKEN, f"{seq} has no pending token"
        seq.set_last_token(token)
    else:
        seq.append_token(token)


def pending_sources(input_ids: np.ndarray, items: list,
                    prev: Optional[StepHandle]) -> np.ndarray:
    """Where each pending token of a step comes from: [T] i32 rows of ``prev.feed`` (-1: none).

    Args:
        input_ids: [T] i32 host ids of the step, with ``PENDING_TOKEN`` where a
            sequence's last token is still on the device.
        items: the step's ``StepItem``s, in packing order (each contributes
            ``len(token_ids)`` consecutive positions).
        prev: the step before, still in flight.
    """
    src = np.full(input_ids.shape, -1, np.int32)
    pending = np.flatnonzero(input_ids == PENDING_TOKEN)
    if pending.size == 0:
        return src
    if prev is None:
        raise ValueError("a pending token needs the previous step's output")
    row_of = {}
    cursor = 0
    for it in items:
        cursor += len(it.token_ids)
        row_of[cursor - 1] = it.seq_id  # only a sequence's last token can be pending
    for pos in pending:
        src[pos] = prev.rows[row_of[int(pos)]]
    return src
