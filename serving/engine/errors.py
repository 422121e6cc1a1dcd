"""The engine's error types: what an engine raises, and what the HTTP layer maps.

No imports: ``types``, ``guided``, the engines and the API all use these.
``serving.api.errors.from_engine_error`` turns each into one HTTP status, the
same on every route family.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base of every error an engine raises on purpose."""


class ValidationError(EngineError, ValueError):
    """A bad request parameter (HTTP 400); ``param`` names it."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


class EngineOverloadedError(EngineError, RuntimeError):
    """Too many waiting requests (HTTP 503 with ``Retry-After``)."""


class EngineNotReadyError(EngineError, RuntimeError):
    """The engine is starting, sleeping or shut down (HTTP 503)."""


class UnsupportedOperationError(EngineError, RuntimeError):
    """The loaded engine cannot do this (e.g. text generation on a pooling
    model, tensor updates of int8 weights): HTTP 400."""


class RequestFailedError(EngineError, RuntimeError):
    """A request failed inside the engine (a device error, a guide matcher
    or detokenizer that raised, NaN logits): HTTP 500, that request only."""


def context_length_message(max_model_len: int, num_prompt_tokens: int,
                           max_tokens: int | None, where: str = "prompt") -> str:
    """The one wording of a request that does not fit the context (vLLM's).

    Args:
        max_model_len: the context length.
        num_prompt_tokens: the prompt's length.
        max_tokens: the completion length asked for (None: the prompt alone
            leaves no room).
        where: what the prompt is called in the request ("prompt", "messages").
    """
    if max_tokens is None:
        return (f"This model's maximum context length is {max_model_len} tokens. However, you "
                f"requested {num_prompt_tokens} tokens in the {where}, leaving no room for the "
                f"completion. Please reduce the length of the {where}.")
    return (f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the "
            f"{where}, {max_tokens} in the completion). Please reduce the length of the "
            f"{where} or completion.")
