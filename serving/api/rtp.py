"""RTP-LLM's generate dialect: ``{prompt, generate_config}`` -> ``{response, finished, aux_info}``.

A list ``prompt`` or ``prompt_batch`` answers ``response_batch``;
``yield_generator``/``stream`` streams ``data:{json}\\r\\n\\r\\n`` events ending
with ``data:[done]`` (RTP-LLM's framing); errors leave as RTP-LLM's
``{error_code, error_code_str, message}``.
"""

from __future__ import annotations

import time
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from serving.api.errors import APIError
from serving.api.generation import Generation
from serving.api.request_mapping import SamplingFields, build_request
from serving.api.streaming import RTP, sse_response


class GenerateConfig(BaseModel):
    """RTP-LLM ``generate_config`` (the fields this server implements; others ignored)."""

    model_config = ConfigDict(extra="allow")
    max_new_tokens: int = Field(8192, ge=1)
    min_new_tokens: int = Field(0, ge=0)
    temperature: float = Field(1.0, ge=0)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    num_return_sequences: int = Field(0, ge=0, le=64)
    random_seed: Optional[int] = None
    stop_words_str: list[str] = Field(default_factory=list)
    stop_words_list: list[list[int]] = Field(default_factory=list)
    yield_generator: bool = False
    return_input_ids: bool = False
    return_output_ids: bool = False
    ignore_eos: bool = False


class RTPRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    prompt: Optional[Union[str, list[str]]] = None
    prompt_batch: Optional[list[str]] = None
    generate_config: GenerateConfig = Field(default_factory=GenerateConfig)
    stream: bool = False


def _prompts(req: RTPRequest) -> tuple[list[str], bool]:
    if req.prompt_batch is not None:
        prompts, batch = req.prompt_batch, True
    elif isinstance(req.prompt, list):
        prompts, batch = req.prompt, True
    elif isinstance(req.prompt, str):
        prompts, batch = [req.prompt], False
    else:
        raise APIError("`prompt` (a string or a list) is required", 400, "prompt")
    if not prompts or any(not p for p in prompts):
        raise APIError("prompts must be non-empty strings", 400, "prompt")
    return prompts, batch


def _fields(cfg: GenerateConfig) -> SamplingFields:
    single_ids = [ids[0] for ids in cfg.stop_words_list if len(ids) == 1]
    if len(single_ids) != len(cfg.stop_words_list):
        raise APIError("stop_words_list entries of several tokens are not supported; use "
                       "stop_words_str", 400, "generate_config.stop_words_list")
    return SamplingFields(n=max(cfg.num_return_sequences, 1), temperature=cfg.temperature,
                          top_k=cfg.top_k, top_p=cfg.top_p,
                          repetition_penalty=cfg.repetition_penalty,
                          max_tokens=cfg.max_new_tokens, min_tokens=cfg.min_new_tokens,
                          seed=cfg.random_seed, stop=list(cfg.stop_words_str),
                          stop_token_ids=single_ids, ignore_eos=cfg.ignore_eos,
                          max_tokens_param="generate_config.max_new_tokens",
                          clamp_max_tokens=True)


async def generate(state, req: RTPRequest, base_id: str):
    """Serves ``POST /``: a response dict, or an SSE response when streaming."""
    prompts, batch = _prompts(req)
    cfg = req.generate_config
    er = build_request(state, prompts, _fields(cfg))
    gen = Generation(state, base_id, er.prompts, er.params).submit()
    view = _View(cfg, batch)
    if req.stream or cfg.yield_generator:
        return sse_response(view.stream(gen), framing=RTP)
    final: dict[int, Any] = {}
    async for i, out in gen.checked_outputs():
        view.tick()
        if out.finished:
            final[i] = out
    results = [view.one(final[i]) for i in range(len(prompts))]
    return {"response_batch": results} if batch else results[0]


class _View:
    """Shapes engine outputs as RTP-LLM response objects (with ``aux_info`` timings)."""

    def __init__(self, cfg: GenerateConfig, batch: bool):
        self.cfg, self.batch = cfg, batch
        self.start, self.first, self.steps = time.time(), None, 0

    def tick(self) -> None:
        self.steps += 1
        self.first = self.first or time.time()

    def aux(self, out, comp=None) -> dict[str, Any]:
        comp = comp or (out.outputs[0] if out.outputs else None)
        cached = getattr(out.metrics, "num_cached_tokens", 0) or 0
        now = time.time()
        return {"cost_time": round((now - self.start) * 1000, 3),
                "first_token_cost_time": round(((self.first or now) - self.start) * 1000, 3),
                "iter_count": self.steps, "input_len": out.num_prompt_tokens,
                "prefix_len": cached, "reuse_len": cached,
                "output_len": len(comp.token_ids) if comp else 0, "fallback_tokens": 0,
                "fallback_times": 0, "beam_responses": []}

    def one(self, out) -> dict[str, Any]:
        texts = [c.text for c in out.outputs]
        many = bool(self.cfg.num_return_sequences)  # n > 1 answers lists
        aux = [self.aux(out, c) for c in out.outputs] if many else self.aux(out)
        obj: dict[str, Any] = {"response": texts if many else texts[0],
                               "finished": out.finished, "aux_info": aux}
        if self.cfg.return_input_ids:
            obj["input_ids"] = list(out.prompt_token_ids)
        if self.cfg.return_output_ids:
            obj["output_ids"] = [list(c.token_ids) for c in out.outputs]
        return obj

    async def stream(self, gen: Generation):
        async for i, out in gen.checked_outputs():
            self.tick()
            obj = self.one(out)
            if self.batch:
                obj["index"] = i
            yield RTP.event(obj)
        yield RTP.done_event
