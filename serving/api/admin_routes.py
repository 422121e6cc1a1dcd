"""Server-state routes: /health, /ping, /version, /metrics."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from quart import Quart, Response

from serving.api.errors import APIError
from serving.api.metrics import CONTENT_TYPE
from serving.api.protocol import VersionResponse
from serving.api.state import ServerState


def server_version() -> str:
    try:
        return version("jax-serve")
    except PackageNotFoundError:
        return "0.1.0"


def register(app: Quart, state: ServerState) -> None:
    """Adds the health, version and metrics routes to ``app``."""

    @app.get("/health")
    async def health():
        # 503 until the engine has compiled its buckets, so that a load
        # balancer (or a test) can wait on it; 200 with an empty body after.
        if not state.engine.is_ready():
            raise APIError("The engine is still starting (compiling).", 503)
        return Response("", status=200)

    @app.route("/ping", methods=["GET", "POST"])
    async def ping():
        return await health()

    @app.get("/version")
    async def get_version():
        return Response(VersionResponse(version=server_version()).model_dump_json(),
                        content_type="application/json")

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), status=200, content_type=CONTENT_TYPE)
