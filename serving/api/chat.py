"""POST /v1/chat/completions: messages -> chat template -> one engine request.

The prompt is rendered with the tokenizer's Jinja chat template (or the one
given by ``--chat-template`` or the request's ``chat_template``) through
``tokenizer.apply_chat_template``. ``tools`` are handed to the template;
``tool_choice`` decides whether the output is constrained to a call and how
tool calls are parsed out of it (``tools.py``).
"""

from __future__ import annotations

import logging
from typing import Any

from serving.api.errors import APIError
from serving.api.generation import Generation
from serving.api.logprobs import TokenText, chat_logprobs
from serving.api.protocol import (ChatCompletionRequest, ChatCompletionResponse,
                                  ChatCompletionResponseChoice,
                                  ChatCompletionResponseStreamChoice,
                                  ChatCompletionStreamResponse, ChatMessage, ChatResponseMessage,
                                  DeltaMessage, UsageInfo)
from serving.api.sampling import build_sampling_params, resolve_max_tokens, truncate
from serving.api.streaming import DONE, sse, sse_response
from serving.api.tools import ToolPlan, ToolStream, finish_reason, parse_output, plan_tools

logger = logging.getLogger(__name__)

NO_TEMPLATE = (
    "As of transformers v4.44, default chat template is no longer allowed, so you must provide "
    "a chat template if the tokenizer does not define one. This model's tokenizer has none: "
    "start the server with --chat-template <file or template string>, or pass `chat_template` "
    "in the request.")
_RESERVED_KWARGS = {"conversation", "messages", "chat_template", "tokenize", "tools",
                    "documents", "add_generation_prompt", "continue_final_message"}


def message_dicts(messages: list[ChatMessage], param: str = "messages") -> list[dict[str, Any]]:
    """Flattens messages for the template; list content keeps only text parts.

    Raises:
        APIError: 400 for an empty list, an unsupported part type, or a part
            without text.
    """
    if not messages:
        raise APIError("messages must contain at least one message", 400, param)
    out = []
    for k, m in enumerate(messages):
        if not m.role:
            raise APIError(f"messages[{k}].role must not be empty", 400, param)
        d: dict[str, Any] = {"role": m.role}
        content = m.content
        if isinstance(content, list):
            texts = []
            for part in content:
                kind = part.get("type")
                if kind not in ("text", "input_text"):
                    raise APIError(f"messages[{k}]: content part type {kind!r} is not supported; "
                                   "this model accepts only text parts", 400, param)
                if not isinstance(part.get("text"), str):
                    raise APIError(f"messages[{k}]: a text part needs a string `text`", 400, param)
                texts.append(part["text"])
            content = "\n".join(texts)
        d["content"] = content if content is not None else ""
        for key in ("name", "tool_calls", "tool_call_id"):
            val = getattr(m, key)
            if val is not None:
                d[key] = val
        out.append(d)
    return out


def render_chat(state, messages: list[dict[str, Any]], *, add_generation_prompt: bool,
                continue_final_message: bool, chat_template: str | None,
                chat_template_kwargs: dict | None, tools=None, documents=None) -> str:
    """Renders the conversation to the prompt text.

    Raises:
        APIError: 400 without a template, for conflicting flags or when the
            template itself raises.
    """
    template = state.chat_template(chat_template)
    if not template:
        raise APIError(NO_TEMPLATE, 400, "messages")
    if continue_final_message and add_generation_prompt:
        raise APIError("Cannot set both `continue_final_message` and `add_generation_prompt` to "
                       "True.", 400, "continue_final_message")
    if continue_final_message and messages[-1]["role"] != "assistant":
        raise APIError("continue_final_message needs the last message to be the assistant's",
                       400, "continue_final_message")
    kwargs = {k: v for k, v in (chat_template_kwargs or {}).items() if k not in _RESERVED_KWARGS}
    try:
        return state.tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message, tools=tools, documents=documents,
            **kwargs)
    except APIError:
        raise
    except Exception as exc:  # jinja2 errors, template raise_exception(), bad kwargs
        raise APIError(f"Error rendering the chat template: {exc}", 400, "messages") from None


