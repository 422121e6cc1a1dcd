"""The HTTP app: ``create_app(engine, config)`` builds a Quart app with no globals.

A request's path through the server (ARCHITECTURE.md draws it): the auth hook
checks the API key (every route but the open ones); a Blueprint handler
(``serving.api.routes``) parses the JSON body into a pydantic model (a bad
body is a 400); its dialect module renames the fields into
``SamplingFields`` and ``request_mapping.build_request`` turns them into
prompt ids and ``SamplingParams`` with every check; ``generation.Generation``
adds one engine request per prompt and reads the engine's cumulative
snapshots back (``finals`` for an answer, ``Deltas`` for a stream), and the
dialect shapes them. Every error, including engine errors, unknown routes
and wrong methods, leaves as OpenAI-shaped JSON (``serving.api.errors``).
"""

from __future__ import annotations

import hmac
import logging
from typing import Optional

from quart import Quart, Response, request
from werkzeug.exceptions import HTTPException

from serving.api import openapi
from serving.api.errors import APIError, error_response, from_engine_error
from serving.api.metrics import ServerMetrics
from serving.api.routes import register_all
from serving.api.routes.server import server_version
from serving.api.state import ServerState
from serving.config import ServerConfig
from serving.engine.errors import EngineError
from serving.engine.protocol import EngineClient

logger = logging.getLogger(__name__)

# Routes that stay reachable without the API key (vLLM keeps health and metrics open).
OPEN_PATHS = frozenset({"/health", "/ping", "/metrics", "/version", "/openapi.json"})
# Admin routes outside the admin blueprint (they stop other clients' requests).
ADMIN_PATHS = frozenset({"/abort_request"})


def create_app(engine: EngineClient, config: Optional[ServerConfig] = None) -> Quart:
    """Builds the server app around ``engine``.

    Args:
        engine: an EngineClient (``serving.engine.protocol``): AsyncEngine,
            PoolingEngine, or the tests' FakeEngine.
        config: the ServerConfig; default values when None.

    Returns:
        The Quart app; serve it with hypercorn.
    """
    config = config or ServerConfig()
    names = config.served_model_names or (str(engine.model_path),)
    state = ServerState(engine=engine, config=config, model_names=tuple(names),
                        accepted_names=frozenset(names) | {str(engine.model_path)},
                        metrics=ServerMetrics(engine.stats, names[0]))
    app = Quart("jax_serve")
    app.config.update(RESPONSE_TIMEOUT=None, BODY_TIMEOUT=60,
                      MAX_CONTENT_LENGTH=32 * 1024 * 1024, PROVIDE_AUTOMATIC_OPTIONS=True)
    app.extensions["jax_serve"] = state

    _install_hooks(app, state)
    _install_error_handlers(app, state)
    register_all(app)
    openapi.register(app, "jax-serve", server_version())
    return app


def _install_hooks(app: Quart, state: ServerState) -> None:
    key, admin = state.config.api_key, state.config.admin_api_key
    expected = f"Bearer {key}".encode() if key else None
    expected_admin = f"Bearer {admin}".encode() if admin else expected

    @app.before_request
    async def check_api_key():
        if request.method == "OPTIONS" or request.path in OPEN_PATHS:
            return None
        is_admin = (request.blueprint == "admin" or request.path in ADMIN_PATHS)
        want = expected_admin if is_admin else expected
        if want is None:
            return None
        got = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(got, want):  # constant time; keys are never logged
            what = "admin API key" if is_admin and admin else "API key"
            return _error(state, APIError(f"Unauthorized: a valid {what} is required "
                                          "(Authorization: Bearer <key>).", 401))
        return None

    @app.after_request
    async def add_request_id(response: Response) -> Response:
        if state.config.enable_request_id_headers:
            rid = request.headers.get("X-Request-Id")
            if rid:
                response.headers["X-Request-Id"] = rid
        return response


def _error(state: ServerState, err: APIError) -> Response:
    headers = {}
    if err.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return error_response(err, headers)


def _install_error_handlers(app: Quart, state: ServerState) -> None:
    @app.errorhandler(APIError)
    async def api_error(err: APIError):
        if err.status >= 500 and err.status != 503:
            logger.error("%s %s -> %d: %s", request.method, request.path, err.status, err.message)
        return _error(state, err)

    @app.errorhandler(EngineError)
    async def engine_error(err: EngineError):
        return await api_error(from_engine_error(err))

    @app.errorhandler(HTTPException)
    async def http_error(err: HTTPException):
        status = err.code or 500
        if status == 404:
            message = f"Not Found: {request.path}"
        elif status == 405:
            message = f"Method {request.method} is not allowed for {request.path}"
        elif status == 413:
            message = "The request body is too large."
        else:
            message = err.description or err.name
        return _error(state, APIError(message, status))

    @app.errorhandler(Exception)
    async def unexpected(err: Exception):
        logger.exception("unhandled error on %s %s", request.method, request.path)
        return _error(state, APIError(f"Internal server error: {type(err).__name__}: {err}", 500))
