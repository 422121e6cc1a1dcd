"""LMDeploy's native routes: /sleep, /wakeup, /is_sleeping, /terminate, /v1/encode.

(``/generate``, ``/abort_request`` and ``/update_weights`` are shared with
SGLang and live in ``native_sglang``, which hands an ``/update_weights`` body
with ``serialized_named_tensors`` to ``update_params`` here; ``/pooling`` is
in ``pooling_routes``.)

``/sleep`` frees the device memory of the weights and the KV cache (LMDeploy's
``level`` 1 keeps a host copy of the weights, level 2 reloads them from disk
on wake-up); requests meanwhile get 503. ``/v1/encode`` is LMDeploy's
tokenizer route: ``{input, add_bos}`` -> ``{input_ids, length}``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal

from quart import Quart, Response, request

from serving.api.errors import APIError
from serving.api.native_common import body_dict, json_response, native_state, require_task
from serving.api.state import ServerState

logger = logging.getLogger(__name__)


async def update_params(app: Quart, state: ServerState, body: dict) -> Response:
    """LMDeploy's ``POST /update_weights``: ``{serialized_named_tensors, load_format, finished}``.

    The tensors (formats in ``serving.api.weight_payload``) are staged until a
    call with ``finished: true`` swaps them in on every replica, so a model
    larger than the app's body limit (32 MiB) goes in several calls. Answers 200
    with ``null`` as LMDeploy does; a payload that cannot be decoded, an
    unknown name or a wrong shape is a 400 and drops what was staged (the old
    weights keep serving).
    """
    from serving.api.weight_payload import PayloadError, decode_named_tensors

    finished = body.get("finished", False)
    if not isinstance(finished, bool):
        raise APIError("`finished` must be a boolean", 400, "finished")
    load_format = body.get("load_format")
    if load_format is not None and not isinstance(load_format, str):
        raise APIError("`load_format` must be a string or null", 400, "load_format")
    require_task(state, "/update_weights", "generate")
    update = getattr(state.engine, "update_weights_from_tensors", None)
    if update is None:
        raise APIError("this engine cannot update weights at run time", 400)
    try:
        tensors = await asyncio.to_thread(decode_named_tensors,
                                          body.get("serialized_named_tensors"), load_format)
    except PayloadError as exc:
        drop = getattr(state.engine, "drop_staged_weights", None)
        if drop is not None:
            drop()  # a broken sequence: drop what was staged
        raise APIError(f"Failed to update weights: {exc}", 400,
                       "serialized_named_tensors") from None
    ok, message = await asyncio.to_thread(update, tensors, finished)
    if not ok:
        raise APIError(message, 400, "serialized_named_tensors")
    if finished:
        native_state(app).cache_version += 1
    return json_response(None)


def register(app: Quart, state: ServerState) -> None:
    """Adds LMDeploy's native routes to ``app``."""

    def engine_method(name: str):
        fn = getattr(state.engine, name, None)
        if fn is None:
            raise APIError(f"{request.path} is not supported by this engine", 400)
        return fn

    @app.post("/sleep")
    async def sleep():
        body = await body_dict(optional=True)
        level = request.args.get("level", body.get("level", 1))
        try:
            level = int(level)
        except (TypeError, ValueError):
            raise APIError(f"`level` must be 1 or 2, got {level!r}", 400, "level") from None
        if level not in (1, 2):
            raise APIError(f"`level` must be 1 or 2, got {level}", 400, "level")
        try:
            await asyncio.to_thread(engine_method("sleep"), level)
        except RuntimeError as exc:
            raise APIError(f"Cannot sleep: {exc}", 409) from None
        return Response("", status=200)

    @app.post("/wakeup")
    async def wakeup():
        await body_dict(optional=True)
        await asyncio.to_thread(engine_method("wake_up"))
        return Response("", status=200)

    @app.get("/is_sleeping")
    async def is_sleeping():
        fn = getattr(state.engine, "is_sleeping", None)
        return json_response({"is_sleeping": bool(fn()) if fn else False})

    @app.get("/terminate")
    async def terminate():
        logger.info("terminate requested over HTTP; shutting down")
        asyncio.get_running_loop().call_later(0.2, os.kill, os.getpid(), signal.SIGTERM)
        return json_response({})

    @app.post("/v1/encode")
    async def encode():
        body = await body_dict()
        inp = body.get("input")
        add_bos = body.get("add_bos", True)
        if not isinstance(add_bos, bool):
            raise APIError("`add_bos` must be a boolean", 400, "add_bos")
        if isinstance(inp, str):
            texts, single = [inp], True
        elif isinstance(inp, list) and inp and all(isinstance(t, str) for t in inp):
            texts, single = inp, False
        else:
            raise APIError("`input` must be a string or a non-empty list of strings", 400,
                           "input")
        tok = state.tokenizer
        ids = [tok.encode(t, add_special_tokens=add_bos) for t in texts]
        if single:
            return json_response({"input_ids": ids[0], "length": len(ids[0])})
        return json_response({"input_ids": ids, "length": [len(i) for i in ids]})
