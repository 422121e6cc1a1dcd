"""GET /openapi.json: an OpenAPI 3.1 document generated from the pydantic models."""

from __future__ import annotations

from typing import Optional

from pydantic.json_schema import models_json_schema
from quart import Quart

from serving.api import protocol as p

# (method, path, summary, request model, response model, streams)
ROUTES: list[tuple[str, str, str, Optional[type], Optional[type], bool]] = [
    ("get", "/v1/models", "List served models", None, p.ModelList, False),
    ("post", "/v1/completions", "Create a completion", p.CompletionRequest,
     p.CompletionResponse, True),
    ("post", "/v1/chat/completions", "Create a chat completion", p.ChatCompletionRequest,
     p.ChatCompletionResponse, True),
    ("post", "/tokenize", "Tokenize a prompt or a chat", p.TokenizeRequest, p.TokenizeResponse,
     False),
    ("post", "/detokenize", "Decode token ids", p.DetokenizeRequest, p.DetokenizeResponse, False),
    ("get", "/health", "200 once the engine is ready, 503 before", None, None, False),
    ("get", "/version", "Server version", None, p.VersionResponse, False),
    ("get", "/metrics", "Prometheus metrics (text format)", None, None, False),
]

_STREAM_MODELS = {"/v1/completions": p.CompletionStreamResponse,
                  "/v1/chat/completions": p.ChatCompletionStreamResponse}


def build_openapi(title: str, version: str) -> dict:
    """Returns the OpenAPI document for every route in :data:`ROUTES`."""
    models = {p.ErrorResponse}
    for _, _, _, req, resp, _ in ROUTES:
        models.update(m for m in (req, resp) if m is not None)
    models.update(_STREAM_MODELS.values())
    mode_pairs = [(m, "validation" if m.__name__.endswith("Request") else "serialization")
                  for m in sorted(models, key=lambda m: m.__name__)]
    _, top = models_json_schema(mode_pairs, ref_template="#/components/schemas/{model}")
    schemas = top.get("$defs", {})

    def ref(model) -> dict:
        return {"$ref": f"#/components/schemas/{model.__name__}"}

    error = {"description": "Error", "content": {"application/json": {"schema": ref(p.ErrorResponse)}}}
    paths: dict = {}
    for method, path, summary, req, resp, streams in ROUTES:
        op: dict = {"summary": summary, "responses": {}}
        if req is not None:
            op["requestBody"] = {"required": True,
                                 "content": {"application/json": {"schema": ref(req)}}}
        ok: dict = {"description": "OK"}
        if resp is not None:
            ok["content"] = {"application/json": {"schema": ref(resp)}}
        if streams:
            ok.setdefault("content", {})["text/event-stream"] = {
                "schema": ref(_STREAM_MODELS[path]),
                "description": "with stream=true: `data: {chunk}` events, then `data: [DONE]`"}
        op["responses"]["200"] = ok
        for code in ("400", "401", "404", "503"):
            op["responses"][code] = error
        paths.setdefault(path, {})[method] = op
    return {"openapi": "3.1.0", "info": {"title": title, "version": version},
            "paths": paths, "components": {"schemas": schemas}}


def register(app: Quart, title: str, version: str) -> None:
    """Serves the document at /openapi.json (built once, on first use)."""
    cache: dict = {}

    @app.get("/openapi.json")
    async def openapi():
        if "doc" not in cache:
            cache["doc"] = build_openapi(title, version)
        return cache["doc"]
