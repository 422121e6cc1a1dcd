"""Native generate routes: ``/generate`` (SGLang or LMDeploy body), RTP-LLM's
``POST /``, and ``/abort_request`` (SGLang ``rid``, LMDeploy ``session_id`` /
``abort_all``; it also stops OpenAI streams started with a ``session_id``)."""

from __future__ import annotations

from typing import Optional, Union

from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt
from quart import Blueprint, Response

from serving.api import rtp
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
    parse = parse_lmdeploy if dialect_of(body, tie) == "lmdeploy" else parse_sglang
    result = await run_generate(state, parse(state, body, base))
    return result if isinstance(result, Response) else json_response(result)


@bp.post("/")
async def rtp_generate():
    state = current_state()
    req = validate(rtp.RTPRequest, await body_dict())
    state.require_task("POST /", "generate")
    result = await rtp.generate(state, req, state.request_id())
    return result if isinstance(result, Response) else json_response(result)


@bp.post("/abort_request")
async def abort_request():
    state = current_state()
    req = await parse_body(AbortRequest, optional=True)
    keys = set(state.running) if req.abort_all else set()
    if isinstance(req.rid, str):
        keys.add(req.rid)
    elif isinstance(req.rid, list):
        keys.update(map(str, req.rid))
    if req.session_id is not None and req.session_id >= 0:
        keys.add(str(req.session_id))
    for key in keys:
        gen = state.running.pop(key, None)
        if gen is not None:
            gen.abort()
        elif not req.abort_all:
            state.engine.abort(key)  # an engine id of another route
    return json_response({})
