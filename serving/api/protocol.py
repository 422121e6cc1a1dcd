"""Request and response types of the OpenAI-compatible API (pydantic v2).

Field names and defaults follow vLLM's ``protocol.py`` so that clients written
for vLLM (including its "extra parameters", passed through ``extra_body``) work
unchanged. Requests allow unknown fields (vLLM logs and ignores them); the
routes reject the fields the server does not implement with a clear 400.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

_LONG_MIN, _LONG_MAX = -(2**63), 2**63 - 1


def random_uuid() -> str:
    return uuid.uuid4().hex


class OpenAIModel(BaseModel):
    """Base of every request and response: unknown fields are kept, not refused."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())


# --------------------------------------------------------------------- errors
class ErrorInfo(OpenAIModel):
    message: str
    type: str
    param: Optional[str] = None
    code: int


class ErrorResponse(OpenAIModel):
    error: ErrorInfo


# --------------------------------------------------------------------- models
class ModelPermission(OpenAIModel):
    id: str = Field(default_factory=lambda: f"modelperm-{random_uuid()}")
    object: str = "model_permission"
    created: int = Field(default_factory=lambda: int(time.time()))
    allow_create_engine: bool = False
    allow_sampling: bool = True
    allow_logprobs: bool = True
    allow_search_indices: bool = False
    allow_view: bool = True
    allow_fine_tuning: bool = False
    organization: str = "*"
    group: Optional[str] = None
    is_blocking: bool = False


class ModelCard(OpenAIModel):
    id: str
    object: str = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "jax-serve"
    root: Optional[str] = None
    parent: Optional[str] = None
    max_model_len: Optional[int] = None
    permission: list[ModelPermission] = Field(default_factory=list)


class ModelList(OpenAIModel):
    object: str = "list"
    data: list[ModelCard] = Field(default_factory=list)


# ---------------------------------------------------------------- shared bits
class StreamOptions(OpenAIModel):
    include_usage: Optional[bool] = True
    continuous_usage_stats: Optional[bool] = False


class ResponseFormat(OpenAIModel):
    type: str = "text"
    json_schema: Optional[dict[str, Any]] = None


class PromptTokenUsageInfo(OpenAIModel):
    cached_tokens: Optional[int] = None


class UsageInfo(OpenAIModel):
    prompt_tokens: int = 0
    total_tokens: int = 0
    completion_tokens: Optional[int] = 0
    prompt_tokens_details: Optional[PromptTokenUsageInfo] = None


class SamplingExtras(OpenAIModel):
    """vLLM's extra sampling parameters shared by completions and chat."""

    use_beam_search: bool = False
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    length_penalty: float = 1.0
    stop_token_ids: Optional[list[int]] = Field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    truncate_prompt_tokens: Optional[int] = Field(default=None, ge=1)
    allowed_token_ids: Optional[list[int]] = None
    bad_words: list[str] = Field(default_factory=list)
    prompt_logprobs: Optional[int] = None
    # guided decoding (serving/api/guides.py)
    response_format: Optional[ResponseFormat] = None
    guided_json: Optional[Union[str, dict[str, Any]]] = None
    guided_regex: Optional[str] = None
    guided_choice: Optional[list[str]] = None
    guided_grammar: Optional[str] = None
    guided_decoding_backend: Optional[str] = None
    guided_whitespace_pattern: Optional[str] = None
    priority: int = 0
    logits_processors: Optional[list[Any]] = None
    return_tokens_as_token_ids: Optional[bool] = None
    kv_transfer_params: Optional[dict[str, Any]] = None
    vllm_xargs: Optional[dict[str, Union[str, int, float]]] = None
    # LMDeploy extras
    session_id: Optional[int] = None
    return_token_ids: Optional[bool] = None
    min_new_tokens: Optional[int] = None


# ---------------------------------------------------------------- completions
class CompletionRequest(SamplingExtras):
    """POST /v1/completions (OpenAI fields, then vLLM and LMDeploy extras)."""

    model: Optional[str] = None
    prompt: Union[list[int], list[list[int]], str, list[str]]
    best_of: Optional[int] = None
    echo: Optional[bool] = False
    frequency_penalty: Optional[float] = 0.0
    logit_bias: Optional[dict[str, float]] = None
    logprobs: Optional[int] = None
    max_tokens: Optional[int] = 16
    n: int = 1
    presence_penalty: Optional[float] = 0.0
    seed: Optional[int] = Field(default=None, ge=_LONG_MIN, le=_LONG_MAX)
    stop: Optional[Union[str, list[str]]] = Field(default_factory=list)
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    suffix: Optional[str] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    user: Optional[str] = None
    add_special_tokens: bool = True


