"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}``.

Every failure the HTTP layer reports goes through :class:`APIError`, so a client
never sees an HTML page or a bare 500. ``type`` follows vLLM
("BadRequestError", "NotFoundError", ...) and ``code`` is the HTTP status.
:func:`from_engine_error` is the one mapping of the engine's errors
(``serving.engine.errors``) to statuses, used by every route family.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any, Optional

from quart import Response

from serving.engine.errors import (EngineError, EngineNotReadyError, EngineOverloadedError,
                                   RequestFailedError, UnsupportedOperationError,
                                   ValidationError)

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


RETRY_AFTER_SECONDS = 1  # what a 503 for a full queue asks clients to wait
# RTP-LLM's error codes (rtp_llm/config/exceptions.py) by HTTP status
_RTP_CODES = {400: (605, "INVALID_PARAMS"), 404: (605, "INVALID_PARAMS"),
              500: (514, "UNKNOWN_ERROR"), 503: (514, "UNKNOWN_ERROR")}


class APIError(Exception):
    """An error answered to the client as JSON, in the shape of the route's dialect.

    Args:
        message: human-readable explanation.
        status: HTTP status code.
        param: the request field at fault, if any.
        err_type: overrides the type derived from ``status``.
        shape: "openai" (vLLM's nested ``{"error": {...}}``, the default),
            "lmdeploy" (LMDeploy's flat ``{"object": "error", ...}``) or "rtp"
            (RTP-LLM's ``{"error_code", "error_code_str", "message"}``); routes of
            those dialects set it with :func:`dialect_errors`.
        headers: extra response headers (``Retry-After`` on a full queue).
    """

    def __init__(self, message: str, status: int = 400, param: Optional[str] = None,
                 err_type: Optional[str] = None, shape: str = "openai",
                 headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.headers = dict(headers or {})
        self.message = message
        self.status = int(status)
        self.param = param
        self.err_type = err_type or error_type(self.status)
        self.shape = shape

    def body(self) -> dict[str, Any]:
        """The JSON body in this error's shape."""
        if self.shape == "lmdeploy":
            kind = {401: "authentication_error", 404: "not_found_error"}.get(
                self.status, "server_error" if self.status >= 500 else "invalid_request_error")
            return {"object": "error", "message": self.message, "type": kind,
                    "param": self.param, "code": self.status}
        if self.shape == "rtp":
            code, name = _RTP_CODES.get(self.status, (514, "UNKNOWN_ERROR"))
            return {"error_code": code, "error_code_str": f"{code}_{name}",
                    "message": self.message}
        return error_body(self.message, self.status, self.param, self.err_type)


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
    return Response(json.dumps(err.body()), status=err.status, content_type="application/json",
                    headers={**err.headers, **(headers or {})})


class dialect_errors:
    """``with dialect_errors("lmdeploy"):`` -- APIErrors and engine errors raised
    inside leave in that dialect's error shape."""

    def __init__(self, shape: str):
        self.shape = shape

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        if isinstance(exc, EngineError):
            raise _shaped(from_engine_error(exc), self.shape) from None
        if isinstance(exc, APIError):
            exc.shape = self.shape
        return False


def _shaped(err: APIError, shape: str) -> APIError:
    err.shape = shape
    return err


def not_supported(param: str) -> APIError:
    return APIError(f"`{param}` is not supported yet by this server.", 400, param)


def from_engine_error(exc: BaseException) -> APIError:
    """The APIError for an engine error: the same status on every route.

    ValidationError -> 400 naming the parameter; UnsupportedOperationError ->
    400; EngineOverloadedError / EngineNotReadyError -> 503;
    RequestFailedError (a failure inside the engine) -> 500. Anything else is
    not an engine error on purpose and is re-raised by the caller.
    """
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ValidationError):
        return APIError(str(exc), 400, exc.param)
    if isinstance(exc, UnsupportedOperationError):
        return APIError(str(exc), 400)
    if isinstance(exc, EngineOverloadedError):
        return APIError(f"The server is overloaded: {exc}", 503,
                        headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
    if isinstance(exc, EngineNotReadyError):
        return APIError(f"The engine is not ready: {exc}", 503)
    if isinstance(exc, RequestFailedError):
        return APIError(f"The engine failed on this request: {exc}", 500)
    if isinstance(exc, EngineError):
        return APIError(str(exc), 500)
    raise TypeError(f"not an engine error: {exc!r}")


def request_failed(message: str) -> APIError:
    """The error of a request that failed inside the engine (its output's ``error``)."""
    return from_engine_error(RequestFailedError(message))
