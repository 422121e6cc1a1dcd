"""Native generate routes: ``/generate`` (SGLang or LMDeploy body), RTP-LLM's
``POST /``, and ``/abort_request`` (SGLang ``rid``, LMDeploy ``session_id`` /
``abort_all``; it also stops OpenAI streams started with a ``session_id``).

LMDeploy bodies fail in LMDeploy's flat error shape and RTP-LLM's in its
``error_code`` shape (``errors.dialect_errors``); SGLang's in the OpenAI shape,
whose ``{"error": {"message"}}`` SGLang clients read."""

from __future__ import annotations

from typing import Optional, Union

from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt
from quart import Blueprint, Response

from serving.api import rtp
from serving.api.errors import APIError, dialect_errors
from serving.api.http import body_dict, json_response, parse_body, validate
from serving.api.native_generate import dialect_of, parse_lmdeploy, parse_sglang, run_generate
from serving.api.state import current_state

bp = Blueprint("generate", __name__)


class AbortRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    rid: Optional[Union[str, list[str]]] = None
    session_id: Optional[StrictInt] = -1
    abort_all: StrictBool = False


@bp.post("/generate")
async def generate():
    state = current_state()
    body = await body_dict()
    state.require_task("/generate", "generate")
    base = state.request_id()
    tie = "lmdeploy" if state.config.api_dialect == "lmdeploy" else "sglang"
    dialect = dialect_of(body, tie)
    parse = parse_lmdeploy if dialect == "lmdeploy" else parse_sglang
    with dialect_errors("lmdeploy" if dialect == "lmdeploy" else "openai"):
        result = await run_generate(state, parse(state, body, base))
    return result if isinstance(result, Response) else json_response(result)


@bp.post("/")
async def rtp_generate():
    state = current_state()
    with dialect_errors("rtp"):
        req = validate(rtp.RTPRequest, await body_dict())
        state.require_task("POST /", "generate")
        result = await rtp.generate(state, req, state.request_id())
    return result if isinstance(result, Response) else json_response(result)


@bp.post("/abort_request")
async def abort_request():
    """Aborts by SGLang ``rid`` (any engine id), LMDeploy ``session_id`` or ``abort_all``.

    Answers 200 with an empty body, as both do; an unknown ``session_id`` is
    LMDeploy's 400 ``Session N not found.``.
    """
    state = current_state()
    with dialect_errors("lmdeploy"):
        req = await parse_body(AbortRequest, optional=True)
        session = str(req.session_id) if req.session_id is not None and req.session_id >= 0 \
            else None
        if session is not None and not req.abort_all and session not in state.running:
            raise APIError(f"Session {req.session_id} not found.", 400, "session_id")
    keys = set(state.running) if req.abort_all else set()
    keys.update([req.rid] if isinstance(req.rid, str) else map(str, req.rid or []))
    if session is not None:
        keys.add(session)
    for key in keys:
        gen = state.running.pop(key, None)
        if gen is not None:
            gen.abort()
        elif not req.abort_all:
            state.engine.abort(key)  # an engine id of another route
    return Response("", status=200)