class CompletionLogProbs(OpenAIModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[Optional[float]] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[Optional[dict[str, float]]] = Field(default_factory=list)


class CompletionResponseChoice(OpenAIModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogProbs] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[int, str]] = None
    prompt_logprobs: Optional[list[Optional[dict[int, Any]]]] = None


class CompletionResponse(OpenAIModel):
    id: str
    object: str = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionResponseChoice]
    usage: UsageInfo


class CompletionResponseStreamChoice(OpenAIModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogProbs] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[int, str]] = None


class CompletionStreamResponse(OpenAIModel):
    id: str
    object: str = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionResponseStreamChoice]
    usage: Optional[UsageInfo] = None


# ----------------------------------------------------------------------- chat
class ChatMessage(OpenAIModel):
    """One input message; ``content`` is a string or a list of parts."""

    role: str
    content: Optional[Union[str, list[dict[str, Any]]]] = None
    name: Optional[str] = None
    tool_calls: Optional[list[dict[str, Any]]] = None
    tool_call_id: Optional[str] = None


class ChatCompletionRequest(SamplingExtras):
    """POST /v1/chat/completions (OpenAI fields, then vLLM and LMDeploy extras).

    ``tools`` are passed to the chat template; ``tool_choice`` "required" or a
    named function constrains the output to a call, "auto" parses calls out of
    free text (``serving/api/tools.py``).
    """

    messages: Union[str, list[ChatMessage]]  # a string: one user message (LMDeploy)
    model: Optional[str] = None
    frequency_penalty: Optional[float] = 0.0
    logit_bias: Optional[dict[str, float]] = None
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = 0
    max_tokens: Optional[int] = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: Optional[int] = None
    n: Optional[int] = 1
    presence_penalty: Optional[float] = 0.0
    seed: Optional[int] = Field(default=None, ge=_LONG_MIN, le=_LONG_MAX)
    stop: Optional[Union[str, list[str]]] = Field(default_factory=list)
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Optional[Union[str, dict[str, Any]]] = "none"
    parallel_tool_calls: Optional[bool] = False
    user: Optional[str] = None
    best_of: Optional[int] = None
    echo: bool = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    documents: Optional[list[dict[str, str]]] = None
    chat_template: Optional[str] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None
    request_id: Optional[str] = None
    # LMDeploy extras
    do_preprocess: Optional[bool] = None
    enable_thinking: Optional[bool] = None
    reasoning_effort: Optional[str] = None


class TopLogprob(OpenAIModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class ChatCompletionLogProb(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatCompletionLogProbs(OpenAIModel):
    content: Optional[list[ChatCompletionLogProb]] = None


class ChatResponseMessage(OpenAIModel):
    role: str
    content: Optional[str] = None
    reasoning_content: Optional[str] = None
    tool_calls: list[dict[str, Any]] = Field(default_factory=list)


class ChatCompletionResponseChoice(OpenAIModel):
    index: int
    message: ChatResponseMessage
    logprobs: Optional[ChatCompletionLogProbs] = None
    finish_reason: Optional[str] = "stop"
    stop_reason: Optional[Union[int, str]] = None
    token_ids: Optional[list[int]] = None


class ChatCompletionResponse(OpenAIModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionResponseChoice]
    usage: UsageInfo
    prompt_logprobs: Optional[list[Optional[dict[int, Any]]]] = None
    prompt_token_ids: Optional[list[int]] = None


class DeltaMessage(OpenAIModel):
    role: Optional[str] = None
    content: Optional[str] = None
    tool_calls: Optional[list[dict[str, Any]]] = None  # [{index, id?, type?, function{...}}]


class ChatCompletionResponseStreamChoice(OpenAIModel):
    index: int
    delta: DeltaMessage
    logprobs: Optional[ChatCompletionLogProbs] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[int, str]] = None


class ChatCompletionStreamResponse(OpenAIModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionResponseStreamChoice]
    usage: Optional[UsageInfo] = None


# ------------------------------------------------------------------ tokenizer
class TokenizeRequest(OpenAIModel):
    """POST /tokenize: either ``prompt`` (completion form) or ``messages`` (chat form)."""

    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = None
    add_special_tokens: Optional[bool] = None  # default True for prompt, False for messages
    return_token_strs: Optional[bool] = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: Optional[str] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None
    tools: Optional[list[dict[str, Any]]] = None


class TokenizeResponse(OpenAIModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: Optional[list[str]] = None


class DetokenizeRequest(OpenAIModel):
    model: Optional[str] = None
    tokens: list[int]
    skip_special_tokens: bool = False  # vLLM's /detokenize keeps special tokens


class DetokenizeResponse(OpenAIModel):
    """vLLM names the decoded text ``prompt``, SGLang ``text``: both are sent."""

    prompt: str
    text: str


class VersionResponse(OpenAIModel):
    version: str
