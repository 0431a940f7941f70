"""Transports: how a viewer's batches of events become bytes on the wire.

SSE and NDJSON share one raw ASGI streaming response (cheaper per connection
than StreamingResponse, and it notices a client that left while idle); the
WebSocket transport lives in ``websocket.py``.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from api.hub import HistoryGone, Hub
from shared.events import Event


class Transport(Protocol):
    media_type: bytes
    heartbeat: bytes
    preamble: bytes

    def frame(self, event: Event) -> bytes: ...

    def error(self, exc: HistoryGone) -> bytes: ...


async def wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class EventStreamResponse(Response):
    """Streams a generation's events from ``cursor`` on, in the given transport.

    A Response subclass only so FastAPI hands it to the server as it is; it
    shares none of Response's machinery.
    """

    def __init__(
        self,
        hub: Hub,
        gen_id: str,
        cursor: int,
        transport: Transport,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.status_code = 200
        self.background = None
        self.hub = hub
        self.gen_id = gen_id
        self.cursor = cursor
        self.transport = transport
        self.raw_headers = [
            (b"content-type", transport.media_type),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
        ] + [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        if self.transport.preamble:
            await send({"type": "http.response.body", "body": self.transport.preamble, "more_body": True})
        gone: asyncio.Task[Any] = asyncio.ensure_future(wait_disconnect(receive))
        frame = self.transport.frame
        try:
            async for batch in self.hub.follow(self.gen_id, self.cursor, gone):
                if batch is None:
                    body = self.transport.heartbeat
                elif len(batch) == 1:
                    body = frame(batch[0])
                else:
                    body = b"".join([frame(e) for e in batch])
                await send({"type": "http.response.body", "body": body, "more_body": True})
        except HistoryGone as exc:
            await send({"type": "http.response.body", "body": self.transport.error(exc), "more_body": True})
        finally:
            gone.cancel()
        await send({"type": "http.response.body", "body": b"", "more_body": False})
