"""Request-level types shared by the scheduler, the engine and the HTTP layer.

No jax import here: the scheduler and the server read these on the host. The
error types live in ``serving.engine.errors``; ``GuideSpec`` (a request's
structured-output constraint) lives with its compiler in ``serving.engine.guided``.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Optional

from serving.engine.errors import ValidationError
from serving.engine.guided import GuideSpec, check_guide


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or max_model_len reached
    ABORT = "abort"  # aborted by the client or the server
    ERROR = "error"  # failed inside the engine; only this request ends


@dataclasses.dataclass
class SamplingParams:
    """Per-request sampling settings, named as vLLM names them.

    ``__post_init__`` validates every field and raises ``ValidationError`` (a
    ``ValueError``) naming the parameter in ``param`` (the server answers 400).
    """

    n: int = 1
    best_of: Optional[int] = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 (or 0) disables
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: Optional[int] = None
    max_tokens: Optional[int] = 16  # None: up to max_model_len
    min_tokens: int = 0
    stop: list[str] = dataclasses.field(default_factory=list)
    stop_token_ids: list[int] = dataclasses.field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: Optional[int] = None  # number of top alternatives per sampled token
    prompt_logprobs: Optional[int] = None
    logit_bias: dict[int, float] = dataclasses.field(default_factory=dict)
    allowed_token_ids: Optional[list[int]] = None
    # vLLM's bad_words as token-id sequences: the last id of each is banned
    # wherever the ones before it were just generated (serving.api.request_mapping)
    bad_words_ids: list[list[int]] = dataclasses.field(default_factory=list)
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    guide: Optional[GuideSpec] = None  # structured output (guided decoding)

    MAX_LOGPROBS = 20
    MAX_LOGIT_BIAS = 300  # entries (OpenAI's cap; the sampler's table is 320 wide)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.best_of is None:
            self.best_of = self.n
        _check(self.n >= 1, "n", f"n must be at least 1, got {self.n}")
        _check(self.best_of >= self.n, "best_of",
               f"best_of must be greater than or equal to n, got n={self.n} and best_of={self.best_of}")
        _check(self.temperature >= 0.0, "temperature",
               f"temperature must be non-negative, got {self.temperature}")
        _check(0.0 < self.top_p <= 1.0, "top_p", f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0:
            self.top_k = -1
        _check(self.top_k == -1 or self.top_k >= 1, "top_k",
               f"top_k must be -1 (disable), or at least 1, got {self.top_k}")
        _check(0.0 <= self.min_p <= 1.0, "min_p", f"min_p must be in [0, 1], got {self.min_p}")
        _check(0.0 < self.repetition_penalty <= 2.0 or self.repetition_penalty == 1.0,
               "repetition_penalty",
               f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}")
        _check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty",
               f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        _check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty",
               f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        _check(self.max_tokens is None or self.max_tokens >= 1, "max_tokens",
               f"max_tokens must be at least 1, got {self.max_tokens}")
        _check(self.min_tokens >= 0, "min_tokens",
               f"min_tokens must be greater than or equal to 0, got {self.min_tokens}")
        _check(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
               f"min_tokens must be less than or equal to max_tokens={self.max_tokens}, got {self.min_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            val = getattr(self, name)
            _check(val is None or 0 <= val <= self.MAX_LOGPROBS, name,
                   f"{name} must be in [0, {self.MAX_LOGPROBS}], got {val}")
        _check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
               "stop_token_ids", "stop_token_ids must be non-negative integers")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop",
               "stop must be non-empty strings")
        self.logit_bias = {int(k): float(v) for k, v in (self.logit_bias or {}).items()}
        _check(len(self.logit_bias) <= self.MAX_LOGIT_BIAS, "logit_bias",
               f"logit_bias may have at most {self.MAX_LOGIT_BIAS} entries, got "
               f"{len(self.logit_bias)}")
        for tok, bias in self.logit_bias.items():
            _check(-100.0 <= bias <= 100.0, "logit_bias",
                   f"logit_bias values must be in [-100, 100], got {bias} for token {tok}")
        if self.allowed_token_ids is not None:
            _check(len(self.allowed_token_ids) > 0, "allowed_token_ids",
                   "allowed_token_ids must not be empty")
        if self.guide is not None:
            check_guide(self.guide)  # imports llguidance on first use

    def needs_sync(self) -> bool:
        """Whether each step's sampling needs the previous step's token on the host.

        True for guided decoding (the token mask of step N+1 comes from the
        grammar state after step N's token) and for penalties (they count the
        generated tokens), so an overlapped (async) scheduler must not build
        step N+1 before step N's tokens are back.
        """
        return (self.guide is not None or self.repetition_penalty != 1.0
                or any(len(w) > 1 for w in self.bad_words_ids)
                or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0)

    def bad_word_bans(self, output_token_ids: list[int]) -> list[int]:
        """The ids ``bad_words_ids`` ban at the next position (vLLM's rule): a
        word's last id wherever the generated tokens end with the rest of it."""
        bans = []
        for word in self.bad_words_ids:
            head = word[:-1]
            if not head or (len(output_token_ids) >= len(head)
                            and list(output_token_ids[len(output_token_ids) - len(head):]) == head):
                bans.append(word[-1])
        return bans

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def validate_vocab(self, vocab_size: int) -> None:
        """Checks token ids against the model's vocabulary (raises ValidationError)."""
        for name, ids in (("logit_bias", self.logit_bias.keys()),
                          ("allowed_token_ids", self.allowed_token_ids or []),
                          ("bad_words", [t for w in self.bad_words_ids for t in w]),
                          ("stop_token_ids", self.stop_token_ids)):
            bad = [t for t in ids if not 0 <= int(t) < vocab_size]
            _check(not bad, name, f"{name} contains out-of-vocab token ids {bad[:5]} "
                                  f"(vocab size {vocab_size})")


def _check(cond: bool, param: str, message: str) -> None:
    if not cond:
        raise ValidationError(param, message)


@dataclasses.dataclass
class Logprob:
    """Log-probability of one token, with its rank and decoded text."""

    logprob: float
    rank: Optional[int] = None
    decoded_token: Optional[str] = None


# One entry per position: token id -> Logprob (the chosen token plus top-k).
PositionLogprobs = dict[int, Logprob]


@dataclasses.dataclass
class CompletionOutput:
    """One of the ``n`` completions of a request, cumulative so far."""

    index: int
    text: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: Optional[list[PositionLogprobs]] = None
    cumulative_logprob: float = 0.0
    finish_reason: Optional[str] = None  # FinishReason value once finished
    stop_reason: int | str | None = None  # the stop token id or stop string hit

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: Optional[float] = None
    first_token_time: Optional[float] = None
    last_token_time: Optional[float] = None
    finished_time: Optional[float] = None
    num_cached_tokens: int = 0


@dataclasses.dataclass
class RequestOutput:
    """What the engine streams for a request: a snapshot after each step.

    ``outputs`` holds cumulative state of each completion; the HTTP layer
    computes deltas. The final snapshot has ``finished=True``; with
    ``best_of > n`` only the final snapshot carries the ``n`` best completions.
    """

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    prompt_logprobs: Optional[list[Optional[PositionLogprobs]]] = None
    metrics: Optional[RequestMetrics] = None
    error: Optional[str] = None  # set when finish_reason is "error"

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_generated_tokens(self) -> int:
        return sum(len(o.token_ids) for o in self.outputs)
