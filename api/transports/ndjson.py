"""Chunked NDJSON: one ``{"id", "chunk"}`` object a line, ending with ``{"id", "done": true}``.

Heartbeats are empty lines, which NDJSON readers skip.
"""

from __future__ import annotations

import orjson

from api.hub import HistoryGone
from shared.events import Event


class NDJSON:
    media_type = b"application/x-ndjson"
    heartbeat = b"\n"
    preamble = b""

    @staticmethod
    def frame(event: Event) -> bytes:
        return event.ndjson

    @staticmethod
    def error(exc: HistoryGone) -> bytes:
        return orjson.dumps(exc.body()) + b"\n"
