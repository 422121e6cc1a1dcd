"""Server-sent events, the one framing every stream uses.

``sse(payload)`` is one ``data: {json}\\n\\n`` event (a pydantic chunk or plain
data); ``DONE`` ends OpenAI and SGLang streams. RTP-LLM frames its events as
``data:{json}`` (no space), which ``sse(..., space=False)`` writes.
:func:`sse_response` wraps an event iterator; an error after the 200 headers
are out becomes an error event (OpenAI shape) followed by ``[DONE]``.
"""

from __future__ import annotations

import json
import logging
from typing import Any, AsyncIterator

from pydantic import BaseModel
from quart import Response

from serving.api.errors import APIError, error_body

logger = logging.getLogger(__name__)

DONE = "data: [DONE]\n\n"


def sse(payload: Any, space: bool = True) -> str:
    """One SSE event. A pydantic chunk leaves out unset fields (a delta's role
    after the first chunk) but always carries ``object`` and ``created``."""
    if isinstance(payload, BaseModel):
        payload.model_fields_set.update(("object", "created"))
        body = payload.model_dump_json(exclude_unset=True)
    else:
        body = json.dumps(payload)
    return f"data: {body}\n\n" if space else f"data:{body}\n\n"


def sse_response(events: AsyncIterator[str], headers: dict[str, str] | None = None,
                 done_on_error: bool = True) -> Response:
    """Wraps an iterator of SSE strings in a streaming response.

    Args:
        events: the SSE strings.
        headers: extra response headers.
        done_on_error: send ``[DONE]`` after an error event (OpenAI, SGLang).
    """

    async def body():
        try:
            async for event in events:
                yield event.encode()
        except APIError as exc:
            yield sse(error_body(exc.message, exc.status, exc.param)).encode()
            if done_on_error:
                yield DONE.encode()
        except Exception as exc:  # noqa: BLE001 - the stream must end cleanly
            logger.exception("error while streaming")
            yield sse(error_body(f"{type(exc).__name__}: {exc}", 500)).encode()
            if done_on_error:
                yield DONE.encode()

    resp = Response(body(), status=200, content_type="text/event-stream; charset=utf-8",
                    headers={"Cache-Control": "no-cache", **(headers or {})})
    resp.timeout = None
    return resp