def _prompt_ids(state, req: ChatCompletionRequest) -> tuple[list[int], list[dict]]:
    msgs = message_dicts(req.messages)
    kwargs = dict(req.chat_template_kwargs or {})
    if req.enable_thinking is not None:
        kwargs.setdefault("enable_thinking", req.enable_thinking)
    text = render_chat(state, msgs, add_generation_prompt=req.add_generation_prompt,
                       continue_final_message=req.continue_final_message,
                       chat_template=req.chat_template, chat_template_kwargs=kwargs,
                       tools=req.tools, documents=req.documents)
    ids = state.tokenizer.encode(text, add_special_tokens=req.add_special_tokens)
    if not ids:
        raise APIError("the rendered prompt is empty", 400, "messages")
    return truncate(ids, req.truncate_prompt_tokens), msgs


async def create_chat_completion(state, req: ChatCompletionRequest, base_id: str):
    """Serves one chat completion request (streaming or not)."""
    model = state.check_model(req.model)
    plan = plan_tools(req)
    if req.bad_words:
        raise APIError("`bad_words` is not supported yet by this server.", 400, "bad_words")
    top = req.top_logprobs or 0
    if top and not req.logprobs:
        raise APIError("when using `top_logprobs`, `logprobs` must be set to true.", 400,
                       "top_logprobs")
    if not 0 <= top <= 20:
        raise APIError(f"top_logprobs must be in [0, 20], got {top}", 400, "top_logprobs")
    n = 1 if req.n is None else req.n
    if req.stream and req.best_of is not None and req.best_of != n:
        raise APIError("best_of must equal n when streaming", 400, "best_of")
    ids, msgs = _prompt_ids(state, req)
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    requested = req.max_completion_tokens if req.max_completion_tokens is not None \
        else req.max_tokens
    max_tokens = resolve_max_tokens(requested, len(ids), state.max_model_len, param=param,
                                    prompt_param="messages")
    params = build_sampling_params(req, max_tokens=max_tokens,
                                   logprobs=top if req.logprobs else None,
                                   max_n=state.config.max_n,
                                   vocab_size=int(state.engine.model_config.vocab_size),
                                   guide=plan.guide)
    state.check_ready()
    echo = ""
    role = state.config.response_role
    if req.echo and msgs and msgs[-1]["role"] == role and isinstance(msgs[-1]["content"], str):
        echo = msgs[-1]["content"]
    gen = Generation(state, base_id, [ids], [params])
    gen.submit()
    response_id = f"chatcmpl-{base_id}"
    text = TokenText(state.tokenizer, bool(req.return_tokens_as_token_ids))
    if req.stream:
        return sse_response(_stream(req, gen, model, response_id, role, echo, top, text, plan))
    return await _collect(req, gen, model, response_id, role, echo, top, text, plan)


def _message(role: str, echo: str, body: str, plan: ToolPlan, reason):
    """The response message and finish reason of one finished choice."""
    if not plan.active:
        return ChatResponseMessage(role=role, content=echo + body), reason
    content, calls = parse_output(plan, body)
    if echo:
        content = echo + (content or "")
    return (ChatResponseMessage(role=role, content=content,
                                tool_calls=[c.as_dict() for c in calls]),
            finish_reason(plan, reason, calls))


