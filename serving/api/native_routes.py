"""Registers the native routes of SGLang, LMDeploy and RTP-LLM and the pooling routes."""

from __future__ import annotations

from quart import Quart

from serving.api.state import ServerState


def register(app: Quart, state: ServerState) -> None:
    """Adds every native and pooling route to ``app`` (see API_SURFACE.md)."""
    from serving.api import native_lmdeploy, native_rtp, native_sglang

    native_sglang.register(app, state)
    native_lmdeploy.register(app, state)
    native_rtp.register(app, state)
    try:
        from serving.api import pooling_routes
    except ImportError:  # not landed yet
        return
    pooling_routes.register(app, state)
