"""POST /v1/completions in the OpenAI shape: fields -> engine request -> choices.

Each prompt of a batch (``prompt`` as str, [str], [int] or [[int]]) is one
engine request carrying ``n`` completions; choice ``i`` of prompt ``p`` is
reported at index ``p * n + i``, as vLLM does. LMDeploy's ``session_id``
makes the stream stoppable by ``/abort_request {"session_id"}``;
``return_token_ids`` adds the prompt's and each choice's token ids (per chunk
when streaming, the prompt's in the first chunk of each choice).
"""

from __future__ import annotations

from typing import Optional, Union

from serving.api.errors import APIError
from serving.api.generation import Deltas, Generation
from serving.api.logprobs import TokenText, completion_logprobs
from serving.api.protocol import (CompletionRequest, CompletionResponse,
                                  CompletionResponseChoice, CompletionResponseStreamChoice,
                                  CompletionStreamResponse, UsageInfo)
from serving.api.request_mapping import build_request, openai_fields
from serving.api.streaming import DONE, sse, sse_response


def prompt_inputs(prompt: Union[str, list]) -> list[Union[str, list[int]]]:
    """Splits a completion ``prompt`` (str, [str], [int], [[int]]) into prompts."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return list(prompt)


async def create_completion(state, req: CompletionRequest, base_id: str):
    """Serves one completion request: a CompletionResponse or an SSE response."""
    model = state.check_model(req.model)
    if req.suffix is not None:
        raise APIError("suffix is not currently supported", 400, "suffix")
    if req.stream and req.best_of is not None and req.best_of != (req.n or 1):
        raise APIError("best_of must equal n when streaming", 400, "best_of")
    fields = openai_fields(req, max_tokens=req.max_tokens, logprobs=req.logprobs, guide=None)
    if req.echo and req.logprobs is not None:
        fields.prompt_logprobs = max(fields.prompt_logprobs or 0, req.logprobs)
    er = build_request(state, prompt_inputs(req.prompt), fields,
                       add_special_tokens=req.add_special_tokens,
                       truncate_prompt_tokens=req.truncate_prompt_tokens)
    gen = Generation(state, base_id, er.prompts, er.params, session_id=req.session_id).submit()
    view = _View(req, model, f"cmpl-{base_id}", er.texts,
                 TokenText(state.tokenizer, bool(req.return_tokens_as_token_ids)))
    if req.stream:
        return sse_response(view.stream(gen))
    return view.response(gen.prompts, await gen.finals())


class _View:
    """Shapes one request's engine outputs as completion objects."""

    def __init__(self, req: CompletionRequest, model: str, response_id: str, texts: list[str],
                 text: TokenText):
        self.req, self.model, self.id, self.texts, self.text = req, model, response_id, texts, text
        self.n = req.n or 1

    def _logprobs(self, i: int, ids, steps, offset: int):
        if self.req.logprobs is None:
            return None
        base = len(self.texts[i]) if self.req.echo else 0
        return completion_logprobs(ids, steps, self.req.logprobs, self.text, base + offset)

    def response(self, prompts: list[list[int]], finals: list) -> CompletionResponse:
        req, choices, completion_tokens = self.req, [], 0
        for i, (ids, final) in enumerate(zip(prompts, finals)):
            for o in sorted(final.outputs, key=lambda o: o.index):
                completion_tokens += len(o.token_ids)
                body = o.text
                lp = self._logprobs(i, o.token_ids, o.logprobs or [None] * len(o.token_ids), 0)
                if req.echo:
                    body = self.texts[i] + body
                    if lp is not None:
                        steps = final.prompt_logprobs or [None] * len(ids)
                        head = completion_logprobs(ids, list(steps), req.logprobs, self.text, 0)
                        for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                            setattr(lp, name, getattr(head, name) + getattr(lp, name))
                choice = CompletionResponseChoice(
                    index=i * self.n + o.index, text=body, logprobs=lp,
                    finish_reason=o.finish_reason, stop_reason=o.stop_reason,
                    prompt_logprobs=_prompt_logprobs(final) if req.prompt_logprobs else None)
                if req.return_token_ids:
                    choice.token_ids = list(o.token_ids)
                    choice.prompt_token_ids = list(ids)
                choices.append(choice)
        choices.sort(key=lambda c: c.index)
        prompt_tokens = sum(len(p) for p in prompts)
        return CompletionResponse(id=self.id, model=self.model, choices=choices,
                                  usage=_usage(prompt_tokens, completion_tokens))

    async def stream(self, gen: Generation):
        req = self.req
        opts = req.stream_options
        include_usage = bool(opts and opts.include_usage)
        continuous = bool(include_usage and opts.continuous_usage_stats)
        deltas, generated = Deltas(), {}
        async for i, out in gen.checked_outputs():
            generated[i] = out.num_generated_tokens
            for o in out.outputs:
                d = deltas.update(i, o, force_first=bool(req.echo))
                if d is None:
                    continue
                text = (self.texts[i] + d.text) if d.first and req.echo else d.text
                choice = CompletionResponseStreamChoice(
                    index=i * self.n + o.index, text=text,
                    logprobs=self._logprobs(i, d.token_ids, d.logprobs, d.text_offset),
                    finish_reason=o.finish_reason if d.finished else None,
                    stop_reason=o.stop_reason if d.finished else None)
                if req.return_token_ids:
                    choice.token_ids = d.token_ids
                    if d.first:
                        choice.prompt_token_ids = list(gen.prompts[i])
                chunk = CompletionStreamResponse(id=self.id, model=self.model, choices=[choice])
                if continuous:
                    chunk.usage = _usage(len(gen.prompts[i]), len(o.token_ids))
                yield sse(chunk)
        if include_usage:
            chunk = CompletionStreamResponse(id=self.id, model=self.model, choices=[])
            chunk.usage = _usage(sum(len(p) for p in gen.prompts), sum(generated.values()))
            yield sse(chunk)
        yield DONE


def _usage(prompt_tokens: int, completion_tokens: int) -> UsageInfo:
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens)


def _prompt_logprobs(final) -> Optional[list]:
    if final.prompt_logprobs is None:
        return None
    return [None if step is None else
            {tid: {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": lp.decoded_token}
             for tid, lp in step.items()}
            for step in final.prompt_logprobs]
