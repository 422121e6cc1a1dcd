"""POST /v1/completions: prompts -> engine requests -> OpenAI completion objects.

Each prompt of a batch (``prompt`` as str, [str], [int] or [[int]]) is one
engine request carrying ``n`` completions; choice ``i`` of prompt ``p`` is
reported at index ``p * n + i``, as vLLM does.
"""

from __future__ import annotations

import logging
from typing import Optional

from serving.api.errors import APIError
from serving.api.generation import Generation
from serving.api.logprobs import TokenText, completion_logprobs
from serving.api.protocol import (CompletionRequest, CompletionResponse,
                                  CompletionResponseChoice, CompletionResponseStreamChoice,
                                  CompletionStreamResponse, UsageInfo)
from serving.api.sampling import (build_sampling_params, normalize_prompts, resolve_max_tokens,
                                  truncate)
from serving.api.streaming import DONE, sse, sse_response

logger = logging.getLogger(__name__)


def _prepare(state, req: CompletionRequest) -> tuple[list[list[int]], list[str], list]:
    """Tokenizes the prompts and builds one SamplingParams per prompt."""
    if req.suffix is not None:
        raise APIError("suffix is not currently supported", 400, "suffix")
    if req.stream and req.best_of is not None and req.best_of != (req.n or 1):
        raise APIError("best_of must equal n when streaming", 400, "best_of")
    tok = state.tokenizer
    vocab = int(state.engine.model_config.vocab_size)
    prompts, texts = [], []
    for p in normalize_prompts(req.prompt):
        if isinstance(p, str):
            ids = tok.encode(p, add_special_tokens=req.add_special_tokens)
            text = p
        else:
            bad = [t for t in p if not 0 <= t < vocab]
            if bad:
                raise APIError(f"prompt contains out-of-vocab token ids {bad[:5]} "
                               f"(vocab size {vocab})", 400, "prompt")
            ids, text = list(p), None
        if not ids:
            raise APIError("prompt must not be empty", 400, "prompt")
        ids = truncate(ids, req.truncate_prompt_tokens)
        prompts.append(ids)
        texts.append(text if text is not None and req.truncate_prompt_tokens is None
                      else tok.decode(ids))
    logprobs = req.logprobs
    params = []
    for ids in prompts:
        max_tokens = resolve_max_tokens(req.max_tokens, len(ids), state.max_model_len)
        sp = build_sampling_params(req, max_tokens=max_tokens, logprobs=logprobs,
                                   max_n=state.config.max_n, vocab_size=vocab)
        if req.echo and logprobs is not None:
            sp.prompt_logprobs = max(sp.prompt_logprobs or 0, logprobs)
        params.append(sp)
    return prompts, texts, params


async def create_completion(state, req: CompletionRequest, base_id: str):
    """Serves one completion request (streaming or not)."""
    model = state.check_model(req.model)
    prompts, texts, params = _prepare(state, req)
    state.check_ready()
    gen = Generation(state, base_id, prompts, params)
    gen.submit()
    response_id = f"cmpl-{base_id}"
    text = TokenText(state.tokenizer, bool(req.return_tokens_as_token_ids))
    if req.stream:
        return sse_response(_stream(state, req, gen, model, response_id, texts, text))
    return await _collect(req, gen, model, response_id, texts, text)


def _echo_logprobs(req, prompt_ids, final, text: TokenText):
    steps = final.prompt_logprobs or [None] * len(prompt_ids)
    return completion_logprobs(prompt_ids, list(steps), req.logprobs, text, 0)


