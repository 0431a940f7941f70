"""The event model: what a stream entry holds, and its bytes on each transport.

A stream entry has three fields:

    k   kind: b"c" a chat.completion.chunk, b"e" an error, b"d" the end
    d   the payload, JSON, encoded once by the worker (chunk or {"error": ...})
    t   publish time, unix microseconds (for lag metrics and the benchmark)

The API never re-encodes a payload: each transport's frame is the payload
wrapped in a few constant bytes, built once per event and shared by every
viewer on the pod.
"""

from __future__ import annotations

import time
from typing import Any, Literal, TypedDict

import orjson

from fanline.shared.ids import event_id

CHUNK = b"c"
ERROR = b"e"
END = b"d"

FinishReason = Literal["stop", "length", "cancelled", "tool_calls", "content_filter"]


class Delta(TypedDict, total=False):
    """One step of a generation, as a generator yields it: the fields of an OpenAI
    chunk's ``delta``, passed through as they are, plus the choice's ``logprobs``."""

    role: str
    content: str
    reasoning_content: str
    reasoning: str
    refusal: str
    tool_calls: list[dict[str, Any]]
    logprobs: dict[str, Any]


class Event:
    """One stream entry, with its transport frames built lazily and at most once."""

    __slots__ = ("_ndjson", "_sse", "_ws", "data", "id", "kind", "seq", "ts_us")

    def __init__(self, seq: int, kind: bytes, data: bytes, ts_us: int = 0) -> None:
        self.seq = seq
        self.id = event_id(seq).encode()
        self.kind = kind
        self.data = data
        self.ts_us = ts_us
        self._sse: bytes | None = None
        self._ndjson: bytes | None = None
        self._ws: str | None = None

    @classmethod
    def from_entry(cls, entry_id: bytes, fields: dict[bytes, bytes]) -> Event:
        return cls(
            int(entry_id.partition(b"-")[0]),
            fields.get(b"k", CHUNK),
            fields.get(b"d", b""),
            int(fields.get(b"t", b"0")),
        )

    @property
    def is_end(self) -> bool:
        return self.kind == END

    @property
    def sse(self) -> bytes:
        """``id: 7-0`` + ``data: <chunk>`` (or ``data: [DONE]`` for the end)."""
        if self._sse is None:
            payload = b"[DONE]" if self.kind == END else self.data
            self._sse = b"id: " + self.id + b"\ndata: " + payload + b"\n\n"
        return self._sse

    @property
    def ndjson(self) -> bytes:
        """One JSON object and a newline; the WebSocket sends the same text without it."""
        if self._ndjson is None:
            head = b'{"id":"' + self.id + b'",'
            if self.kind == END:
                self._ndjson = head + b'"done":true}\n'
            elif self.kind == ERROR:
                # data is {"error": {...}}: splice its members into the line.
                self._ndjson = head + self.data[1:] + b"\n"
            else:
                self._ndjson = head + b'"chunk":' + self.data + b"}\n"
        return self._ndjson

    @property
    def ws(self) -> str:
        """The NDJSON line as a WebSocket text message."""
        if self._ws is None:
            self._ws = self.ndjson[:-1].decode()
        return self._ws


def entry_fields(kind: bytes, data: bytes) -> dict[bytes, bytes]:
    return {b"k": kind, b"d": data, b"t": str(time.time_ns() // 1000).encode()}


def chunk(
    completion_id: str,
    created: int,
    model: str,
    delta: dict[str, Any],
    finish_reason: str | None = None,
    logprobs: Any = None,
) -> bytes:
    return orjson.dumps(
        {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
        }
    )


def usage_chunk(completion_id: str, created: int, model: str, usage: dict[str, int]) -> bytes:
    return orjson.dumps(
        {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [],
            "usage": usage,
        }
    )


def error_payload(message: str, code: str, type_: str = "server_error") -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}})


def completion_id(gen_id: str) -> str:
    return f"chatcmpl-{gen_id}"
