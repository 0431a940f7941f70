"""Transports: how a viewer's batches of events become bytes on the wire.

SSE and NDJSON share one raw ASGI streaming response (cheaper per connection
than StreamingResponse, and it notices a client that left while idle); the
WebSocket transport lives in ``websocket.py``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Protocol

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from fanline.api import metrics
from fanline.api.hub import RECONNECT_ON, HistoryGone, Hub
from fanline.shared.events import Event

log = logging.getLogger("fanline.api")


class Transport(Protocol):
    name: str  # metrics label
    media_type: bytes
    heartbeat: bytes
    preamble: bytes

    def frame(self, event: Event) -> bytes: ...

    def error(self, exc: HistoryGone) -> bytes: ...

    def reconnect(self, last_seq: int) -> bytes:
        """The hint sent before this pod closes a stream that has not ended (drain)."""
        ...


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
        viewers.inc()
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            if transport.preamble:
                await send({"type": "http.response.body", "body": transport.preamble, "more_body": True})
            async for batch in self.hub.follow(self.gen_id, cursor, gone):
                if batch is None:
                    body = transport.heartbeat
                elif len(batch) == 1:
                    body = transport.frame(batch[0])
                else:
                    body = b"".join([transport.frame(e) for e in batch])
                watch.sending = loop.time()
                await send({"type": "http.response.body", "body": body, "more_body": True})
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
        await send({"type": "http.response.body", "body": b"", "more_body": False})
