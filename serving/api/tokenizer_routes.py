"""Tokenizer routes: POST /tokenize and POST /detokenize (vLLM and SGLang shapes)."""

from __future__ import annotations

from quart import Quart, Response

from serving.api.chat import message_dicts, render_chat
from serving.api.errors import APIError
from serving.api.protocol import (DetokenizeRequest, DetokenizeResponse, TokenizeRequest,
                                  TokenizeResponse)
from serving.api.state import ServerState, parse_body


def register(app: Quart, state: ServerState) -> None:
    """Adds /tokenize and /detokenize to ``app``."""

    @app.post("/tokenize")
    async def tokenize():
        req = await parse_body(TokenizeRequest)
        state.check_model(req.model)
        tok = state.tokenizer
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
        ids = tok.encode(text, add_special_tokens=add_special)
        resp = TokenizeResponse(count=len(ids), max_model_len=state.max_model_len, tokens=ids)
        if req.return_token_strs:
            resp.token_strs = tok.convert_ids_to_tokens(ids)
        return Response(resp.model_dump_json(exclude_none=True), content_type="application/json")

    @app.post("/detokenize")
    async def detokenize():
        req = await parse_body(DetokenizeRequest)
        state.check_model(req.model)
        vocab = len(state.tokenizer)
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(f"tokens contains out-of-vocab ids {bad[:5]}", 400, "tokens")
        text = state.tokenizer.decode(req.tokens, skip_special_tokens=req.skip_special_tokens)
        return Response(DetokenizeResponse(prompt=text, text=text).model_dump_json(),
                        content_type="application/json")
