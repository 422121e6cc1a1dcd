"""OpenAI routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions."""

from __future__ import annotations

import logging

from quart import Quart, Response

from serving.api.chat import create_chat_completion
from serving.api.completions import create_completion
from serving.api.protocol import (ChatCompletionRequest, CompletionRequest, ModelCard,
                                  ModelList, ModelPermission)
from serving.api.state import ServerState, parse_body

logger = logging.getLogger(__name__)


def _json(model) -> Response:
    return Response(model.model_dump_json(), status=200, content_type="application/json")


def register(app: Quart, state: ServerState) -> None:
    """Adds the OpenAI routes to ``app``."""

    @app.get("/v1/models")
    async def list_models():
        cards = [ModelCard(id=name, root=state.engine.model_path, max_model_len=state.max_model_len,
                           created=int(state.start_time), permission=[ModelPermission()])
                 for name in state.model_names]
        return _json(ModelList(data=cards))

    @app.post("/v1/completions")
    async def completions():
        req = await parse_body(CompletionRequest)
        rid = state.request_id()
        _log_request(state, rid, "completion", req.prompt)
        result = await create_completion(state, req, rid)
        return result if isinstance(result, Response) else _json(result)

    @app.post("/v1/chat/completions")
    async def chat_completions():
        req = await parse_body(ChatCompletionRequest)
        rid = state.request_id(req.request_id)
        _log_request(state, rid, "chat", [m.role for m in req.messages])
        result = await create_chat_completion(state, req, rid)
        return result if isinstance(result, Response) else _json(result)


def _log_request(state: ServerState, rid: str, kind: str, what) -> None:
    if not state.config.disable_log_requests:
        logger.info("received %s request %s: %.*s", kind, rid, state.config.max_log_len,
                    repr(what))
