"""What every route needs: the engine, the server config, metrics, helpers.

One :class:`ServerState` is built by ``create_app`` and handed to each route
module's ``register`` function; there are no module globals.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Any, Optional, TypeVar

import pydantic
from quart import request

from serving.api.errors import APIError
from serving.api.metrics import ServerMetrics
from serving.api.protocol import random_uuid
from serving.config import ServerConfig

logger = logging.getLogger(__name__)

T = TypeVar("T", bound=pydantic.BaseModel)


@dataclasses.dataclass
class ServerState:
    """Shared state of one app.

    Attributes:
        engine: the AsyncEngine (or any object with its interface).
        config: the ServerConfig.
        metrics: the app's Prometheus metrics.
        model_names: the served names (listed by /v1/models); the first is reported.
        accepted_names: names accepted in a request's ``model`` (the served
            names and the model path).
        start_time: when the app was built (unix seconds).
    """

    engine: Any
    config: ServerConfig
    metrics: ServerMetrics
    model_names: tuple[str, ...]
    accepted_names: frozenset[str] = frozenset()
    start_time: float = dataclasses.field(default_factory=time.time)

    @property
    def model_name(self) -> str:
        return self.model_names[0]

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return int(self.engine.max_model_len)

    def check_model(self, name: Optional[str]) -> str:
        """Returns the name to report; raises 404 for a model this server does not serve."""
        if name is None or name == "" or name in self.model_names or name in self.accepted_names:
            return self.model_name
        raise APIError(f"The model `{name}` does not exist.", 404, "model")

    def check_ready(self) -> None:
        if not self.engine.is_ready():
            raise APIError("The engine is still starting (compiling); retry shortly.", 503)

    def request_id(self, body_id: Optional[str] = None) -> str:
        """The base request id: the X-Request-Id header, else the body's
        ``request_id`` (vLLM's chat field), else a fresh uuid."""
        for rid in (request.headers.get("X-Request-Id"), body_id):
            if rid and len(rid) <= 256 and rid.isprintable():
                return rid
        return random_uuid()

    def chat_template(self, override: Optional[str] = None) -> Optional[str]:
        """The template to render chats with: request > --chat-template > tokenizer."""
        return override or self.config.chat_template or getattr(
            self.tokenizer, "chat_template", None)


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


async def parse_body(model_cls: type[T]) -> T:
    """Reads the request body as JSON and validates it into ``model_cls``.

    Raises:
        APIError: 400 for an empty or malformed body, a non-object, or a field
            with the wrong type or out of range (``param`` names the field).
    """
    obj = await body_dict()
    try:
        return model_cls.model_validate(obj)
    except pydantic.ValidationError as exc:
        raise validation_error(exc) from None


def validation_error(exc: pydantic.ValidationError) -> APIError:
    """Turns a pydantic ValidationError into a 400 naming the first bad field."""
    parts, param = [], None
    for err in exc.errors(include_url=False)[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()))
        if param is None and err.get("loc"):
            param = str(err["loc"][0])
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    return APIError("; ".join(parts) or "Invalid request.", 400, param)
