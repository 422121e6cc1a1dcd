"""The one request mapping: any dialect's fields -> the engine's request.

Every generating route (OpenAI completions and chat, SGLang and LMDeploy
``/generate``, RTP-LLM ``POST /``, SGLang ``/v1/score``) renames its body's
fields into :class:`SamplingFields` (vLLM's names) and calls
:func:`build_request`, which owns every check of a request before it reaches
the engine: prompt tokenization and token ids, truncation, the context length
(one wording, ``serving.engine.errors.context_length_message``), ``n`` and
``best_of``, stop strings, ``logit_bias``, ``bad_words``, guides, and the
construction of ``SamplingParams``. Dialect modules rename fields and shape
responses, nothing else.

Defaults follow vLLM: unset ``top_k``/``min_p``/``repetition_penalty``
disable those filters and an unset ``max_tokens`` means "up to the context".
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

from serving.api.errors import APIError, not_supported
from serving.engine.errors import ValidationError, context_length_message
from serving.engine.types import GuideSpec, SamplingParams

MAX_STOP_STRINGS = 64
PromptInput = Union[str, list[int]]


@dataclasses.dataclass
class SamplingFields:
    """A request's sampling fields in vLLM's names, whatever dialect sent them.

    ``None`` means "not given" (the engine's default). ``max_tokens_param`` is
    the dialect's name of the completion length (named in length errors);
    ``clamp_max_tokens`` caps ``max_tokens`` at the room the prompt leaves
    (RTP-LLM's ``max_new_tokens`` default of 8192) instead of refusing.
    """

    n: int = 1
    best_of: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    seed: Optional[int] = None
    max_tokens: Optional[int] = None
    min_tokens: int = 0
    stop: Union[str, list[str], None] = None
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None
    logit_bias: Optional[dict] = None
    allowed_token_ids: Optional[list[int]] = None
    bad_words: Optional[list[str]] = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    guide: Optional[GuideSpec] = None
    max_tokens_param: str = "max_tokens"
    clamp_max_tokens: bool = False


@dataclasses.dataclass
class EngineRequest:
    """What the engine receives for one HTTP request: one entry per prompt.

    Attributes:
        prompts: prompt token ids.
        texts: each prompt's text (as given, or decoded from its ids).
        params: each prompt's SamplingParams (their max_tokens may differ).
    """

    prompts: list[list[int]]
    texts: list[str]
    params: list[SamplingParams]


def build_request(state, prompts: list[PromptInput], fields: SamplingFields, *,
                  prompt_param: str = "prompt", where: str = "prompt",
                  add_special_tokens: bool = True,
                  truncate_prompt_tokens: Optional[int] = None) -> EngineRequest:
    """Tokenizes and checks the prompts and builds their SamplingParams.

    Args:
        state: the ServerState (tokenizer, context length, limits).
        prompts: texts or token-id lists.
        fields: the sampling fields.
        prompt_param: the request field holding the prompt (named in errors).
        where: what the prompt is called in length errors ("prompt", "messages").
        add_special_tokens: when tokenizing texts.
        truncate_prompt_tokens: keep only the last this many prompt tokens.

    Raises:
        APIError: 503 while the engine starts or sleeps (before any other
            check, as the engine itself would answer); 400 naming the
            parameter at fault.
    """
    state.check_ready()
    if not prompts:
        raise APIError(f"`{prompt_param}` must not be empty", 400, prompt_param)
    ids_list, texts = [], []
    for p in prompts:
        if isinstance(p, str):
            ids = state.tokenizer.encode(p, add_special_tokens=add_special_tokens)
        else:
            ids = check_token_ids(state, p, prompt_param)
        if not ids:
            raise APIError(f"`{prompt_param}` must not be empty", 400, prompt_param)
        if truncate_prompt_tokens is not None and len(ids) > truncate_prompt_tokens:
            ids = ids[-truncate_prompt_tokens:]  # vLLM's left truncation
        ids_list.append(list(ids))
        given = isinstance(p, str) and truncate_prompt_tokens is None
        texts.append(p if given else state.tokenizer.decode(ids))
    check_n(state, fields)
    bad_words = bad_words_ids(state.tokenizer, fields.bad_words)
    params = []
    for ids in ids_list:
        max_tokens = resolve_max_tokens(state.max_model_len, len(ids), fields, prompt_param, where)
        params.append(sampling_params(state, fields, max_tokens, bad_words))
    return EngineRequest(ids_list, texts, params)


def check_token_ids(state, ids: list[int], param: str) -> list[int]:
    """Token ids inside the vocabulary (400 naming ``param`` otherwise)."""
    vocab = state.vocab_size
    bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab]
    if bad:
        raise APIError(f"`{param}` holds out-of-vocab token ids {bad[:5]} (vocab size {vocab})",
                       400, param)
    return list(ids)


def check_n(state, fields: SamplingFields) -> None:
    for name, val in (("n", fields.n), ("best_of", fields.best_of)):
        if val is not None and val > state.config.max_n:
            raise APIError(f"{name} must be at most {state.config.max_n}, got {val}", 400, name)


def resolve_max_tokens(max_model_len: int, num_prompt: int, fields: SamplingFields,
                       prompt_param: str = "prompt", where: str = "prompt") -> int:
    """The completion budget of one prompt; 400 when the request does not fit."""
    param = fields.max_tokens_param
    if num_prompt >= max_model_len:
        raise APIError(context_length_message(max_model_len, num_prompt, None, where), 400,
                       prompt_param)
    requested = fields.max_tokens
    room = max_model_len - num_prompt
    if requested is None:
        return room
    if requested < 1:
        raise APIError(f"{param} must be at least 1, got {requested}", 400, param)
    if fields.clamp_max_tokens:
        return min(requested, room)
    if requested > room:
        raise APIError(context_length_message(max_model_len, num_prompt, requested, where), 400,
                       param)
    return requested


def bad_words_ids(tokenizer, words: Optional[list[str]]) -> list[list[int]]:
    """vLLM's ``bad_words`` as token-id sequences (``SamplingParams.update_from_tokenizer``).

    Each word is tokenized as ``word.lstrip()`` and, to ban it mid-text too,
    ``" " + word.lstrip()``; the spaced form is kept when its first id differs
    and it has as many tokens. The engine bans a sequence's last id wherever the
    tokens generated just before equal the rest (single tokens always).
    """
    out: list[list[int]] = []
    for word in dict.fromkeys(words or []):
        if not isinstance(word, str) or not word:
            raise APIError("bad_words cannot contain an empty string.", 400, "bad_words")
        plain = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        if not plain:
            raise APIError(f"bad_words: {word!r} has no tokens", 400, "bad_words")
        out.append(list(plain))
        if spaced and spaced[0] != plain[0] and len(spaced) == len(plain):
            out.append(list(spaced))
    return out


def sampling_params(state, f: SamplingFields, max_tokens: int,
                    bad_words: list[list[int]]) -> SamplingParams:
    """``SamplingParams`` of the fields (400 naming the field on a bad value)."""
    stop = [f.stop] if isinstance(f.stop, str) else list(f.stop or [])
    if len(stop) > MAX_STOP_STRINGS:
        raise APIError(f"stop accepts at most {MAX_STOP_STRINGS} strings", 400, "stop")
    logit_bias = {}
    for key, val in (f.logit_bias or {}).items():
        try:
            logit_bias[int(key)] = float(val)
        except (TypeError, ValueError):
            raise APIError(f"logit_bias keys must be token ids, got {key!r}", 400,
                           "logit_bias") from None
    try:
        params = SamplingParams(
            n=f.n, best_of=f.best_of,
            temperature=1.0 if f.temperature is None else f.temperature,
            top_p=1.0 if f.top_p is None else f.top_p,
            top_k=-1 if f.top_k in (None, 0) else f.top_k,
            min_p=0.0 if f.min_p is None else f.min_p,
            repetition_penalty=1.0 if f.repetition_penalty is None else f.repetition_penalty,
            frequency_penalty=f.frequency_penalty or 0.0,
            presence_penalty=f.presence_penalty or 0.0,
            seed=f.seed, max_tokens=max_tokens, min_tokens=f.min_tokens or 0, stop=stop,
            stop_token_ids=list(f.stop_token_ids or []), ignore_eos=f.ignore_eos,
            include_stop_str_in_output=f.include_stop_str_in_output,
            logprobs=f.logprobs, prompt_logprobs=f.prompt_logprobs, logit_bias=logit_bias,
            allowed_token_ids=f.allowed_token_ids, bad_words_ids=bad_words,
            skip_special_tokens=f.skip_special_tokens,
            spaces_between_special_tokens=f.spaces_between_special_tokens, guide=f.guide)
        params.validate_vocab(state.vocab_size)
    except ValidationError as exc:
        raise APIError(str(exc), 400, exc.param) from None
    except (TypeError, ValueError) as exc:
        raise APIError(str(exc), 400) from None
    return params


def reject_unsupported(req) -> None:
    """400 for vLLM fields the schema accepts but this server does not implement."""
    if req.use_beam_search:
        raise not_supported("use_beam_search")
    if req.logits_processors:
        raise not_supported("logits_processors")
    if req.priority != 0:
        raise APIError("`priority` other than 0 needs priority scheduling, which this server "
                       "does not use.", 400, "priority")
    if req.kv_transfer_params:
        raise not_supported("kv_transfer_params")


def openai_fields(req, *, max_tokens: Optional[int], logprobs: Optional[int],
                  guide: Optional[GuideSpec], max_tokens_param: str = "max_tokens"
                  ) -> SamplingFields:
    """The SamplingFields of an OpenAI completion or chat request (vLLM extras included)."""
    from serving.api.guides import guide_from_request

    reject_unsupported(req)
    own = guide_from_request(req)
    if guide is not None and own is not None:
        raise APIError(f"`{own.param}` cannot be combined with `{guide.param}`, which "
                       "already constrains the output.", 400, own.param)
    return SamplingFields(
        n=1 if req.n is None else req.n, best_of=req.best_of, temperature=req.temperature,
        top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
        repetition_penalty=req.repetition_penalty, frequency_penalty=req.frequency_penalty,
        presence_penalty=req.presence_penalty, seed=req.seed, max_tokens=max_tokens,
        min_tokens=max(req.min_tokens, req.min_new_tokens or 0), stop=req.stop,
        stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos,
        include_stop_str_in_output=req.include_stop_str_in_output, logprobs=logprobs,
        prompt_logprobs=req.prompt_logprobs, logit_bias=req.logit_bias,
        allowed_token_ids=req.allowed_token_ids, bad_words=getattr(req, "bad_words", None),
        skip_special_tokens=req.skip_special_tokens,
        spaces_between_special_tokens=req.spaces_between_special_tokens, guide=guide or own,
        max_tokens_param=max_tokens_param)
