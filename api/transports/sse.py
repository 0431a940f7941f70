"""Server-Sent Events, in the OpenAI chunk format: ``id: <event id>`` + ``data: <chunk>``, then ``data: [DONE]``."""

from __future__ import annotations

import orjson

from api.hub import HistoryGone
from shared.events import Event

# A browser's EventSource reconnects after this many ms (with Last-Event-ID).
RETRY_MS = 1000


class SSE:
    media_type = b"text/event-stream; charset=utf-8"
    heartbeat = b": ping\n\n"
    preamble = f"retry: {RETRY_MS}\n\n".encode()

    @staticmethod
    def frame(event: Event) -> bytes:
        return event.sse

    @staticmethod
    def error(exc: HistoryGone) -> bytes:
        return b"data: " + orjson.dumps(exc.body()) + b"\n\ndata: [DONE]\n\n"
