"""Chunked NDJSON: one ``{"id", "chunk"}`` object a line, ending with ``{"id", "done": true}``.

Heartbeats are empty lines, which NDJSON readers skip. A pod that shuts down ends
open streams with ``{"id": <last id>, "reconnect": true}``.
"""

from __future__ import annotations

import orjson

from fanline.api.hub import HistoryGone
from fanline.shared.events import Event
from fanline.shared.ids import event_id


class NDJSON:
    name = "ndjson"
    media_type = b"application/x-ndjson"
    heartbeat = b"\n"
    shared_frames = True
    preamble = b""

    @staticmethod
    def frame(event: Event) -> bytes:
        return event.ndjson

    @staticmethod
    def error(exc: HistoryGone) -> bytes:
        return orjson.dumps(exc.body()) + b"\n"

    @staticmethod
    def reconnect(last_seq: int) -> bytes:
        """``{"id": <last event id sent>, "reconnect": true}``: resume after that id."""
        return orjson.dumps({"id": event_id(last_seq), "reconnect": True}) + b"\n"
