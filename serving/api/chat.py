"""POST /v1/chat/completions in the OpenAI shape: messages -> template -> one engine request.

The prompt is rendered with the tokenizer's Jinja chat template (or the one
given by ``--chat-template`` or the request's ``chat_template``) through
``tokenizer.apply_chat_template``. ``tools`` are handed to the template;
``tool_choice`` decides whether the output is constrained to a call and how
tool calls are parsed out of it (``tools.py``). ``messages`` may also be a
plain string: LMDeploy then uses it as the raw prompt, without the template.
Roles are OpenAI's (an unknown one is a 400). ``return_token_ids`` adds vLLM's
``prompt_token_ids`` and ``token_ids`` and LMDeploy's ``output_ids``.
"""

from __future__ import annotations

import logging
from typing import Any, Union

from serving.api.errors import APIError
from serving.api.generation import Deltas, Generation
from serving.api.logprobs import TokenText, chat_logprobs
from serving.api.protocol import (ChatCompletionRequest, ChatCompletionResponse,
                                  ChatCompletionResponseChoice,
                                  ChatCompletionResponseStreamChoice,
                                  ChatCompletionStreamResponse, ChatResponseMessage,
                                  DeltaMessage, UsageInfo)
from serving.api.request_mapping import build_request, openai_fields
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
# the roles vLLM's ChatCompletionMessageParam accepts
ROLES = ("system", "developer", "user", "assistant", "tool", "function")


def message_dicts(messages: Union[str, list], param: str = "messages") -> list[dict[str, Any]]:
    """Flattens messages for the template; list content keeps only text parts.

    Args:
        messages: ChatMessage models or dicts (a plain string, as the tokenizer
            routes take it, is one user message).

    Raises:
        APIError: 400 for an empty list, an unknown role, an unsupported part
            type, or a part without text.
    """
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if not messages:
        raise APIError("messages must contain at least one message", 400, param)
    out = []
    for k, m in enumerate(messages):
        m = m if isinstance(m, dict) else m.model_dump(exclude_none=True)
        role = m.get("role")
        if role not in ROLES:
            raise APIError(f"messages[{k}].role must be one of {', '.join(ROLES)}; got "
                           f"{role!r}", 400, param)
        d: dict[str, Any] = {"role": role}
        content = m.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind not in ("text", "input_text"):
                    raise APIError(f"messages[{k}]: content part type {kind!r} is not supported; "
                                   "this model accepts only text parts", 400, param)
                if not isinstance(part.get("text"), str):
                    raise APIError(f"messages[{k}]: a text part needs a string `text`", 400, param)
                texts.append(part["text"])
            content = "\n".join(texts)
        elif content is not None and not isinstance(content, str):
            raise APIError(f"messages[{k}].content must be a string or a list of parts", 400,
                           param)
        d["content"] = content if content is not None else ""
        for key in ("name", "tool_calls", "tool_call_id"):
            if m.get(key) is not None:
                d[key] = m[key]
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
    if isinstance(req.messages, str):  # LMDeploy: the raw prompt, no chat template
        if not req.messages:
            raise APIError("messages must not be empty", 400, "messages")
        return state.tokenizer.encode(req.messages), []
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
    return ids, msgs


async def create_chat_completion(state, req: ChatCompletionRequest, base_id: str):
    """Serves one chat completion: a ChatCompletionResponse or an SSE response."""
    model = state.check_model(req.model)
    plan = plan_tools(req)
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
    fields = openai_fields(req, max_tokens=requested, logprobs=top if req.logprobs else None,
                           guide=plan.guide, max_tokens_param=param)
    er = build_request(state, [ids], fields, prompt_param="messages", where="messages",
                       truncate_prompt_tokens=req.truncate_prompt_tokens)
    role = state.config.response_role
    echo = ""
    if req.echo and msgs and msgs[-1]["role"] == role and isinstance(msgs[-1]["content"], str):
        echo = msgs[-1]["content"]
    gen = Generation(state, base_id, er.prompts, er.params, session_id=req.session_id).submit()
    view = _View(req, model, f"chatcmpl-{base_id}", role, echo, top,
                 TokenText(state.tokenizer, bool(req.return_tokens_as_token_ids)), plan)
    if req.stream:
        return sse_response(view.stream(gen))
    return view.response((await gen.finals())[0])


