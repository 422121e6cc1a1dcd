"""Request fields -> engine inputs: SamplingParams, prompt token ids, length checks.

Defaults and messages follow vLLM: unset ``top_k``/``min_p``/
``repetition_penalty`` disable those filters, an unset ``max_tokens`` in chat
means "up to the context length", and an over-long request gets vLLM's
"This model's maximum context length is ..." message with both lengths.
"""

from __future__ import annotations

from typing import Optional, Union

from serving.api.errors import APIError, not_supported
from serving.api.guides import guide_from_request
from serving.api.protocol import SamplingExtras
from serving.engine.types import GuideSpec, SamplingParams, ValidationError

MAX_STOP_STRINGS = 64


def reject_unsupported(req: SamplingExtras) -> None:
    """Raises a 400 for fields the server accepts in the schema but does not implement."""
    if req.use_beam_search:
        raise not_supported("use_beam_search")
    if req.logits_processors:
        raise not_supported("logits_processors")
    if req.priority != 0:
        raise APIError("`priority` other than 0 needs priority scheduling, which this server "
                       "does not use.", 400, "priority")
    if req.kv_transfer_params:
        raise not_supported("kv_transfer_params")


def build_sampling_params(
    req,
    *,
    max_tokens: Optional[int],
    logprobs: Optional[int],
    max_n: int,
    vocab_size: int,
    guide: Optional[GuideSpec] = None,
) -> SamplingParams:
    """Maps a completion or chat request onto SamplingParams.

    Args:
        req: a CompletionRequest or ChatCompletionRequest.
        max_tokens: the requested completion length (None: up to the context).
        logprobs: top alternatives per sampled token (None: no logprobs).
        max_n: the largest n/best_of allowed.
        vocab_size: the model's vocabulary size, to check token ids.
        guide: a constraint from elsewhere (chat ``tool_choice``); it excludes
            the request's own guided-decoding fields.

    Raises:
        APIError: 400 naming the parameter at fault.
    """
    reject_unsupported(req)
    n = 1 if req.n is None else req.n
    for name, val in (("n", n), ("best_of", req.best_of)):
        if val is not None and val > max_n:
            raise APIError(f"{name} must be at most {max_n}, got {val}", 400, name)
    stop = req.stop
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if len(stop) > MAX_STOP_STRINGS:
        raise APIError(f"stop accepts at most {MAX_STOP_STRINGS} strings", 400, "stop")
    logit_bias = {}
    for key, val in (req.logit_bias or {}).items():
        try:
            logit_bias[int(key)] = float(val)
        except (TypeError, ValueError):
            raise APIError(f"logit_bias keys must be token ids, got {key!r}", 400,
                           "logit_bias") from None
    min_tokens = max(req.min_tokens, req.min_new_tokens or 0)
    own_guide = guide_from_request(req)
    if guide is not None and own_guide is not None:
        raise APIError(f"`{own_guide.param}` cannot be combined with `{guide.param}`, which "
                       "already constrains the output.", 400, own_guide.param)
    try:
        params = SamplingParams(
            n=n,
            best_of=req.best_of,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=-1 if req.top_k is None else req.top_k,
            min_p=0.0 if req.min_p is None else req.min_p,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            frequency_penalty=req.frequency_penalty or 0.0,
            presence_penalty=req.presence_penalty or 0.0,
            seed=req.seed,
            max_tokens=max_tokens,
            min_tokens=min_tokens,
            stop=list(stop),
            stop_token_ids=list(req.stop_token_ids or []),
            ignore_eos=req.ignore_eos,
            include_stop_str_in_output=req.include_stop_str_in_output,
            logprobs=logprobs,
            prompt_logprobs=req.prompt_logprobs,
            logit_bias=logit_bias,
            allowed_token_ids=req.allowed_token_ids,
            skip_special_tokens=req.skip_special_tokens,
            spaces_between_special_tokens=req.spaces_between_special_tokens,
            guide=guide or own_guide,
        )
        params.validate_vocab(vocab_size)
    except ValidationError as exc:
        raise APIError(str(exc), 400, exc.param) from None
    except ValueError as exc:
        raise APIError(str(exc), 400) from None
    return params


def resolve_max_tokens(requested: Optional[int], num_prompt_tokens: int, max_model_len: int,
                       *, param: str = "max_tokens", prompt_param: str = "prompt") -> int:
    """Checks the request fits the context and returns the completion budget.

    Raises:
        APIError: 400 when the prompt alone, or prompt + max_tokens, exceeds
            max_model_len (both lengths in the message, as vLLM words it).
    """
    where = "messages" if prompt_param == "messages" else "prompt"
    if num_prompt_tokens >= max_model_len:
        raise APIError(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {num_prompt_tokens} tokens in the {where}, leaving no room for the "
            f"completion. Please reduce the length of the {where}.", 400, prompt_param)
    if requested is None:
        return max_model_len - num_prompt_tokens
    if requested < 1:
        raise APIError(f"{param} must be at least 1, got {requested}", 400, param)
    if num_prompt_tokens + requested > max_model_len:
        raise APIError(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {num_prompt_tokens + requested} tokens ({num_prompt_tokens} in the "
            f"{where}, {requested} in the completion). Please reduce the length of the "
            f"{where} or completion.", 400, param)
    return requested


def truncate(token_ids: list[int], truncate_prompt_tokens: Optional[int]) -> list[int]:
    """Keeps the last ``truncate_prompt_tokens`` tokens (vLLM's left truncation)."""
    if truncate_prompt_tokens is not None and len(token_ids) > truncate_prompt_tokens:
        return token_ids[-truncate_prompt_tokens:]
    return token_ids


def normalize_prompts(prompt: Union[str, list]) -> list[Union[str, list[int]]]:
    """Splits a completion ``prompt`` (str, [str], [int], [[int]]) into prompts.

    Raises:
        APIError: 400 for an empty prompt list or an empty token list.
    """
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError("prompt must not be empty", 400, "prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    out = list(prompt)
    for p in out:
        if isinstance(p, list) and not p:
            raise APIError("prompt token lists must not be empty", 400, "prompt")
    return out
