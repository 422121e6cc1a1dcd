"""Continuous-batching scheduler with chunked prefill and preemption.

Each step :meth:`Scheduler.schedule` picks, for every sequence it runs, how
many tokens to compute (``num_new_tokens``) under a token budget, in the
style of vLLM v1 (there is no separate prefill or decode phase):

1. RUNNING sequences first, in admission order: a decoding sequence takes one
   token, one in the middle of a chunked prefill takes what it still needs
   (capped by the budget and ``long_prefill_token_threshold``). When one
   cannot get a page, the most recently admitted running sequence is
   preempted (recompute: its pages are freed, it keeps its outputs and goes
   back to the front of the waiting queue); if that is the sequence itself,
   it waits.
2. WAITING sequences next, first come first served, while the budget,
   ``max_num_seqs`` and free pages allow (not in a step that preempted). A
   prompt's cached prefix is reused; a long prompt is chunked.

After the model step the engine calls :meth:`Scheduler.postprocess` with the
sampled tokens, checks stop conditions and calls :meth:`Scheduler.finish`.
A request with ``best_of > 1`` prefills its first sequence only; once that
prompt is computed the others fork from it, sharing the full prompt pages.

No jax import here.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Optional

from serving.engine.block_manager import BlockManager
from serving.engine.sequence import Sequence, SequenceGroup, SequenceStatus
from serving.engine.types import FinishReason

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SchedulerConfig:
    """Scheduler limits.

    Attributes:
        max_num_seqs: Most sequences running at once.
        max_num_batched_tokens: Token budget of one step.
        max_model_len: Longest sequence (prompt plus outputs) the model takes.
        enable_chunked_prefill: Split long prompts across steps; when False a
            prompt is admitted only if it fits the remaining budget whole.
        long_prefill_token_threshold: If set, at most this many tokens per
            sequence per step, so one long prompt cannot take the whole budget.
    """

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int
    enable_chunked_prefill: bool = True
    long_prefill_token_threshold: Optional[int] = None

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.long_prefill_token_threshold is not None and self.long_prefill_token_threshold < 1:
            raise ValueError("long_prefill_token_threshold must be positive or None, "
                             f"got {self.long_prefill_token_threshold}")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least "
                f"max_model_len ({self.max_model_len}) when chunked prefill is disabled")


@dataclasses.dataclass(frozen=True)
class ScheduledSeq:
    """One sequence's share of a step: tokens ``[start, start + num_new_tokens)``.

    Attributes:
        seq: The sequence.
        num_new_tokens: Tokens to compute this step.
        start: ``seq.num_computed_tokens`` when scheduled (filled in).
    """

    seq: Sequence
    num_new_tokens: int
    start: int = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "start", self.seq.num_computed_tokens)

    @property
    def end(self) -> int:
        """Context length after this step."""
        return self.start + self.num_new_tokens

    @property
    def samples(self) -> bool:
        """Whether the chunk reaches the end of the sequence (a token is sampled)."""
        return self.end == self.seq.num_tokens

    @property
    def is_prefill(self) -> bool:
        """False for a one-token step past the prompt (a decode)."""
        return not (self.num_new_tokens == 1 and self.start >= self.seq.num_prompt_tokens)


@dataclasses.dataclass
class SchedulerOutput:
    """What one step runs.

    Attributes:
        scheduled: Sequences to run with their token counts, running ones first.
        preempted: Sequences preempted this step (back in the waiting queue).
        num_batched_tokens: Sum of ``num_new_tokens``.
        finished: Sequences the scheduler finished itself (``LENGTH``: longer
            than ``max_model_len``) because the engine had not.
    """

    scheduled: list[ScheduledSeq]
    preempted: list[Sequence]
    num_batched_tokens: int
    finished: list[Sequence] = dataclasses.field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    @property
    def num_prefill_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled if s.is_prefill)

    @property
    def num_decode_seqs(self) -> int:
        return sum(1 for s in self.scheduled if not s.is_prefill)


class Scheduler:
    """Decides which sequences run each step and how many tokens each computes.

    Args:
        config: Limits.
        block_manager: Owner of the KV pages.
    """

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.block_manager = block_manager
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []  # admission order; preempt from the end
        self._groups: dict[str, SequenceGroup] = {}
        self._held: dict[str, list[Sequence]] = {}  # best_of > 1: waiting to fork from seqs[0]
        max_pages = -(-config.max_model_len // block_manager.page_size)
        if max_pages > block_manager.num_usable_pages:
            raise ValueError(f"a max_model_len={config.max_model_len} sequence needs {max_pages} "
                             f"pages; the KV cache has {block_manager.num_usable_pages}")

    # ---------------------------------------------------------------- queue
    def add(self, group: SequenceGroup) -> None:
        """Queues a request.

        Raises:
            ValueError: The prompt is longer than ``max_model_len`` or the
                request id is already queued.
        """
        if group.num_prompt_tokens > self.config.max_model_len:
            raise ValueError(f"prompt has {group.num_prompt_tokens} tokens, more than "
                             f"max_model_len={self.config.max_model_len}")
        if group.request_id in self._groups:
            raise ValueError(f"request id {group.request_id!r} is already running")
        self._groups[group.request_id] = group
        self.waiting.append(group.seqs[0])
        if len(group.seqs) > 1:
            self._held[group.request_id] = list(group.seqs[1:])

    def get_group(self, request_id: str) -> Optional[SequenceGroup]:
        """The group of an unfinished request (dropped once all its seqs finish)."""
        return self._groups.get(request_id)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self._held)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        """Sequences not running: queued, preempted or held for a fork."""
        return len(self.waiting) + sum(len(h) for h in self._held.values())

    # ----------------------------------------------------------- schedule
    def schedule(self) -> SchedulerOutput:
        """Picks this step's sequences and token counts; allocates their pages."""
        cfg, bm = self.config, self.block_manager
        budget = cfg.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        preempted: list[Sequence] = []
        finished = self._finish_overlong()

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.num_computed_tokens == seq.num_tokens:
                i += 1  # its last token is still on the device (async scheduling)
                continue
            num_new = self._num_new_tokens(seq, seq.num_computed_tokens, budget)
            if num_new == 0:
                i += 1  # prefill that does not fit whole (chunking off)
                continue
            while not bm.ensure_slots(seq, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                scheduled.append(ScheduledSeq(seq, num_new))
                budget -= num_new
                i += 1

        while (not preempted and self.waiting and budget > 0
               and len(self.running) < cfg.max_num_seqs):
            seq = self.waiting[0]
            num_new = self._admit(seq, budget)
            if num_new == 0:
                break  # first come first served: the head blocks the queue
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new

        return SchedulerOutput(scheduled, preempted, cfg.max_num_batched_tokens - budget, finished)

    def _num_new_tokens(self, seq: Sequence, computed: int, budget: int) -> int:
        """Tokens ``seq`` computes this step from position ``computed`` (0: none)."""
        remaining = seq.num_tokens - computed
        assert remaining > 0, f"{seq} has nothing to compute (missing sampled token?)"
        num_new = remaining
        if self.config.long_prefill_token_threshold is not None:
            num_new = min(num_new, self.config.long_prefill_token_threshold)
        if num_new > budget:
            if not self.config.enable_chunked_prefill:
                return 0
            num_new = budget
        return num_new

    def _admit(self, seq: Sequence, budget: int) -> int:
        """Gives a waiting sequence its pages; returns its token count (0: not now)."""
        bm = self.block_manager
        group = self._groups[seq.request_id]
        parent = group.seqs[0]
        if (seq is not parent and parent.status == SequenceStatus.RUNNING
                and parent.num_computed_tokens >= parent.num_prompt_tokens):
            shared = bm.fork(parent, seq)
            num_new = self._num_new_tokens(seq, shared, budget)
            if num_new and bm.ensure_slots(seq, num_new):
                return num_new
            bm.free(seq)
            return 0
        cached = bm.match_prefix(seq, group.use_prefix_cache)
        num_new = self._num_new_tokens(seq, cached, budget)
        if num_new == 0 or not bm.can_allocate(seq, num_new, group.use_prefix_cache):
            return 0
        bm.allocate(seq, group.use_prefix_cache)
        if not bm.ensure_slots(seq, num_new):  # can_allocate said it fits
            raise RuntimeError(f"ensure_slots failed after can_allocate for {seq}")
        return num_new

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)
        logger.info("preempted seq %d of request %s (%d tokens, recompute)",
                    seq.seq_id, seq.request_id, seq.num_tokens)

    def _finish_overlong(self) -> list[Sequence]:
        """Finishes sequences that cannot take another step within max_model_len."""
        over = [s for s in (*self.running, *self.waiting)
                if s.num_tokens > self.config.max_model_len]
        for seq in over:
            logger.warning("seq %d reached max_model_len unfinished; finishing it", seq.seq_id)
            self.finish(seq, FinishReason.LENGTH)
        return over

    # -------------------------------------------------------- postprocess
    def advance(self, out: SchedulerOutput) -> list[Sequence]:
        """Records that the step of ``out`` ran (or is running on the device).

        Advances ``num_computed_tokens``, registers newly full pages in the
        prefix cache and releases held ``best_of`` siblings whose shared prompt
        is now computed. The caller appends each sampler's token (or a
        ``PENDING_TOKEN`` to fill in later) before the next :meth:`schedule`.

        Returns:
            The running sequences whose chunk reached its end (a token is
            sampled), in schedule order.
        """
        samplers: list[Sequence] = []
        for item in out.scheduled:
            seq = item.seq
            if seq.status != SequenceStatus.RUNNING:
                continue  # aborted or finished during the step
            samples = item.samples
            seq.num_computed_tokens = item.end
            self.block_manager.register_computed(seq)
            if samples:
                samplers.append(seq)
            if seq.num_computed_tokens >= seq.num_prompt_tokens:
                self._release_held(seq.request_id)
        return samplers

    def postprocess(self, out: SchedulerOutput, sampled: dict[int, int]) -> list[Sequence]:
        """Records a finished step: :meth:`advance`, then appends the sampled tokens.

        Args:
            out: The output of the :meth:`schedule` call that ran.
            sampled: ``seq_id -> token id`` for every sequence whose chunk
                reached its end.

        Returns:
            The sequences that got a token, in schedule order.
        """
        newly = self.advance(out)
        for seq in newly:
            if seq.seq_id not in sampled:
                raise ValueError(f"no sampled token for {seq}")
            seq.append_token(sampled[seq.seq_id])
        return newly

    def _release_held(self, request_id: str) -> None:
        held = self._held.pop(request_id, None)
        if held:
            self.waiting.extendleft(reversed(held))

    # ------------------------------------------------------ finish, abort
    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Marks ``seq`` finished, frees its pages and drops it from the queues."""
        if seq.is_finished:
            return
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        else:
            held = self._held.get(seq.request_id, [])
            if seq in held:
                held.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        group = self._groups.get(seq.request_id)
        if group is not None:
            if seq is group.seqs[0]:
                self._release_held(seq.request_id)  # they prefill on their own
            if self._held.get(seq.request_id) == []:
                del self._held[seq.request_id]
            if group.is_finished:
                del self._groups[seq.request_id]

    def abort(self, request_id: str) -> list[Sequence]:
        """Finishes every unfinished sequence of a request with ``ABORT``.

        Returns:
            The sequences aborted (empty if the request is unknown or done).
        """
        group = self._groups.get(request_id)
        if group is None:
            return []
        self._held.pop(request_id, None)
        aborted = [s for s in group.seqs if not s.is_finished]
        for seq in aborted:
            self.finish(seq, FinishReason.ABORT)
        self._groups.pop(request_id, None)
        return aborted

    def flush_prefix_cache(self) -> bool:
        """Drops the prefix cache; refuses (False) while requests are unfinished."""
        if self.has_unfinished():
            return False
        return self.block_manager.flush_prefix_cache()
