"""Request bodies in, JSON out: the helpers every route uses.

A body that is empty, not JSON, not an object, or that fails its pydantic
model is a 400 naming the first bad field, in the OpenAI error shape.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

import pydantic
from quart import Response, request

from serving.api.errors import APIError

T = TypeVar("T", bound=pydantic.BaseModel)


async def body_dict(optional: bool = False) -> dict[str, Any]:
    """The request body as a JSON object.

    Args:
        optional: an empty body reads as ``{}`` instead of a 400.

    Raises:
        APIError: 400 for an empty (unless optional) or malformed body, or a non-object.
    """
    raw = await request.get_data(as_text=False)
    if not raw or not raw.strip():
        if optional:
            return {}
        raise APIError("The request body is empty; expected a JSON object.", 400)
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(f"The request body is not valid JSON: {exc}", 400) from None
    if not isinstance(obj, dict):
        raise APIError(f"The request body must be a JSON object, got {type(obj).__name__}.", 400)
    return obj


def validate(model_cls: type[T], obj: dict[str, Any]) -> T:
    """``model_cls.model_validate(obj)`` with pydantic errors as a 400."""
    try:
        return model_cls.model_validate(obj)
    except pydantic.ValidationError as exc:
        raise validation_error(exc) from None


async def parse_body(model_cls: type[T], optional: bool = False) -> T:
    """Reads the body as JSON and validates it into ``model_cls`` (400 on failure)."""
    return validate(model_cls, await body_dict(optional))


def validation_error(exc: pydantic.ValidationError) -> APIError:
    """Turns a pydantic ValidationError into a 400 naming the first bad field."""
    parts, param = [], None
    for err in exc.errors(include_url=False)[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()))
        if param is None and err.get("loc"):
            param = str(err["loc"][0])
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    return APIError("; ".join(parts) or "Invalid request.", 400, param)


def json_response(obj: Any, status: int = 200) -> Response:
    """``obj`` as JSON: a pydantic model (unset-None fields kept) or plain data."""
    if isinstance(obj, pydantic.BaseModel):
        return Response(obj.model_dump_json(), status=status, content_type="application/json")
    return Response(json.dumps(obj), status=status, content_type="application/json")


def text_response(text: str = "", status: int = 200) -> Response:
    return Response(text, status=status, content_type="text/plain")
