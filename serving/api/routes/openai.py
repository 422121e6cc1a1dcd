"""OpenAI routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions."""

from __future__ import annotations

import logging

from quart import Blueprint, Response

from serving.api.chat import create_chat_completion
from serving.api.completions import create_completion
from serving.api.http import json_response, parse_body
from serving.api.protocol import (ChatCompletionRequest, CompletionRequest, ModelCard,
                                  ModelList, ModelPermission)
from serving.api.state import ServerState, current_state

logger = logging.getLogger(__name__)
bp = Blueprint("openai", __name__)


@bp.get("/v1/models")
async def list_models():
    state = current_state()
    cards = [ModelCard(id=name, root=state.engine.model_path, max_model_len=state.max_model_len,
                       created=int(state.start_time), permission=[ModelPermission()])
             for name in state.model_names]
    return json_response(ModelList(data=cards))


@bp.post("/v1/completions")
async def completions():
    state = current_state()
    req = await parse_body(CompletionRequest)
    state.require_task("/v1/completions", "generate")
    rid = state.request_id()
    _log_request(state, rid, "completion", req.prompt)
    result = await create_completion(state, req, rid)
    return result if isinstance(result, Response) else json_response(result)


@bp.post("/v1/chat/completions")
async def chat_completions():
    state = current_state()
    req = await parse_body(ChatCompletionRequest)
    state.require_task("/v1/chat/completions", "generate")
    rid = state.request_id(req.request_id)
    _log_request(state, rid, "chat", req.messages if isinstance(req.messages, str)
                 else [m.role for m in req.messages])
    result = await create_chat_completion(state, req, rid)
    return result if isinstance(result, Response) else json_response(result)


def _log_request(state: ServerState, rid: str, kind: str, what) -> None:
    if not state.config.disable_log_requests:
        logger.info("received %s request %s: %.*s", kind, rid, state.config.max_log_len,
                    repr(what))
