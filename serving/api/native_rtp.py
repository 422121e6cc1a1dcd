"""RTP-LLM's native routes.

``POST /`` (``{prompt, generate_config{...}}`` -> ``{response, finished,
aux_info}``; a list ``prompt`` or ``prompt_batch`` -> ``response_batch``;
``yield_generator``/``stream`` -> SSE), ``/chat/render`` and
``/v1/chat/render`` (GET and POST), ``/tokenizer/encode``, ``/worker_status``
and ``/rtp_llm/worker_status``, ``/status``, ``/health_check``,
``/cache_status`` and ``/set_log_level``.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field
from quart import Quart, Response, request

from serving.api.admin_routes import server_version
from serving.api.chat import render_chat
from serving.api.errors import APIError
from serving.api.generation import Generation
from serving.api.native_common import (body_dict, check_awake, json_response, native_state,
                                       require_task, task_of, validate)
from serving.api.state import ServerState
from serving.api.streaming import sse_response
from serving.engine.types import SamplingParams, ValidationError

logger = logging.getLogger(__name__)

LOG_LEVELS = {"CRITICAL", "ERROR", "WARNING", "WARN", "INFO", "DEBUG", "NOTSET"}


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


class RenderRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    messages: list[dict[str, Any]]
    add_generation_prompt: bool = True
    chat_template_kwargs: Optional[dict[str, Any]] = None


def _sampling(state: ServerState, cfg: GenerateConfig, num_prompt: int) -> SamplingParams:
    single_ids = [ids[0] for ids in cfg.stop_words_list if len(ids) == 1]
    if len(single_ids) != len(cfg.stop_words_list):
        raise APIError("stop_words_list entries of several tokens are not supported; use "
                       "stop_words_str", 400, "generate_config.stop_words_list")
    max_new = min(cfg.max_new_tokens, state.max_model_len - num_prompt)
    if max_new < 1:
        raise APIError(f"the prompt ({num_prompt} tokens) fills the context of "
                       f"{state.max_model_len} tokens", 400, "prompt")
    try:
        return SamplingParams(n=max(cfg.num_return_sequences, 1), temperature=cfg.temperature,
                              top_k=cfg.top_k or -1, top_p=cfg.top_p,
                              repetition_penalty=cfg.repetition_penalty, max_tokens=max_new,
                              min_tokens=cfg.min_new_tokens, seed=cfg.random_seed,
                              stop=list(cfg.stop_words_str), stop_token_ids=single_ids,
                              ignore_eos=cfg.ignore_eos)
    except (ValidationError, ValueError) as exc:
        raise APIError(str(exc), 400, getattr(exc, "param", None)) from None


def _aux(out, start: float, first_token: Optional[float], steps: int) -> dict[str, Any]:
    comp = out.outputs[0] if out.outputs else None
    return {"cost_time": round((time.time() - start) * 1000, 3),
            "first_token_cost_time": round(((first_token or time.time()) - start) * 1000, 3),
            "iter_count": steps, "input_len": out.num_prompt_tokens,
            "prefix_len": getattr(out.metrics, "num_cached_tokens", 0) or 0,
            "reuse_len": getattr(out.metrics, "num_cached_tokens", 0) or 0,
            "output_len": len(comp.token_ids) if comp else 0, "fallback_tokens": 0,
            "fallback_times": 0, "beam_responses": []}


def _one(out, cfg: GenerateConfig, start, first, steps) -> dict[str, Any]:
    texts = [c.text for c in out.outputs]
    obj: dict[str, Any] = {"response": texts if cfg.num_return_sequences else texts[0],
                           "finished": out.finished, "aux_info": _aux(out, start, first, steps)}
    if cfg.return_input_ids:
        obj["input_ids"] = list(out.prompt_token_ids)
    if cfg.return_output_ids:
        obj["output_ids"] = [list(c.token_ids) for c in out.outputs]
    return obj


def register(app: Quart, state: ServerState) -> None:
    """Adds RTP-LLM's native routes to ``app``."""
    native = native_state(app)

    @app.post("/")
    async def rtp_generate():
        req = validate(RTPRequest, await body_dict())
        require_task(state, "POST /", "generate")
        check_awake(state)
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
        ids = [state.tokenizer.encode(p) for p in prompts]
        params = [_sampling(state, req.generate_config, len(i)) for i in ids]
        gen = Generation(state, state.request_id(), ids, params)
        gen.submit()
        start = time.time()
        cfg = req.generate_config
        if req.stream or cfg.yield_generator:
            return sse_response(_stream(gen, cfg, start, batch))
        final, first, steps = {}, None, 0
        async for i, out in gen.outputs():
            steps += 1
            first = first or time.time()
            if out.finished:
                final[i] = out
        results = [_one(final[i], cfg, start, first, steps) for i in range(len(prompts))]
        if batch:
            return json_response({"response_batch": results})
        return json_response(results[0])

    async def _stream(gen, cfg, start, batch):
        first, steps = None, 0
        async for i, out in gen.outputs():
            steps += 1
            first = first or time.time()
            obj = _one(out, cfg, start, first, steps)
            if batch:
                obj["index"] = i
            yield f"data:{json.dumps(obj)}\n\n"

    async def render():
        body = await body_dict() if request.method == "POST" else dict(
            messages=json.loads(request.args.get("messages", "null") or "null"))
        req = validate(RenderRequest, body)
        if not req.messages:
            raise APIError("messages must not be empty", 400, "messages")
        text = render_chat(state, req.messages, add_generation_prompt=req.add_generation_prompt,
                           continue_final_message=False, chat_template=None,
                           chat_template_kwargs=req.chat_template_kwargs)
        ids = state.tokenizer.encode(text, add_special_tokens=False)
        return json_response({"rendered_prompt": text, "prompt": text, "input_ids": ids,
                              "input_urls": []})

    app.add_url_rule("/chat/render", "rtp_chat_render", render, methods=["GET", "POST"])
    app.add_url_rule("/v1/chat/render", "rtp_v1_chat_render", render, methods=["GET", "POST"])

    @app.post("/tokenizer/encode")
    async def tokenizer_encode():
        body = await body_dict()
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise APIError("`prompt` (a string) is required", 400, "prompt")
        tok = state.tokenizer
        enc = tok(prompt, return_offsets_mapping=getattr(tok, "is_fast", False))
        ids = list(enc["input_ids"])
        out = {"token_ids": ids, "tokens": tok.convert_ids_to_tokens(ids), "error": ""}
        if "offset_mapping" in enc:
            out["offset_mapping"] = [list(o) for o in enc["offset_mapping"]]
        return json_response(out)

    def cache_status(latest: int = -1) -> dict[str, Any]:
        stats = state.engine.stats()
        total = int(stats.get("num_total_pages", 0))
        return {"available_kv_cache": int(stats.get("num_free_pages", 0)) * int(
                    stats.get("page_size", 1)),
                "total_kv_cache": total * int(stats.get("page_size", 1)),
                "block_size": int(stats.get("page_size", 1)),
                "version": native.cache_version,
                "cached_keys": [] if latest != native.cache_version else None}

    async def worker_status():
        body = await body_dict(optional=True) if request.method == "POST" else {}
        latest = body.get("latest_cache_version", request.args.get("latest_cache_version", -1))
        try:
            latest = int(latest)
        except (TypeError, ValueError):
            raise APIError("`latest_cache_version` must be an integer", 400,
                           "latest_cache_version") from None
        stats = state.engine.stats()
        return json_response({
            "role": "PDFUSION", "alive": state.engine.is_ready(),
            "available_concurrency": max(0, int(getattr(getattr(state.engine, "config", None),
                                                        "max_num_seqs", 0))
                                         - int(stats.get("num_running", 0))),
            "running_task_info": [{"num_running": stats.get("num_running", 0),
                                   "num_waiting": stats.get("num_waiting", 0)}],
            "finished_task_list": [{"reason": k, "count": v}
                                   for k, v in stats.get("requests_finished", {}).items()],
            "step_latency_ms": float(stats.get("last_step_seconds", 0.0)) * 1000,
            "iterate_count": int(stats.get("num_steps_total", 0)),
            "dp_size": 1, "tp_size": 1, "version": server_version(),
            "status_version": int(time.time() * 1000),
            "cache_status": cache_status(latest)})

    for path in ("/worker_status", "/rtp_llm/worker_status"):
        app.add_url_rule(path, "rtp" + path.replace("/", "_"), worker_status,
                         methods=["GET", "POST"])

    async def status():
        ok = state.engine.is_ready()
        return json_response({"status": "ok" if ok else "starting", "alive": ok,
                              "cache_version": native.cache_version,
                              "task": task_of(state)}, 200 if ok else 503)

    app.add_url_rule("/status", "rtp_status", status, methods=["GET", "POST"])
    app.add_url_rule("/health_check", "rtp_health_check", status, methods=["GET", "POST"])

    @app.route("/cache_status", methods=["GET", "POST"])
    async def get_cache_status():
        body = await body_dict(optional=True) if request.method == "POST" else {}
        latest = body.get("latest_cache_version", -1)
        if isinstance(latest, bool) or not isinstance(latest, int):
            raise APIError("`latest_cache_version` must be an integer", 400,
                           "latest_cache_version")
        return json_response(cache_status(latest))

    @app.post("/set_log_level")
    async def set_log_level():
        body = await body_dict()
        level = body.get("log_level")
        if not isinstance(level, str) or level.upper() not in LOG_LEVELS:
            raise APIError(f"`log_level` must be one of {sorted(LOG_LEVELS)}, got {level!r}",
                           400, "log_level")
        lvl = getattr(logging, "WARNING" if level.upper() == "WARN" else level.upper())
        logging.getLogger().setLevel(lvl)
        for name in ("serving", "model", "hypercorn.error"):
            logging.getLogger(name).setLevel(lvl)
        logger.warning("log level set to %s", level.upper())
        return json_response({"status": "ok", "log_level": level.upper()})
