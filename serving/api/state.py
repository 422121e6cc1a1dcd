"""What every route needs: the engine, the server config, metrics, and checks.

``create_app`` builds one :class:`ServerState` and keeps it in
``app.extensions``; the module-level route handlers reach it with
:func:`current_state` (there are no module globals). The engine is an
``EngineClient`` (``serving.engine.protocol``): the app calls only its
members, never probes for them.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Optional

from quart import current_app, request

from serving.api.errors import APIError
from serving.api.metrics import ServerMetrics
from serving.api.protocol import random_uuid
from serving.config import ServerConfig
from serving.engine.protocol import EngineClient

TASK_NAMES = {"generate": "a generation model", "embed": "an embedding model",
              "score": "a cross-encoder (score) model", "classify": "a classification model"}


@dataclasses.dataclass
class ServerState:
    """Shared state of one app.

    Attributes:
        engine: the EngineClient.
        config: the ServerConfig.
        metrics: the app's Prometheus metrics.
        model_names: the served names (listed by /v1/models); the first is reported.
        accepted_names: names accepted in a request's ``model`` (the served
            names and the model path).
        start_time: when the app was built (unix seconds).
        running: abort keys (SGLang ``rid``, LMDeploy ``session_id``) -> the
            Generation they stop, for ``/abort_request``.
        weight_version: reported by ``/get_model_info``; set by weight updates.
        cache_version: bumped whenever the KV/prefix cache is flushed or rebuilt.
    """

    engine: EngineClient
    config: ServerConfig
    metrics: ServerMetrics
    model_names: tuple[str, ...]
    accepted_names: frozenset[str] = frozenset()
    start_time: float = dataclasses.field(default_factory=time.time)
    running: dict[str, Any] = dataclasses.field(default_factory=dict)
    weight_version: str = "default"
    cache_version: int = 0

    @property
    def model_name(self) -> str:
        return self.model_names[0]

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return int(self.engine.max_model_len)

    @property
    def vocab_size(self) -> int:
        return int(self.engine.model_config.vocab_size)

    def check_model(self, name: Optional[str]) -> str:
        """Returns the name to report; raises 404 for a model this server does not serve."""
        if name is None or name == "" or name in self.model_names or name in self.accepted_names:
            return self.model_name
        raise APIError(f"The model `{name}` does not exist.", 404, "model")

    def check_ready(self) -> None:
        """503 while the engine starts or sleeps."""
        if self.engine.is_sleeping():
            raise APIError("The engine is sleeping; POST /wakeup first.", 503)
        if not self.engine.is_ready():
            raise APIError("The engine is still starting (compiling); retry shortly.", 503)

    def require_task(self, route: str, *tasks: str) -> str:
        """Raises a 400 naming the loaded model's kind when ``route`` does not fit it."""
        task = self.engine.task
        if task not in tasks:
            wanted = " or ".join(TASK_NAMES[t] for t in tasks)
            raise APIError(f"{route} needs {wanted}, but this server runs {TASK_NAMES[task]} "
                           f"({self.model_name}).", 400)
        return task

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

    def server_args(self) -> dict[str, Any]:
        """Server and engine settings, as ``/get_server_info`` reports them (no secrets)."""
        out: dict[str, Any] = {}
        cfg = self.engine.config
        if dataclasses.is_dataclass(cfg):
            out.update(dataclasses.asdict(cfg))
        server = dataclasses.asdict(self.config)
        for secret in ("api_key", "admin_api_key", "chat_template"):
            server.pop(secret, None)
        out.update(server)
        out["model_path"] = self.engine.model_path
        out["tokenizer_path"] = self.engine.model_path
        out["served_model_name"] = self.model_name
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    def max_total_tokens(self) -> int:
        stats = self.engine.stats()
        return int(stats.get("num_total_pages", 0)) * int(stats.get("page_size", 1))


def current_state() -> ServerState:
    """The ServerState of the app serving the current request."""
    return current_app.extensions["jax_serve"]
