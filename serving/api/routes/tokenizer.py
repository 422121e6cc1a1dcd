"""Tokenizer routes: /tokenize, /detokenize (vLLM, SGLang), /v1/encode (LMDeploy),
/tokenizer/encode and /chat/render, /v1/chat/render (RTP-LLM)."""

from __future__ import annotations

import json
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict
from quart import Blueprint, request

from serving.api.chat import message_dicts, render_chat
from serving.api.errors import APIError
from serving.api.http import body_dict, json_response, parse_body, validate
from serving.api.protocol import (DetokenizeRequest, DetokenizeResponse, TokenizeRequest,
                                  TokenizeResponse)
from serving.api.state import current_state

bp = Blueprint("tokenizer", __name__)


class RenderRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    messages: list[dict[str, Any]]
    add_generation_prompt: bool = True
    chat_template_kwargs: Optional[dict[str, Any]] = None


class EncodeRequest(BaseModel):
    """LMDeploy ``/v1/encode``."""

    model_config = ConfigDict(extra="allow")
    input: Any = None
    do_preprocess: bool = False
    add_bos: bool = True


@bp.post("/tokenize")
async def tokenize():
    state = current_state()
    req = await parse_body(TokenizeRequest)
    state.check_model(req.model)
    if (req.prompt is None) == (req.messages is None):
        raise APIError("exactly one of `prompt` or `messages` is required", 400, "prompt")
    if req.messages is not None:
        text = render_chat(state, message_dicts(req.messages),
                           add_generation_prompt=req.add_generation_prompt,
                           continue_final_message=req.continue_final_message,
                           chat_template=req.chat_template,
                           chat_template_kwargs=req.chat_template_kwargs, tools=req.tools)
        add_special = bool(req.add_special_tokens)
    else:
        text = req.prompt
        add_special = True if req.add_special_tokens is None else req.add_special_tokens
    ids = state.tokenizer.encode(text, add_special_tokens=add_special)
    resp = TokenizeResponse(count=len(ids), max_model_len=state.max_model_len, tokens=ids)
    if req.return_token_strs:
        resp.token_strs = state.tokenizer.convert_ids_to_tokens(ids)
    return json_response(resp.model_dump(exclude_none=True))


@bp.post("/detokenize")
async def detokenize():
    state = current_state()
    req = await parse_body(DetokenizeRequest)
    state.check_model(req.model)
    vocab = len(state.tokenizer)
    bad = [t for t in req.tokens if not 0 <= t < vocab]
    if bad:
        raise APIError(f"tokens contains out-of-vocab ids {bad[:5]}", 400, "tokens")
    text = state.tokenizer.decode(req.tokens, skip_special_tokens=req.skip_special_tokens)
    return json_response(DetokenizeResponse(prompt=text, text=text))


@bp.post("/v1/encode")
async def lmdeploy_encode():
    """LMDeploy: ``{input, do_preprocess, add_bos}`` -> ``{input_ids, length}``."""
    state = current_state()
    req = validate(EncodeRequest, await body_dict())
    if isinstance(req.input, str):
        texts, single = [req.input], True
    elif isinstance(req.input, list) and req.input and all(isinstance(t, str) for t in req.input):
        texts, single = req.input, False
    else:
        raise APIError("`input` must be a string or a non-empty list of strings", 400, "input")
    if req.do_preprocess:
        texts = [render_chat(state, message_dicts(t), add_generation_prompt=True,
                             continue_final_message=False, chat_template=None,
                             chat_template_kwargs=None) for t in texts]
    ids = [state.tokenizer.encode(t, add_special_tokens=req.add_bos) for t in texts]
    if single:
        return json_response({"input_ids": ids[0], "length": len(ids[0])})
    return json_response({"input_ids": ids, "length": [len(i) for i in ids]})


@bp.post("/tokenizer/encode")
async def rtp_tokenizer_encode():
    """RTP-LLM: ``{prompt}`` -> ``{token_ids, offset_mapping, tokens, error}``."""
    state = current_state()
    body = await body_dict()
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise APIError("`prompt` (a string) is required", 400, "prompt")
    tok = state.tokenizer
    enc = tok(prompt, return_offsets_mapping=getattr(tok, "is_fast", False))
    ids = list(enc["input_ids"])
    out = {"token_ids": ids, "offset_mapping": None, "tokens": tok.convert_ids_to_tokens(ids),
           "error": ""}
    if "offset_mapping" in enc:
        out["offset_mapping"] = [list(o) for o in enc["offset_mapping"]]
    return json_response(out)


@bp.route("/chat/render", methods=["GET", "POST"])
@bp.route("/v1/chat/render", methods=["GET", "POST"])
async def rtp_chat_render():
    """RTP-LLM: a chat request's messages -> the rendered prompt and its ids."""
    state = current_state()
    if request.method == "POST":
        body = await body_dict()
    else:
        try:
            body = {"messages": json.loads(request.args.get("messages", "null") or "null")}
        except json.JSONDecodeError as exc:
            raise APIError(f"`messages` is not valid JSON: {exc}", 400, "messages") from None
    req = validate(RenderRequest, body)
    text = render_chat(state, message_dicts(req.messages),
                       add_generation_prompt=req.add_generation_prompt,
                       continue_final_message=False, chat_template=None,
                       chat_template_kwargs=req.chat_template_kwargs)
    ids = state.tokenizer.encode(text, add_special_tokens=False)
    return json_response({"rendered_prompt": text, "prompt": text, "input_ids": ids,
                          "input_urls": []})
