"""Transports: how a viewer's batches of events become bytes on the wire.

SSE and NDJSON share one raw ASGI streaming response (cheaper per connection
than StreamingResponse, and it notices a client that left while idle); the
WebSocket transport lives in ``websocket.py``.

Under ``fanline api`` (api/server.py) the server also puts its response object in the
scope (``DIRECT_WRITE``): a caught-up SSE or NDJSON viewer then becomes one of its
topic's sinks, and the hub writes HTTP chunks to its socket directly — the same bytes
uvicorn's ``send`` would write, without waking the viewer's task for each event.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Protocol

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from fanline.api import metrics
from fanline.api.hub import RECONNECT_ON, HistoryGone, Hub, Sink, encode
from fanline.shared.events import Event

log = logging.getLogger("fanline.api")


# The scope extension under which api/server.py offers uvicorn's response cycle.
DIRECT_WRITE = "fanline.direct_write"


class Transport(Protocol):
    name: str  # metrics label
    media_type: bytes
    heartbeat: bytes
    preamble: bytes
    shared_frames: bool  # frame(event) is the same for every viewer (the hub may write it for them)

    def frame(self, event: Event) -> bytes: ...

    def error(self, exc: HistoryGone) -> bytes: ...

    def reconnect(self, last_seq: int) -> bytes:
        """The hint sent before this pod closes a stream that has not ended (drain)."""
        ...


def _chunk(body: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(body), body)  # as uvicorn frames a body chunk


def _direct_sink(scope: Scope, transport: Transport) -> Sink | None:
    """A sink writing to uvicorn's socket, for a chunked response already started."""
    cycle: Any = scope.get("extensions", {}).get(DIRECT_WRITE)
    if cycle is None or not transport.shared_frames or not cycle.chunked_encoding:
        return None
    socket: asyncio.WriteTransport = cycle.transport

    def ready() -> bool:
        return not (cycle.disconnected or cycle.flow.write_paused or socket.is_closing()) and (
            socket.get_write_buffer_size() == 0
        )

    def write(data: bytes) -> bool:
        if cycle.disconnected or socket.is_closing():
            return False
        try:
            socket.write(data)
        except (OSError, RuntimeError):  # the socket broke under it: its own task finds out
            return False
        return socket.get_write_buffer_size() == 0  # backed up: its own task goes on, with flow control

    return Sink(transport.name, transport.heartbeat, transport.frame, _chunk, write, ready)


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
        started_at: float | None = None,
    ) -> None:
        self.status_code = 200
        self.started_at = started_at  # when set, the first event written is timed as TTFT
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
        transport = self.transport
        name = transport.name
        viewers = metrics.VIEWERS.labels(name)
        if self.cursor:
            metrics.RESUMES.labels(name).inc()
        gone: asyncio.Task[Any] = asyncio.ensure_future(wait_disconnect(receive))
        # A viewer whose socket accepts nothing for slow_viewer_timeout_s is cut off (it
        # can resume); until then flow control holds it in `await send`, and no one else.
        watch = self.hub.sends.watch()
        loop = asyncio.get_running_loop()
        cursor = self.cursor
        sink: Sink | None = None
        closed = False  # the last body went out with the end
        viewers.inc()
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            if transport.preamble:
                await send({"type": "http.response.body", "body": transport.preamble, "more_body": True})
            # Not for a response that times its first event: its task writes that one.
            sink = _direct_sink(scope, transport) if self.started_at is None else None
            async for batch in self.hub.follow(self.gen_id, cursor, gone, sink=sink):
                body = transport.heartbeat if batch is None else encode(transport.frame, batch)
                # The end goes out with the response's last chunk: one socket write, not two.
                closed = bool(batch and batch[-1].is_end)
                watch.sending = loop.time()
                await send({"type": "http.response.body", "body": body, "more_body": not closed})
                watch.sending = 0.0
                if batch:
                    cursor = batch[-1].seq
                    metrics.DELIVERED[name] += len(batch)
                    if self.started_at is not None:
                        metrics.TIME_TO_FIRST_TOKEN.observe(time.monotonic() - self.started_at)
                        self.started_at = None
        except HistoryGone as exc:
            await send({"type": "http.response.body", "body": transport.error(exc), "more_body": True})
        except RECONNECT_ON:  # draining, or Redis away when history had to be read: resume later
            metrics.DRAIN_HINTS.inc()
            if sink is not None:
                cursor = max(cursor, sink.cursor)
            await send({"type": "http.response.body", "body": transport.reconnect(cursor), "more_body": True})
        except asyncio.CancelledError:
            if not watch.cut_off:
                raise
            # Cut off by the send watch: close without completing the response; the client resumes.
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            metrics.SLOW_VIEWER_CUTOFFS.inc()
            log.info("viewer of %s accepted nothing for %.0f s; cut off", self.gen_id, self.hub.sends.timeout)
            return
        finally:
            self.hub.sends.entries.discard(watch)
            viewers.dec()
            gone.cancel()
        if not closed:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
