"""WebSocket: text messages ``{"id", "chunk"}``, then ``{"id", "done": true}`` and a normal close (1000).

The client may send ``{"type": "cancel"}`` to cancel the generation.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from starlette.websockets import WebSocket, WebSocketDisconnect

from fanline.api import metrics
from fanline.api.hub import RECONNECT_ON, HistoryGone, Hub
from fanline.shared.errors import FanlineError

MAX_CLIENT_MESSAGE_BYTES = 4096


async def serve(
    websocket: WebSocket,
    hub: Hub,
    gen_id: str,
    cursor: int,
    cancel: Callable[[], Awaitable[None]],
) -> None:
    gone: asyncio.Task[Any] = asyncio.ensure_future(_receive_loop(websocket, cancel))
    viewers = metrics.VIEWERS.labels("websocket")
    if cursor:
        metrics.RESUMES.labels("websocket").inc()
    viewers.inc()
    try:
        async for batch in hub.follow(gen_id, cursor, gone):
            if batch is None:
                continue  # uvicorn's WebSocket pings keep the connection alive
            for event in batch:
                await websocket.send_text(event.ws)
            metrics.DELIVERED["websocket"] += len(batch)
            if batch[-1].is_end:
                await websocket.close(1000)
                return
        if gone.done():
            return
    except HistoryGone as exc:
        await websocket.send_text(orjson.dumps(exc.body()).decode())
        await websocket.close(1000)
    except RECONNECT_ON:
        metrics.DRAIN_HINTS.inc()
        await websocket.close(1012, "service restart: reconnect and resume")
    except (WebSocketDisconnect, RuntimeError):
        pass  # the client left while we were sending
    finally:
        viewers.dec()
        gone.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await gone


async def _receive_loop(websocket: WebSocket, cancel: Callable[[], Awaitable[None]]) -> None:
    """Reads client messages until the client goes away; refuses what it cannot use."""
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
        raw = message.get("text") or message.get("bytes") or b""
        if len(raw) > MAX_CLIENT_MESSAGE_BYTES:
            await websocket.close(1009, "message too big")
            return
        try:
            parsed = orjson.loads(raw)
        except orjson.JSONDecodeError:
            await _send_error(websocket, 'messages must be JSON, like {"type": "cancel"}')
            continue
        if isinstance(parsed, dict) and parsed.get("type") == "cancel":
            try:
                await cancel()
            except FanlineError as exc:
                await websocket.send_text(orjson.dumps(exc.body()).decode())
        else:
            await _send_error(websocket, 'unknown message; the only one accepted is {"type": "cancel"}')


async def _send_error(websocket: WebSocket, message: str) -> None:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": "invalid_message"}}
    await websocket.send_text(orjson.dumps(body).decode())
