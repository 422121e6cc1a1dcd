"""HTTP server configuration (frozen, validated); argparse lives in serving/main.py."""

from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """Settings of the HTTP layer; the engine's own settings are in EngineConfig.

    Attributes:
        host: interface to bind; None binds every interface (vLLM's default).
        port: TCP port.
        served_model_names: names the API accepts in ``model``; the first is the
            one responses report. Empty: the model path.
        api_key: when set, every route except the open ones (``/health``,
            ``/metrics``, ``/version``, ``/ping``, ``/openapi.json``) needs
            ``Authorization: Bearer <key>``.
        admin_api_key: when set, the admin routes (``serving.api.routes.admin``
            and ``/abort_request``) need ``Authorization: Bearer <admin key>``
            and no longer take ``api_key``; unset, they take ``api_key``.
        chat_template: a Jinja chat template (already read from a file if a path
            was given) overriding the tokenizer's; None keeps the tokenizer's.
        response_role: the role of generated chat messages.
        enable_request_id_headers: echo ``X-Request-Id`` in responses.
        disable_log_requests: do not log each request's arrival and end.
        max_log_len: characters of a prompt shown in request logs.
        max_n: largest ``n``/``best_of`` a request may ask for.
        root_path: ASGI root path when served behind a path-prefixing proxy.
        api_dialect: ``--api-dialect``: "vllm" (default) or "sglang" shapes on
            the shared rerank paths; "lmdeploy" sends ``/generate`` bodies of
            shared fields only (``input_ids``, ...) to LMDeploy's parser.
    """

    host: Optional[str] = None
    port: int = 8000
    served_model_names: tuple[str, ...] = ()
    api_key: Optional[str] = None
    admin_api_key: Optional[str] = None
    chat_template: Optional[str] = None
    response_role: str = "assistant"
    enable_request_id_headers: bool = False
    disable_log_requests: bool = False
    max_log_len: int = 200
    max_n: int = 128
    root_path: str = ""
    api_dialect: str = "vllm"

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty")
        if self.api_dialect not in ("vllm", "sglang", "lmdeploy"):
            raise ValueError(f"api_dialect must be vllm, sglang or lmdeploy, got "
                             f"{self.api_dialect!r}")
        if self.admin_api_key is not None and not self.admin_api_key:
            raise ValueError("admin_api_key must not be empty")
        if self.max_n < 1:
            raise ValueError("max_n must be at least 1")
        object.__setattr__(self, "served_model_names", tuple(self.served_model_names))
