"""``fanline api``: one API pod on uvicorn, with a graceful drain on SIGTERM (Guarantee 5).

On SIGTERM (or Ctrl-C) the pod, before uvicorn's own shutdown:
  1. turns /readyz to 503 and answers new requests with 503 ``draining``;
  2. sends every open stream a reconnect hint and closes it (the hub's drain),
     so clients resume on another pod;
then uvicorn stops accepting, waits for the streams to close (bounded by
``drain_timeout_s``) and the process exits.
"""

from __future__ import annotations

import asyncio
import logging
from types import FrameType
from typing import Any

import orjson
import uvicorn
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.flow_control import service_unavailable
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from fanline.api.app import Edge, create_app
from fanline.api.transports import DIRECT_WRITE
from fanline.shared.errors import Unavailable
from fanline.shared.settings import Settings

log = logging.getLogger("fanline.api")


class _Protocol(HttpToolsProtocol):
    """uvicorn's HTTP protocol with a deadline on request headers: a client that opens
    a connection and sends its headers slowly (slowloris) is disconnected after
    ``header_timeout_s`` instead of holding a socket forever. (uvicorn's keep-alive
    timeout stops counting as soon as any byte arrives.)"""

    header_timeout_s = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def _arm(self) -> None:
        self._header_deadline: asyncio.TimerHandle | None = self.loop.call_later(
            self.header_timeout_s, self._headers_too_slow
        )

    def _disarm(self) -> None:
        deadline = getattr(self, "_header_deadline", None)
        if deadline is not None:
            deadline.cancel()
            self._header_deadline = None

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if not self.transport.is_closing():
            log.info("closing a connection whose request headers took over %.0f s", self.header_timeout_s)
            self.transport.close()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # the next request on this keep-alive connection

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        # The hub may write a caught-up viewer's chunks to this cycle's socket itself
        # (api/transports/__init__.py): no task wake-up per viewer per event.
        cycle.scope.setdefault("extensions", {})[DIRECT_WRITE] = cycle
        # Past the connection cap uvicorn answers in plain text; answer in our error body.
        chosen: Any = _overloaded if app is service_unavailable else app
        super()._start_asgi_task(cycle, chosen)


async def _overloaded(scope: Scope, receive: Receive, send: Send) -> None:
    body = orjson.dumps(
        Unavailable("this pod holds as many connections as it may; retry shortly", code="overloaded").body()
    )
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", b"1"),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: Edge) -> None:
        super().__init__(config)
        self._app = app
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[object] | None = None) -> None:  # type: ignore[override]
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)  # type: ignore[arg-type]

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._loop is not None and not self.should_exit:
            self._loop.call_soon_threadsafe(self._drain)
        super().handle_exit(sig, frame)

    def _drain(self) -> None:
        state = self._app.state
        state.draining = True
        hub = getattr(state, "hub", None)
        if hub is not None:
            log.info("draining: %d viewer(s) told to reconnect elsewhere", hub.viewer_count)
            hub.drain()


def run(settings: Settings, host: str, port: int) -> None:
    app = create_app(settings)
    _Protocol.header_timeout_s = settings.header_timeout_s
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=int(settings.drain_timeout_s),
        ws_max_size=65536,
        limit_concurrency=settings.max_connections,
        timeout_keep_alive=5,
        http=_Protocol,
        log_config=None,  # shared/logs.py configured logging (text or JSON, with ids)
    )
    _Server(config, app).run()