async def _collect(req, gen, model, response_id, role, echo, top, text,
                   plan: ToolPlan) -> ChatCompletionResponse:
    final = None
    async for _, out in gen.outputs():
        if out.finished:
            final = out
    if final is None or final.error:
        raise APIError(f"The engine failed on this request: {final.error if final else '?'}", 500)
    choices = []
    for o in sorted(final.outputs, key=lambda o: o.index):
        lp = None
        if req.logprobs:
            lp = chat_logprobs(o.token_ids, o.logprobs or [None] * len(o.token_ids), top, text)
        message, reason = _message(role, echo, o.text, plan, o.finish_reason)
        choices.append(ChatCompletionResponseChoice(
            index=o.index, message=message,
            logprobs=lp, finish_reason=reason, stop_reason=o.stop_reason,
            token_ids=list(o.token_ids) if req.return_token_ids else None))
    p = final.num_prompt_tokens
    c = sum(len(o.token_ids) for o in final.outputs)
    usage = UsageInfo(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)
    return ChatCompletionResponse(
        id=response_id, model=model, choices=choices, usage=usage,
        prompt_token_ids=list(final.prompt_token_ids) if req.return_token_ids else None)


async def _stream(req, gen, model, response_id, role, echo, top, text, plan: ToolPlan):
    n = 1 if req.n is None else req.n
    opts = req.stream_options
    include_usage = bool(opts and opts.include_usage)
    continuous = bool(include_usage and opts.continuous_usage_stats)
    num_prompt = len(gen.prompts[0])

    def chunk(choices, usage=None) -> ChatCompletionStreamResponse:
        c = ChatCompletionStreamResponse(id=response_id, model=model, choices=choices)
        if usage is not None:
            c.usage = usage
        return c

    for i in range(n):
        first = ChatCompletionResponseStreamChoice(
            index=i, delta=DeltaMessage(role=role, content=""), logprobs=None, finish_reason=None)
        yield sse(chunk([first], UsageInfo(prompt_tokens=num_prompt, completion_tokens=0,
                                           total_tokens=num_prompt) if continuous else None))
        if echo:
            yield sse(chunk([ChatCompletionResponseStreamChoice(
                index=i, delta=DeltaMessage(content=echo), logprobs=None, finish_reason=None)]))
    sent_text: dict[int, int] = {}
    sent_tokens: dict[int, int] = {}
    tool_streams = {i: ToolStream(plan) for i in range(n)} if plan.active else {}
    generated = 0
    async for _, out in gen.outputs():
        if out.error:
            raise APIError(f"The engine failed on this request: {out.error}", 500)
        generated = out.num_generated_tokens
        for o in out.outputs:
            t0, k0 = sent_text.get(o.index, 0), sent_tokens.get(o.index, 0)
            delta, new_ids = o.text[t0:], o.token_ids[k0:]
            if not delta and not new_ids and not o.finished:
                continue
            lp = None
            if req.logprobs:
                steps = (o.logprobs or [])[k0:k0 + len(new_ids)]
                steps += [None] * (len(new_ids) - len(steps))
                lp = chat_logprobs(new_ids, steps, top, text)
            deltas = [DeltaMessage(content=delta)]
            reason = o.finish_reason if o.finished else None
            if plan.active:  # tool calls: content and calls come from the ToolStream
                ts = tool_streams[o.index]
                deltas = [DeltaMessage(**d) for d in ts.feed(o.text, o.finished)]
                if not deltas and not o.finished:
                    continue  # held back (may be part of a call); tokens go with the next
                deltas = deltas or [DeltaMessage(content="")]
                reason = finish_reason(ts.plan, reason, ts.calls)
            sent_text[o.index], sent_tokens[o.index] = len(o.text), len(o.token_ids)
            for k, dm in enumerate(deltas):
                last = k == len(deltas) - 1
                choice = ChatCompletionResponseStreamChoice(
                    index=o.index, delta=dm, logprobs=lp if k == 0 else None,
                    finish_reason=reason if last else None)
                if o.finished and last:
                    choice.stop_reason = o.stop_reason
                usage = None
                if continuous:
                    usage = UsageInfo(prompt_tokens=num_prompt,
                                      completion_tokens=len(o.token_ids),
                                      total_tokens=num_prompt + len(o.token_ids))
                yield sse(chunk([choice], usage))
    if include_usage:
        yield sse(chunk([], UsageInfo(prompt_tokens=num_prompt, completion_tokens=generated,
                                      total_tokens=num_prompt + generated)))
    yield DONE
