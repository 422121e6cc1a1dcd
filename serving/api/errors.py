"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}``.

Every failure the HTTP layer reports goes through :class:`APIError`, so a client
never sees an HTML page or a bare 500. ``type`` follows vLLM
("BadRequestError", "NotFoundError", ...) and ``code`` is the HTTP status.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any, Optional

from quart import Response

_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    408: "RequestTimeoutError",
    413: "RequestEntityTooLargeError",
    415: "UnsupportedMediaTypeError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
    500: "InternalServerError",
    501: "NotImplementedError",
    503: "ServiceUnavailableError",
}


class APIError(Exception):
    """An error answered to the client as OpenAI-shaped JSON.

    Args:
        message: human-readable explanation.
        status: HTTP status code.
        param: the request field at fault, if any.
        err_type: overrides the type derived from ``status``.
    """

    def __init__(self, message: str, status: int = 400, param: Optional[str] = None,
                 err_type: Optional[str] = None):
        super().__init__(message)
        self.message = message
        self.status = int(status)
        self.param = param
        self.err_type = err_type or error_type(self.status)


def error_type(status: int) -> str:
    """Returns the vLLM-style error type name for an HTTP status."""
    if status in _TYPES:
        return _TYPES[status]
    try:
        return HTTPStatus(status).phrase.replace(" ", "") + "Error"
    except ValueError:
        return "Error"


def error_body(message: str, status: int, param: Optional[str] = None,
               err_type: Optional[str] = None) -> dict[str, Any]:
    """Builds the OpenAI error body."""
    return {"error": {"message": message, "type": err_type or error_type(status),
                      "param": param, "code": status}}


def error_response(err: APIError, headers: Optional[dict[str, str]] = None) -> Response:
    """Turns an APIError into a JSON response."""
    body = json.dumps(error_body(err.message, err.status, err.param, err.err_type))
    return Response(body, status=err.status, content_type="application/json",
                    headers=headers or {})


def bad_request(message: str, param: Optional[str] = None) -> APIError:
    return APIError(message, 400, param)


def not_supported(param: str) -> APIError:
    return APIError(f"`{param}` is not supported yet by this server.", 400, param)