async def _collect(req, gen: Generation, model: str, response_id: str, texts: list[str],
                   text: TokenText) -> CompletionResponse:
    finals: dict[int, object] = {}
    async for i, out in gen.outputs():
        if out.finished:
            finals[i] = out
    n = req.n or 1
    choices, prompt_tokens, completion_tokens = [], 0, 0
    for i, ids in enumerate(gen.prompts):
        final = finals[i]
        if final.error:
            raise APIError(f"The engine failed on this request: {final.error}", 500)
        prompt_tokens += len(ids)
        for o in sorted(final.outputs, key=lambda o: o.index):
            completion_tokens += len(o.token_ids)
            body, lp = o.text, None
            if req.logprobs is not None:
                lp = completion_logprobs(o.token_ids, o.logprobs or [None] * len(o.token_ids),
                                         req.logprobs, text,
                                         len(texts[i]) if req.echo else 0)
            if req.echo:
                body = texts[i] + body
                if lp is not None:
                    head = _echo_logprobs(req, ids, final, text)
                    lp.tokens = head.tokens + lp.tokens
                    lp.token_logprobs = head.token_logprobs + lp.token_logprobs
                    lp.top_logprobs = head.top_logprobs + lp.top_logprobs
                    lp.text_offset = head.text_offset + lp.text_offset
            choice = CompletionResponseChoice(
                index=i * n + o.index, text=body, logprobs=lp, finish_reason=o.finish_reason,
                stop_reason=o.stop_reason,
                prompt_logprobs=_prompt_logprobs(final) if req.prompt_logprobs else None)
            if req.return_token_ids:
                choice.token_ids = list(o.token_ids)
                choice.prompt_token_ids = list(ids)
            choices.append(choice)
    choices.sort(key=lambda c: c.index)
    usage = UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                      total_tokens=prompt_tokens + completion_tokens)
    return CompletionResponse(id=response_id, model=model, choices=choices, usage=usage)


def _prompt_logprobs(final) -> Optional[list]:
    if final.prompt_logprobs is None:
        return None
    return [None if step is None else
            {tid: {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": lp.decoded_token}
             for tid, lp in step.items()}
            for step in final.prompt_logprobs]


async def _stream(state, req, gen: Generation, model: str, response_id: str, texts: list[str],
                  text: TokenText):
    n = req.n or 1
    opts = req.stream_options
    include_usage = bool(opts and opts.include_usage)
    continuous = bool(include_usage and opts.continuous_usage_stats)
    sent_text: dict[tuple[int, int], int] = {}
    sent_tokens: dict[tuple[int, int], int] = {}
    gen_tokens: dict[int, int] = {}
    for i, ids in enumerate(gen.prompts):
        gen_tokens[i] = 0
    async for i, out in gen.outputs():
        if out.error:
            raise APIError(f"The engine failed on this request: {out.error}", 500)
        gen_tokens[i] = out.num_generated_tokens
        for o in out.outputs:
            key = (i, o.index)
            first = key not in sent_text
            t0, k0 = sent_text.get(key, 0), sent_tokens.get(key, 0)
            delta = o.text[t0:]
            new_ids = o.token_ids[k0:]
            if not delta and not new_ids and not o.finished and not (first and req.echo):
                continue
            lp = None
            if req.logprobs is not None:
                steps = (o.logprobs or [])[k0:k0 + len(new_ids)]
                steps += [None] * (len(new_ids) - len(steps))
                base = (len(texts[i]) if req.echo else 0) + t0
                lp = completion_logprobs(new_ids, steps, req.logprobs, text, base)
            if first and req.echo:
                delta = texts[i] + delta
            sent_text[key], sent_tokens[key] = len(o.text), len(o.token_ids)
            choice = CompletionResponseStreamChoice(
                index=i * n + o.index, text=delta, logprobs=lp,
                finish_reason=o.finish_reason if o.finished else None,
                stop_reason=o.stop_reason if o.finished else None)
            chunk = CompletionStreamResponse(id=response_id, model=model, choices=[choice])
            if continuous:
                p = len(gen.prompts[i])
                chunk.usage = UsageInfo(prompt_tokens=p, completion_tokens=len(o.token_ids),
                                        total_tokens=p + len(o.token_ids))
            yield sse(chunk)
    if include_usage:
        prompt_tokens = sum(len(p) for p in gen.prompts)
        completion_tokens = sum(gen_tokens.values())
        chunk = CompletionStreamResponse(id=response_id, model=model, choices=[])
        chunk.usage = UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                total_tokens=prompt_tokens + completion_tokens)
        yield sse(chunk)
    yield DONE
