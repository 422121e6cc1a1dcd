"""SGLang's native routes (and the shared /generate, /abort_request).

``/generate`` (SGLang or LMDeploy body, see ``native_generate``),
``/get_model_info`` (the nine keys of SGLang's current docs),
``/get_server_info`` (+ the old ``/get_server_args``, ``/get_memory_pool_size``,
``/get_max_total_num_tokens``), ``/health_generate``, ``/flush_cache``,
``/abort_request`` (SGLang ``rid`` or LMDeploy ``session_id``/``abort_all``),
``/update_weights_from_disk`` and ``/update_weights`` (``model_path`` ->
SGLang's; ``serialized_named_tensors`` -> LMDeploy's, ``native_lmdeploy.update_params``).
"""

from __future__ import annotations

import asyncio
import logging

from quart import Quart, Response

from serving.api.admin_routes import server_version
from serving.api.errors import APIError
from serving.api.native_common import (body_dict, check_awake, engine_config_dict, hf_config,
                                       json_response, native_state, require_task, task_of)
from serving.api.native_generate import dialect_of, parse_lmdeploy, parse_sglang, run_generate
from serving.api.native_lmdeploy import update_params
from serving.api.state import ServerState
from serving.engine.types import SamplingParams

logger = logging.getLogger(__name__)

FLUSH_OK = ("Cache flushed.\nPlease check backend logs for more details. (When there are "
            "running or waiting requests, the operation will not be performed.)")


def _max_total_tokens(state: ServerState) -> int:
    stats = state.engine.stats()
    return int(stats.get("num_total_pages", 0)) * int(stats.get("page_size", 1))


def register(app: Quart, state: ServerState) -> None:
    """Adds SGLang's native routes (and the shared /generate, /abort_request) to ``app``."""
    native = native_state(app)

    @app.post("/generate")
    async def generate():
        body = await body_dict()
        require_task(state, "/generate", "generate")
        check_awake(state)
        base = state.request_id()
        tie = "lmdeploy" if native.api_dialect == "lmdeploy" else "sglang"
        if dialect_of(body, tie) == "lmdeploy":
            job = parse_lmdeploy(state, body, base)
        else:
            job = parse_sglang(state, body, base)
        result = await run_generate(state, native, job)
        return result if isinstance(result, Response) else json_response(result)

    @app.post("/abort_request")
    async def abort_request():
        body = await body_dict(optional=True)
        rid, session = body.get("rid"), body.get("session_id", -1)
        abort_all = body.get("abort_all", False)
        if not isinstance(abort_all, bool):
            raise APIError("`abort_all` must be a boolean", 400, "abort_all")
        if session is not None and (isinstance(session, bool) or not isinstance(session, int)):
            raise APIError("`session_id` must be an integer", 400, "session_id")
        if rid is not None and not isinstance(rid, (str, list)):
            raise APIError("`rid` must be a string or a list of strings", 400, "rid")
        keys = set(native.running) if abort_all else set()
        if isinstance(rid, str):
            keys.add(rid)
        elif isinstance(rid, list):
            keys.update(map(str, rid))
        if session is not None and session >= 0:
            keys.add(str(session))
        for key in keys:
            gen = native.running.pop(key, None)
            if gen is not None:
                gen.abort()
            elif not abort_all:
                state.engine.abort(key)  # an engine id of another route
        return json_response({})

    @app.get("/get_model_info")
    async def get_model_info():
        cfg = hf_config(state.engine)
        return json_response({
            "model_path": state.engine.model_path,
            "is_generation": task_of(state) == "generate",
            "tokenizer_path": state.engine.model_path,
            "preferred_sampling_params": None,
            "weight_version": native.weight_version,
            "has_image_understanding": False,
            "has_audio_understanding": False,
            "model_type": cfg.get("model_type"),
            "architectures": cfg.get("architectures"),
        })

    def server_args() -> dict:
        return engine_config_dict(state)

    @app.get("/get_server_info")
    async def get_server_info():
        stats = state.engine.stats()
        info = server_args()
        info.update({
            "max_total_num_tokens": _max_total_tokens(state),
            "memory_pool_size": _max_total_tokens(state),
            "version": server_version(),
            "internal_states": [{"num_running": stats.get("num_running", 0),
                                 "num_waiting": stats.get("num_waiting", 0),
                                 "kv_cache_usage": stats.get("kv_cache_usage", 0.0),
                                 "weight_version": native.weight_version}],
        })
        return json_response(info)

    @app.get("/get_server_args")
    async def get_server_args():
        return json_response(server_args())

    @app.get("/get_memory_pool_size")
    async def get_memory_pool_size():
        return json_response(_max_total_tokens(state))

    @app.get("/get_max_total_num_tokens")
    async def get_max_total_num_tokens():
        return json_response({"max_total_num_tokens": _max_total_tokens(state)})

    @app.route("/health_generate", methods=["GET", "POST"])
    async def health_generate():
        check_awake(state)
        engine = state.engine
        try:
            if task_of(state) == "generate":
                params = SamplingParams(max_tokens=1, temperature=0.0)
                bos = getattr(state.tokenizer, "bos_token_id", None)
                ids = [bos] if bos is not None else state.tokenizer.encode("hi")[:1] or [0]
                rid = f"health-generate-{state.request_id()}"
                async for out in engine.generate(ids, params, rid):
                    if out.finished and (out.error or not out.outputs
                                         or not out.outputs[0].token_ids):
                        raise RuntimeError(out.error or "no token generated")
            else:
                await engine.health_check()
        except Exception as exc:  # noqa: BLE001 - reported as 503
            raise APIError(f"health_generate failed: {exc}", 503) from None
        return Response("", status=200)

    @app.route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache():
        flush = getattr(state.engine, "flush_cache", None)
        if flush is None:
            return Response(FLUSH_OK, status=200, content_type="text/plain")
        ok = await asyncio.to_thread(flush)
        if not ok:
            raise APIError("Cache not flushed: there are running or waiting requests; "
                           "retry when the server is idle.", 400)
        native.cache_version += 1
        return Response(FLUSH_OK, status=200, content_type="text/plain")

    async def update_from_disk(body: dict):
        path = body.get("model_path")
        if not isinstance(path, str) or not path:
            raise APIError("`model_path` (a string) is required", 400, "model_path")
        load_format = body.get("load_format")
        if load_format not in (None, "auto", "safetensors", "gguf", "orbax"):
            raise APIError(f"load_format {load_format!r} is not supported", 400, "load_format")
        version = body.get("weight_version")
        require_task(state, "/update_weights_from_disk", "generate")
        if not hasattr(state.engine, "update_weights_from_disk"):
            raise APIError("this engine cannot update weights at run time", 400)
        ok, message = await asyncio.to_thread(state.engine.update_weights_from_disk, path)
        if ok:
            native.cache_version += 1
            if version is not None:
                native.weight_version = str(version)
        return json_response({"success": ok, "message": message}, 200 if ok else 400)

    @app.post("/update_weights_from_disk")
    async def update_weights_from_disk():
        return await update_from_disk(await body_dict())

    @app.post("/update_weights")
    async def update_weights():
        body = await body_dict()
        if "serialized_named_tensors" in body and "model_path" not in body:
            return await update_params(app, state, body)
        return await update_from_disk(body)