class _View:
    """Shapes one chat request's engine outputs as chat completion objects."""

    def __init__(self, req, model, response_id, role, echo, top, text, plan: ToolPlan):
        self.req, self.model, self.id, self.role, self.echo = req, model, response_id, role, echo
        self.top, self.text, self.plan = top, text, plan

    def _message(self, body: str, reason):
        """The response message and finish reason of one finished choice."""
        if not self.plan.active:
            return ChatResponseMessage(role=self.role, content=self.echo + body), reason
        content, calls = parse_output(self.plan, body)
        if self.echo:
            content = self.echo + (content or "")
        return (ChatResponseMessage(role=self.role, content=content,
                                    tool_calls=[c.as_dict() for c in calls]),
                finish_reason(self.plan, reason, calls))

    def response(self, final) -> ChatCompletionResponse:
        req, choices = self.req, []
        for o in sorted(final.outputs, key=lambda o: o.index):
            lp = None
            if req.logprobs:
                lp = chat_logprobs(o.token_ids, o.logprobs or [None] * len(o.token_ids),
                                   self.top, self.text)
            message, reason = self._message(o.text, o.finish_reason)
            choices.append(ChatCompletionResponseChoice(
                index=o.index, message=message, logprobs=lp, finish_reason=reason,
                stop_reason=o.stop_reason,
                token_ids=list(o.token_ids) if req.return_token_ids else None))
            if req.return_token_ids:
                choices[-1].output_ids = list(o.token_ids)  # LMDeploy's key
        p = final.num_prompt_tokens
        c = sum(len(o.token_ids) for o in final.outputs)
        return ChatCompletionResponse(
            id=self.id, model=self.model, choices=choices, usage=_usage(p, c),
            prompt_token_ids=list(final.prompt_token_ids) if req.return_token_ids else None)

    def _chunk(self, choices, usage=None) -> ChatCompletionStreamResponse:
        c = ChatCompletionStreamResponse(id=self.id, model=self.model, choices=choices)
        if usage is not None:
            c.usage = usage
        return c

    async def stream(self, gen: Generation):
        req = self.req
        n = 1 if req.n is None else req.n
        opts = req.stream_options
        include_usage = bool(opts and opts.include_usage)
        continuous = bool(include_usage and opts.continuous_usage_stats)
        num_prompt = len(gen.prompts[0])
        for i in range(n):
            first = ChatCompletionResponseStreamChoice(
                index=i, delta=DeltaMessage(role=self.role, content=""), logprobs=None,
                finish_reason=None)
            head = self._chunk([first], _usage(num_prompt, 0) if continuous else None)
            if req.return_token_ids:
                head.prompt_token_ids = list(gen.prompts[0])
            yield sse(head)
            if self.echo:
                yield sse(self._chunk([ChatCompletionResponseStreamChoice(
                    index=i, delta=DeltaMessage(content=self.echo), logprobs=None,
                    finish_reason=None)]))
        deltas = Deltas()
        tool_streams = {i: ToolStream(self.plan) for i in range(n)} if self.plan.active else {}
        generated = 0
        async for _, out in gen.checked_outputs():
            generated = out.num_generated_tokens
            for o in out.outputs:
                d = deltas.peek(0, o)
                if d is None:
                    continue
                dms = [DeltaMessage(content=d.text)]
                reason = o.finish_reason if d.finished else None
                if self.plan.active:  # tool calls: content and calls come from the ToolStream
                    ts = tool_streams[o.index]
                    dms = [DeltaMessage(**x) for x in ts.feed(o.text, d.finished)]
                    if not dms and not d.finished:
                        continue  # held back (may be part of a call); tokens go with the next
                    dms = dms or [DeltaMessage(content="")]
                    reason = finish_reason(ts.plan, reason, ts.calls)
                deltas.commit(0, o)
                lp = chat_logprobs(d.token_ids, d.logprobs, self.top, self.text) \
                    if req.logprobs else None
                for k, dm in enumerate(dms):
                    last = k == len(dms) - 1
                    choice = ChatCompletionResponseStreamChoice(
                        index=o.index, delta=dm, logprobs=lp if k == 0 else None,
                        finish_reason=reason if last else None)
                    if req.return_token_ids and k == 0:
                        choice.token_ids = choice.output_ids = d.token_ids
                    if d.finished and last:
                        choice.stop_reason = o.stop_reason
                    usage = _usage(num_prompt, len(o.token_ids)) if continuous else None
                    yield sse(self._chunk([choice], usage))
        if include_usage:
            yield sse(self._chunk([], _usage(num_prompt, generated)))
        yield DONE


def _usage(prompt_tokens: int, completion_tokens: int) -> UsageInfo:
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens)
