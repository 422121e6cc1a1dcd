"""Read-only server routes: health, version, metrics and state.

``/health``, ``/ping``, ``/version``, ``/metrics`` (vLLM), ``/health_generate``,
``/get_model_info``, ``/get_server_info`` (+ the old ``/get_server_args``,
``/get_memory_pool_size``, ``/get_max_total_num_tokens``) (SGLang),
``/is_sleeping`` (LMDeploy), ``GET /``, ``/status``, ``/health_check``,
``/worker_status``, ``/rtp_llm/worker_status``, ``/cache_status`` (RTP-LLM).
"""

from __future__ import annotations

import time
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from quart import Blueprint, Response, request

from serving.api.errors import APIError
from serving.api.http import body_dict, json_response
from serving.api.metrics import CONTENT_TYPE
from serving.api.protocol import VersionResponse
from serving.api.state import ServerState, current_state

bp = Blueprint("server", __name__)


def server_version() -> str:
    try:
        return version("jax-serve")
    except PackageNotFoundError:
        return "0.1.0"


@bp.get("/health")
async def health():
    # 503 until the engine has compiled its buckets, so that a load balancer
    # (or a test) can wait on it; 200 with an empty body after.
    if not current_state().engine.is_ready():
        raise APIError("The engine is still starting (compiling).", 503)
    return Response("", status=200)


@bp.route("/ping", methods=["GET", "POST"])
async def ping():
    return await health()


@bp.get("/version")
async def get_version():
    return json_response(VersionResponse(version=server_version()))


@bp.get("/metrics")
async def metrics():
    return Response(current_state().metrics.render(), status=200, content_type=CONTENT_TYPE)


@bp.route("/health_generate", methods=["GET", "POST"])
async def health_generate():
    state = current_state()
    state.check_ready()
    try:
        await state.engine.health_check()
    except Exception as exc:  # noqa: BLE001 - reported as 503
        raise APIError(f"health_generate failed: {exc}", 503) from None
    return Response("", status=200)


@bp.get("/get_model_info")
async def get_model_info():
    state = current_state()
    cfg = state.engine.hf_config
    return json_response({
        "model_path": state.engine.model_path,
        "is_generation": state.engine.task == "generate",
        "tokenizer_path": state.engine.model_path,
        "preferred_sampling_params": None,
        "weight_version": state.weight_version,
        "has_image_understanding": False,
        "has_audio_understanding": False,
        "model_type": cfg.get("model_type"),
        "architectures": cfg.get("architectures"),
    })


@bp.get("/get_server_info")
async def get_server_info():
    state = current_state()
    stats = state.engine.stats()
    info = state.server_args()
    info.update({
        "max_total_num_tokens": state.max_total_tokens(),
        "memory_pool_size": state.max_total_tokens(),
        "version": server_version(),
        "internal_states": [{"num_running": stats.get("num_running", 0),
                             "num_waiting": stats.get("num_waiting", 0),
                             "kv_cache_usage": stats.get("kv_cache_usage", 0.0),
                             "weight_version": state.weight_version}],
        "startup": state.engine.startup_info() or None,
    })
    return json_response(info)


@bp.get("/get_server_args")
async def get_server_args():
    return json_response(current_state().server_args())


@bp.get("/get_memory_pool_size")
async def get_memory_pool_size():
    return json_response(current_state().max_total_tokens())


@bp.get("/get_max_total_num_tokens")
async def get_max_total_num_tokens():
    return json_response({"max_total_num_tokens": current_state().max_total_tokens()})


@bp.get("/is_sleeping")
async def is_sleeping():
    return json_response({"is_sleeping": current_state().engine.is_sleeping()})


# ---- RTP-LLM -------------------------------------------------------------------------
@bp.get("/")
@bp.post("/health")
@bp.route("/status", methods=["GET", "POST"])
@bp.post("/health_check")
async def rtp_health():
    """RTP-LLM's health check: the JSON string ``"ok"``; 400 while not ready, as
    RTP-LLM answers a backend that is not healthy. (``GET /health`` is vLLM's.)"""
    if not current_state().engine.is_ready():
        return json_response({"error": " HTTP health check failed"}, 400)
    return json_response("ok")


def _cache_status(state: ServerState, latest: int = -1) -> dict[str, Any]:
    stats = state.engine.stats()
    page = int(stats.get("page_size", 1))
    return {"available_kv_cache": int(stats.get("num_free_pages", 0)) * page,
            "total_kv_cache": int(stats.get("num_total_pages", 0)) * page,
            "block_size": page, "version": state.cache_version,
            "cached_keys": [] if latest != state.cache_version else None}


async def _latest_cache_version() -> int:
    body = await body_dict(optional=True) if request.method == "POST" else {}
    latest = body.get("latest_cache_version", request.args.get("latest_cache_version", -1))
    if isinstance(latest, bool):
        latest = None
    try:
        return int(latest)
    except (TypeError, ValueError):
        raise APIError("`latest_cache_version` must be an integer", 400,
                       "latest_cache_version") from None


@bp.route("/worker_status", methods=["GET", "POST"])
@bp.route("/rtp_llm/worker_status", methods=["GET", "POST"])
async def rtp_worker_status():
    state = current_state()
    latest = await _latest_cache_version()
    stats = state.engine.stats()
    max_seqs = int(getattr(state.engine.config, "max_num_seqs", 0) or 0)
    return json_response({
        "role": "PDFUSION", "alive": state.engine.is_ready(),
        "available_concurrency": max(0, max_seqs - int(stats.get("num_running", 0))),
        "running_task_info": [{"num_running": stats.get("num_running", 0),
                               "num_waiting": stats.get("num_waiting", 0)}],
        "finished_task_list": [{"reason": k, "count": v}
                               for k, v in stats.get("requests_finished", {}).items()],
        "step_latency_ms": float(stats.get("last_step_seconds", 0.0)) * 1000,
        "iterate_count": int(stats.get("num_steps_total", 0)),
        "dp_size": 1, "tp_size": 1, "version": server_version(),
        "status_version": int(time.time() * 1000),
        "cache_status": _cache_status(state, latest)})


@bp.route("/cache_status", methods=["GET", "POST"])
async def rtp_cache_status():
    return json_response(_cache_status(current_state(), await _latest_cache_version()))
