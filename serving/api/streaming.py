"""Server-sent events as OpenAI sends them: ``data: {json}\\n\\n`` ... ``data: [DONE]\\n\\n``."""

from __future__ import annotations

import json
import logging
from typing import AsyncIterator

from pydantic import BaseModel
from quart import Response

from serving.api.errors import APIError, error_body

logger = logging.getLogger(__name__)

DONE = "data: [DONE]\n\n"


def sse(chunk: BaseModel) -> str:
    """One SSE event; unset fields (e.g. a delta's role after the first chunk) are left out."""
    chunk.model_fields_set.update(("object", "created"))
    return f"data: {chunk.model_dump_json(exclude_unset=True)}\n\n"


def sse_error(message: str, status: int = 500) -> str:
    return f"data: {json.dumps(error_body(message, status))}\n\n"


def sse_response(events: AsyncIterator[str], headers: dict[str, str] | None = None) -> Response:
    """Wraps an iterator of SSE strings in a streaming response.

    An exception inside the stream (after the 200 headers are out) becomes an
    error event followed by ``[DONE]``, as vLLM does.
    """

    async def body():
        try:
            async for event in events:
                yield event.encode()
        except APIError as exc:
            yield sse_error(exc.message, exc.status).encode()
            yield DONE.encode()
        except Exception as exc:  # noqa: BLE001 - the stream must end cleanly
            logger.exception("error while streaming")
            yield sse_error(f"{type(exc).__name__}: {exc}", 500).encode()
            yield DONE.encode()

    resp = Response(body(), status=200, content_type="text/event-stream; charset=utf-8",
                    headers={"Cache-Control": "no-cache", **(headers or {})})
    resp.timeout = None
    return resp
