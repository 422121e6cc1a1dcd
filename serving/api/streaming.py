"""Server-sent events, the one framing every stream uses.

``sse(payload)`` is one ``data: {json}\\n\\n`` event (a pydantic chunk or plain
data); ``DONE`` ends OpenAI, SGLang and LMDeploy streams. RTP-LLM frames its
events as ``data:{json}\\r\\n\\r\\n`` and ends with ``data:[done]``
(:data:`RTP`). :func:`sse_response` wraps an event iterator; an error after
the 200 headers are out becomes an error event in the dialect's error shape,
then the end marker.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any, AsyncIterator

from pydantic import BaseModel
from quart import Response

from serving.api.errors import APIError

logger = logging.getLogger(__name__)



@dataclasses.dataclass(frozen=True)
class Framing:
    """How a dialect frames its events: prefix, separator, end marker, error shape."""

    prefix: str = "data: "
    end: str = "\n\n"
    done: str = "[DONE]"
    error_shape: str = "openai"

    def event(self, payload: Any) -> str:
        """One event. A pydantic chunk leaves out unset fields (a delta's role
        after the first chunk) but always carries ``object`` and ``created``."""
        if isinstance(payload, BaseModel):
            payload.model_fields_set.update(("object", "created"))
            body = payload.model_dump_json(exclude_unset=True)
        else:
            body = json.dumps(payload)
        return f"{self.prefix}{body}{self.end}"

    @property
    def done_event(self) -> str:
        return f"{self.prefix}{self.done}{self.end}"


OPENAI = Framing()
LMDEPLOY = Framing(error_shape="lmdeploy")
RTP = Framing(prefix="data:", end="\r\n\r\n", done="[done]", error_shape="rtp")
DONE = OPENAI.done_event


def sse(payload: Any) -> str:
    """One ``data: {json}`` event (OpenAI, SGLang and LMDeploy framing)."""
    return OPENAI.event(payload)


def sse_response(events: AsyncIterator[str], headers: dict[str, str] | None = None,
                 framing: Framing = OPENAI) -> Response:
    """Wraps an iterator of SSE strings in a streaming response.

    Args:
        events: the SSE strings (their generator writes its own end marker).
        headers: extra response headers.
        framing: the dialect's framing, for an error event and the end marker
            after it.
    """

    def error_event(err: APIError) -> bytes:
        err.shape = framing.error_shape
        body = err.body()
        if framing.error_shape == "lmdeploy":
            body = {"error": body}
        return (framing.event(body) + framing.done_event).encode()

    async def body():
        try:
            async for event in events:
                yield event.encode()
        except APIError as exc:
            yield error_event(exc)
        except Exception as exc:  # noqa: BLE001 - the stream must end cleanly
            logger.exception("error while streaming")
            yield error_event(APIError(f"{type(exc).__name__}: {exc}", 500))

    resp = Response(body(), status=200, content_type="text/event-stream; charset=utf-8",
                    headers={"Cache-Control": "no-cache", **(headers or {})})
    resp.timeout = None
    return resp
