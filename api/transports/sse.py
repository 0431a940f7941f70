"""Server-Sent Events, in the OpenAI chunk format: ``id: <event id>`` + ``data: <chunk>``, then ``data: [DONE]``.

Deliberate deviation from the usual SSE habits: the heartbeat comment and the
``retry:`` line are *not* followed by a blank line. Once an ``id:`` has been seen,
the OpenAI SDKs' (and httpx-sse's) decoders dispatch an event with empty data on
every blank line, and the SDK then fails to parse it as JSON. A lone comment or
retry line is legal SSE and dispatches nothing.
"""

from __future__ import annotations

import orjson

from fanline.api.hub import HistoryGone
from fanline.shared.events import Event

# A browser's EventSource reconnects after this many ms (with Last-Event-ID).
RETRY_MS = 1000
# ... and after this many when a pod that is shutting down closes the stream.
DRAIN_RETRY_MS = 250


class SSE:
    name = "sse"
    media_type = b"text/event-stream; charset=utf-8"
    heartbeat = b": ping\n"
    shared_frames = True
    preamble = f"retry: {RETRY_MS}\n".encode()

    @staticmethod
    def frame(event: Event) -> bytes:
        return event.sse

    @staticmethod
    def error(exc: HistoryGone) -> bytes:
        return b"data: " + orjson.dumps(exc.body()) + b"\n\ndata: [DONE]\n\n"

    @staticmethod
    def reconnect(last_seq: int) -> bytes:
        # EventSource reconnects after `retry` ms with its Last-Event-ID; other
        # clients see the stream end without [DONE] and resume the same way.
        return f"retry: {DRAIN_RETRY_MS}\n: reconnect and resume\n".encode()
