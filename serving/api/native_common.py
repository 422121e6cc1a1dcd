"""Helpers shared by the native (SGLang, LMDeploy, RTP-LLM) and pooling routes.

The native routes take loosely-typed bodies (one path, several dialects), so
they read the body as a dict and validate the fields they use; every failure
is an OpenAI-shaped 4xx from ``serving.api.errors``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any, Optional, TypeVar

import pydantic
from quart import Quart, Response

from serving.api.errors import APIError
from serving.api.state import ServerState, body_dict, validation_error  # noqa: F401

logger = logging.getLogger(__name__)

T = TypeVar("T", bound=pydantic.BaseModel)

TASK_NAMES = {"generate": "a generation model", "embed": "an embedding model",
              "score": "a cross-encoder (score) model", "classify": "a classification model"}


@dataclasses.dataclass
class NativeState:
    """Per-app state of the native routes (one per ``create_app``).

    Attributes:
        running: request id (SGLang ``rid`` / LMDeploy ``session_id``) -> its
            Generation, for ``/abort_request``.
        weight_version: reported by ``/get_model_info``; set by weight updates.
        cache_version: bumped whenever the KV/prefix cache is flushed or rebuilt.
        api_dialect: ``--api-dialect``: "vllm" (default) or "sglang" shapes on
            the shared rerank paths; "lmdeploy" sends ``/generate`` bodies of
            shared fields only (``input_ids``, ...) to LMDeploy's parser.
    """

    running: dict[str, Any] = dataclasses.field(default_factory=dict)
    weight_version: str = "default"
    cache_version: int = 0
    api_dialect: str = "vllm"


def native_state(app: Quart) -> NativeState:
    """The app's NativeState, created on first use."""
    st = app.extensions.get("jax_serve_native")
    if st is None:
        st = app.extensions["jax_serve_native"] = NativeState()
    return st


def json_response(obj: Any, status: int = 200) -> Response:
    return Response(json.dumps(obj), status=status, content_type="application/json")


def validate(model_cls: type[T], obj: dict[str, Any]) -> T:
    """``model_cls.model_validate(obj)`` with pydantic errors as a 400."""
    try:
        return model_cls.model_validate(obj)
    except pydantic.ValidationError as exc:
        raise validation_error(exc) from None


def task_of(state: ServerState) -> str:
    """"generate", "embed", "score" or "classify": what the loaded model does."""
    return getattr(state.engine, "task", "generate")


def require_task(state: ServerState, route: str, *tasks: str) -> str:
    """Raises a 400 naming the loaded model's kind when ``route`` does not fit it."""
    task = task_of(state)
    if task not in tasks:
        wanted = " or ".join(TASK_NAMES[t] for t in tasks)
        raise APIError(f"{route} needs {wanted}, but this server runs {TASK_NAMES[task]} "
                       f"({state.model_name}).", 400)
    return task


def hf_config(engine: Any) -> dict[str, Any]:
    """The Hugging Face config dict of the loaded model (empty if unknown)."""
    cfg = getattr(engine, "hf_config", None)
    if cfg is None:
        loaded = getattr(getattr(engine, "engine", None), "loaded", None)
        cfg = getattr(loaded, "hf_config", None)
    return dict(cfg or {})


def engine_config_dict(state: ServerState) -> dict[str, Any]:
    """Server and engine settings, as ``/get_server_info`` reports them (no secrets)."""
    out: dict[str, Any] = {}
    cfg = getattr(state.engine, "config", None)
    if dataclasses.is_dataclass(cfg):
        out.update(dataclasses.asdict(cfg))
    server = dataclasses.asdict(state.config)
    server.pop("api_key", None)
    server.pop("chat_template", None)
    out.update(server)
    out["model_path"] = state.engine.model_path
    out["tokenizer_path"] = state.engine.model_path
    out["served_model_name"] = state.model_name
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def engine_errors():
    """(EngineNotReadyError, EngineOverloadedError) or empty tuples."""
    try:
        from serving.engine.types import EngineNotReadyError, EngineOverloadedError
        return EngineNotReadyError, EngineOverloadedError
    except ImportError:
        return (), ()


def check_awake(state: ServerState) -> None:
    """503 while the engine sleeps or starts."""
    sleeping = getattr(state.engine, "is_sleeping", None)
    if callable(sleeping) and sleeping():
        raise APIError("The engine is sleeping; POST /wakeup first.", 503)
    state.check_ready()


def optional_int(obj: dict, key: str, default: Optional[int] = None, *, minimum: int = 0):
    val = obj.get(key, default)
    if val is None:
        return default
    if isinstance(val, bool) or not isinstance(val, int) or val < minimum:
        raise APIError(f"`{key}` must be an integer >= {minimum}, got {val!r}", 400, key)
    return val
