"""The HTTP routes, one Quart Blueprint per capability, handlers at module level.

- ``openai``: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``.
- ``tokenizer``: ``/tokenize``, ``/detokenize`` (vLLM, SGLang), ``/v1/encode``
  (LMDeploy), ``/tokenizer/encode``, ``/chat/render`` (RTP-LLM).
- ``generate``: the native generate routes: ``/generate`` (SGLang and LMDeploy
  bodies), RTP-LLM's ``POST /``, ``/abort_request``.
- ``pooling``: embeddings, encode, pooling, score, rerank, classify, ``/v1/score``.
- ``server``: health, version, metrics and read-only state (``/get_model_info``,
  ``/get_server_info``, RTP-LLM's ``/worker_status``, ...).
- ``admin``: routes that change the server: weight updates, sleep / wake-up,
  cache flush, log level, terminate.

Each handler reads the app's ServerState with ``current_state()``.
"""

from __future__ import annotations

from quart import Quart


def register_all(app: Quart) -> None:
    """Adds every blueprint to ``app`` (see ``../shared/API_SURFACE.md``)."""
    from serving.api.routes import admin, generate, openai, pooling, server, tokenizer

    for module in (openai, tokenizer, generate, pooling, server, admin):
        app.register_blueprint(module.bp)
