"""Sequences and sequence groups: the host-side state of one request.

A request becomes a :class:`SequenceGroup` holding ``best_of`` sequences that
share the prompt. Each :class:`Sequence` carries its token ids (prompt plus
generated), how many of them have KV in the paged cache
(``num_computed_tokens``) and which pages hold that KV (``block_table``).

No jax import here: the scheduler and block manager run on the host.
"""

from __future__ import annotations

import enum
import itertools
import time
from typing import Optional

from serving.engine.types import FinishReason, SamplingParams

_seq_counter = itertools.count()


class SequenceStatus(enum.Enum):
    """Where a sequence is in its life."""

    WAITING = enum.auto()  # in the waiting queue (new, preempted) or held for a fork
    RUNNING = enum.auto()  # admitted: holds pages, scheduled every step
    FINISHED = enum.auto()  # done (stopped, length, aborted, error); holds no pages


class Sequence:
    """One completion of a request: prompt plus the tokens generated so far.

    Attributes:
        seq_id: Unique id from a process-wide counter.
        request_id: The request this sequence belongs to.
        index: Completion index within the request (0 .. best_of - 1).
        prompt_token_ids: The prompt.
        output_token_ids: Tokens sampled so far.
        params: The request's sampling parameters.
        arrival_time: When the request arrived (``time.monotonic()``).
        status: A :class:`SequenceStatus`.
        num_computed_tokens: Tokens whose KV is in the cache; the next step
            computes from this position on.
        block_table: Page ids holding this sequence's KV, in order.
        num_cached_tokens: Prompt tokens served by the prefix cache at the
            first admission.
        num_preemptions: How many times the sequence was preempted.
        finish_reason: Set once finished.
        page_hashes: Hash chain of the full pages of ``all_token_ids``; a cache
            the block manager fills lazily (tokens never change in place).
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 index: int = 0, arrival_time: Optional[float] = None):
        if not prompt_token_ids:
            raise ValueError("prompt must contain at least one token")
        self.seq_id: int = next(_seq_counter)
        self.request_id = request_id
        self.index = index
        self.prompt_token_ids: list[int] = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.params = params
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        self.num_cached_tokens = 0
        self.num_preemptions = 0
        self.finish_reason: Optional[FinishReason] = None
        self.page_hashes: list[bytes] = []
        self._all_token_ids: list[int] = list(prompt_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt followed by the outputs (do not mutate)."""
        return self._all_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self._all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def last_token_id(self) -> int:
        return self._all_token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        """Appends a sampled token; its KV is computed by the next step.

        With async scheduling the token may be ``pipeline.PENDING_TOKEN``, a
        placeholder for one still on the device (see ``serving.engine.pipeline``).
        """
        self.output_token_ids.append(token_id)
        self._all_token_ids.append(token_id)

    def set_last_token(self, token_id: int) -> None:
        """Overwrites the last token (a pending placeholder becomes the sampled id)."""
        self.output_token_ids[-1] = token_id
        self._all_token_ids[-1] = token_id

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, req={self.request_id!r}, idx={self.index}, "
                f"status={self.status.name}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, pages={len(self.block_table)})")


class SequenceGroup:
    """The sequences of one request: ``best_of`` completions of one prompt.

    Attributes:
        request_id: The request id.
        seqs: ``params.best_of`` sequences; ``seqs[0]`` is prefilled first and
            the others fork from it once its prompt is computed.
        arrival_time: When the request arrived.
        use_prefix_cache: False when prompt logprobs are requested: tokens
            served from the cache get no logits.
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 arrival_time: Optional[float] = None):
        self.request_id = request_id
        self.params = params
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        num_seqs = params.best_of or params.n
        self.seqs: list[Sequence] = [
            Sequence(request_id, prompt_token_ids, params, index=i, arrival_time=self.arrival_time)
            for i in range(num_seqs)]
        self.use_prefix_cache: bool = params.prompt_logprobs is None

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.seqs[0].prompt_token_ids

    @property
    def num_prompt_tokens(self) -> int:
        return self.seqs[0].num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)

    def __repr__(self) -> str:
        return f"SequenceGroup(req={self.request_id!r}, seqs={self.seqs})"
