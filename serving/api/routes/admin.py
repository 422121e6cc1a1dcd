"""Routes that change the server: weight updates, sleep / wake-up, cache flush,
log level, terminate.

``/flush_cache``, ``/update_weights_from_disk`` (SGLang), ``/update_weights``
(``model_path`` -> SGLang's; ``serialized_named_tensors`` -> LMDeploy's),
``/sleep``, ``/wakeup``, ``/terminate`` (LMDeploy), ``/set_log_level``
(RTP-LLM). The engine does the work (``EngineClient``); an engine that cannot
(a pooling model) raises UnsupportedOperationError, answered 400. LMDeploy's
routes answer errors in its flat shape.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from typing import Optional

from pydantic import BaseModel, ConfigDict, StrictBool
from quart import Blueprint, Response, request

from serving.api.errors import APIError, dialect_errors, from_engine_error
from serving.api.http import body_dict, json_response, parse_body, text_response, validate
from serving.api.state import ServerState, current_state
from serving.engine.errors import EngineError

logger = logging.getLogger(__name__)
bp = Blueprint("admin", __name__)

FLUSH_OK = ("Cache flushed.\nPlease check backend logs for more details. (When there are "
            "running or waiting requests, the operation will not be performed.)")
LOG_LEVELS = {"CRITICAL", "ERROR", "WARNING", "WARN", "INFO", "DEBUG", "NOTSET"}
LOAD_FORMATS = (None, "auto", "safetensors", "gguf", "orbax")


class DiskUpdate(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())
    model_path: str
    load_format: Optional[str] = None
    weight_version: Optional[str] = None


class TensorUpdate(BaseModel):
    model_config = ConfigDict(extra="allow")
    serialized_named_tensors: object = None
    load_format: Optional[str] = None
    finished: StrictBool = False


async def _call(fn, *args):
    """Runs an engine operation off the event loop; engine errors -> their status."""
    try:
        return await asyncio.to_thread(fn, *args)
    except EngineError as exc:
        raise from_engine_error(exc) from None


@bp.route("/flush_cache", methods=["GET", "POST"])
async def flush_cache():
    state = current_state()
    if not await _call(state.engine.flush_cache):
        raise APIError("Cache not flushed: there are running or waiting requests; "
                       "retry when the server is idle.", 400)
    state.cache_version += 1
    return text_response(FLUSH_OK)


async def _update_from_disk(state: ServerState, req: DiskUpdate) -> Response:
    if not req.model_path:
        raise APIError("`model_path` (a string) is required", 400, "model_path")
    if req.load_format not in LOAD_FORMATS:
        raise APIError(f"load_format {req.load_format!r} is not supported", 400, "load_format")
    state.require_task("/update_weights_from_disk", "generate")
    ok, message = await _call(state.engine.update_weights_from_disk, req.model_path)
    if ok:
        state.cache_version += 1
        if req.weight_version is not None:
            state.weight_version = str(req.weight_version)
    return json_response({"success": ok, "message": message}, 200 if ok else 400)


@bp.post("/update_weights_from_disk")
async def update_weights_from_disk():
    return await _update_from_disk(current_state(), await parse_body(DiskUpdate))


@bp.post("/update_weights")
async def update_weights():
    state = current_state()
    body = await body_dict()
    if "serialized_named_tensors" in body and "model_path" not in body:
        with dialect_errors("lmdeploy"):
            return await _update_tensors(state, validate(TensorUpdate, body))
    return await _update_from_disk(state, validate(DiskUpdate, body))


async def _update_tensors(state: ServerState, req: TensorUpdate) -> Response:
    """LMDeploy's ``POST /update_weights``: ``{serialized_named_tensors, load_format, finished}``.

    The tensors (formats in ``serving.api.weight_payload``) are staged until a
    call with ``finished: true`` swaps them in on every replica, so a model
    larger than the app's body limit (32 MiB) goes in several calls. Answers 200
    with ``null`` as LMDeploy does; a payload that cannot be decoded, an
    unknown name or a wrong shape is a 400 and drops what was staged (the old
    weights keep serving).
    """
    from serving.api.weight_payload import PayloadError, decode_named_tensors

    state.require_task("/update_weights", "generate")
    try:
        tensors = await asyncio.to_thread(decode_named_tensors, req.serialized_named_tensors,
                                          req.load_format)
    except PayloadError as exc:
        state.engine.drop_staged_weights()  # a broken sequence: drop what was staged
        raise APIError(f"Failed to update weights: {exc}", 400,
                       "serialized_named_tensors") from None
    ok, message = await _call(state.engine.update_weights_from_tensors, tensors, req.finished)
    if not ok:
        raise APIError(message, 400, "serialized_named_tensors")
    if req.finished:
        state.cache_version += 1
    return json_response(None)


@bp.post("/sleep")
async def sleep():
    with dialect_errors("lmdeploy"):
        return await _sleep(current_state())


async def _sleep(state: ServerState) -> Response:
    body = await body_dict(optional=True)
    level = request.args.get("level", body.get("level", 1))
    try:
        level = int(level)
    except (TypeError, ValueError):
        raise APIError(f"`level` must be 1 or 2, got {level!r}", 400, "level") from None
    if level not in (1, 2):
        raise APIError(f"`level` must be 1 or 2, got {level}", 400, "level")
    try:
        await _call(state.engine.sleep, level)
    except RuntimeError as exc:
        raise APIError(f"Cannot sleep: {exc}", 409) from None
    return Response("", status=200)


@bp.post("/wakeup")
async def wakeup():
    with dialect_errors("lmdeploy"):
        await body_dict(optional=True)
        await _call(current_state().engine.wake_up)
    return Response("", status=200)


@bp.get("/terminate")
async def terminate():
    logger.info("terminate requested over HTTP; shutting down")
    asyncio.get_running_loop().call_later(0.2, os.kill, os.getpid(), signal.SIGTERM)
    return json_response({})


@bp.post("/set_log_level")
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
