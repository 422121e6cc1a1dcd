"""Tokenizer routes: /tokenize, /detokenize (vLLM, SGLang), /v1/encode (LMDeploy),
/tokenizer/encode and /chat/render, /v1/chat/render (RTP-LLM)."""

from __future__ import annotations

import json
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict
from quart import Blueprint, request

from serving.api.chat import message_dicts, render_chat
from serving.api.errors import APIError, dialect_errors
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
    with dialect_errors("lmdeploy"):
        req = validate(EncodeRequest, await body_dict())
        texts, single = _encode_inputs(req.input)
    if req.do_preprocess:
        texts = [render_chat(state, message_dicts(t), add_generation_prompt=True,
                             continue_final_message=False, chat_template=None,
                             chat_template_kwargs=None) for t in texts]
    ids = [state.tokenizer.encode(t, add_special_tokens=req.add_bos) for t in texts]
    if single:
        return json_response({"input_ids": ids[0], "length": len(ids[0])})
    return json_response({"input_ids": ids, "length": [len(i) for i in ids]})


def _encode_inputs(inp) -> tuple[list[str], bool]:
    if isinstance(inp, str):
        return [inp], True
    if isinstance(inp, list) and inp and all(isinstance(t, str) for t in inp):
        return inp, False
    raise APIError("`input` must be a string or a non-empty list of strings", 400, "input")


@bp.post("/tokenizer/encode")
async def rtp_tokenizer_encode():
    """RTP-LLM: ``{prompt, return_offsets_mapping}`` -> ``{token_ids, tokens, error}``.

    ``tokens`` are the decoded pieces of each id; with ``return_offsets_mapping``
    the answer has ``offset_mapping`` and an empty ``tokens``, as RTP-LLM's.
    """
    state = current_state()
    with dialect_errors("rtp"):
        body = await body_dict()
        prompt, offsets = body.get("prompt"), body.get("return_offsets_mapping", False)
        if not isinstance(prompt, str):
            raise APIError("`prompt` (a string) is required", 400, "prompt")
        if not isinstance(offsets, bool):
            raise APIError("`return_offsets_mapping` must be a boolean", 400,
                           "return_offsets_mapping")
    tok = state.tokenizer
    if offsets and getattr(tok, "is_fast", False):
        enc = tok(prompt, return_offsets_mapping=True)
        return json_response({"token_ids": list(enc["input_ids"]),
                              "offset_mapping": [list(o) for o in enc["offset_mapping"]],
                              "tokens": [], "error": ""})
    ids = tok.encode(prompt)
    return json_response({"token_ids": ids, "tokens": [tok.decode([i]) for i in ids],
                          "error": ""})


@bp.route("/chat/render", methods=["GET", "POST"])
@bp.route("/v1/chat/render", methods=["GET", "POST"])
async def rtp_chat_render():
    """RTP-LLM: a chat request -> its ``DebugInfo`` (the rendered prompt and its ids)."""
    state = current_state()
    with dialect_errors("rtp"):
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
    tok = state.tokenizer
    eos = getattr(tok, "eos_token_id", None)
    return json_response({
        "input_prompt": text, "input_ids": tok.encode(text, add_special_tokens=False),
        "input_urls": [], "tokenizer_info": type(tok).__name__,
        "max_seq_len": state.max_model_len, "eos_token_id": eos,
        "stop_word_ids_list": [[eos]] if eos is not None else [], "stop_words_list": [],
        "renderer_info": {"class_name": "ChatTemplateRenderer",
                          "renderer_model_type": state.engine.hf_config.get("model_type"),
                          "extra_stop_word_ids_list": [], "extra_stop_words_list": [],
                          "template": state.chat_template()},
        "generate_config": None, "output_ids": None, "raw_output": None})
