"""The Durable Streams protocol under ``/v1/streams/{path}`` (storage: shared/streams.py).

    PUT     create (Content-Type, Stream-TTL | Stream-Expires-At, Stream-Closed, a fork:
            Stream-Forked-From [+ Stream-Fork-Offset, Stream-Fork-Sub-Offset]), 201 / 200 / 409
    POST    append one message (Stream-Seq; Producer-Id + Producer-Epoch + Producer-Seq for an
            idempotent producer; Stream-Closed: true closes, with or without a body)
    GET     ?offset=-1|now|<offset> catch-up; &live=long-poll waits for news (204 on timeout);
            &live=sse streams data and control events; ETag / If-None-Match on catch-up
    HEAD    metadata; DELETE removes (410 while forks still read it)

Live reads go through the pod's hub (api/hub.py): one shared reader per pod follows each
stream's Redis Stream, so Redis cost is flat in the number of readers.

``/v1/streams/generations/{gen_id}`` is a fanline generation as a read-only JSON stream:
each message is one stream event's payload (the chunk JSON of the NDJSON transport, or
its ``{"error": ...}``), message ``seq`` is event ``<seq>-0`` (offset ``0…0_<seq, 16
digits>``), and the stream is closed once the generation has ended.

Errors carry the protocol's status and headers with the OpenAI error body used elsewhere
(the protocol defines no error body).
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import random
import re
import time
from datetime import datetime
from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from fanline.api.auth import WATCH_TOKEN_HEADER, Auth
from fanline.api.errors import error_response
from fanline.api.generations import Generations
from fanline.api.hub import RECONNECT_ON, HistoryGone, Hub
from fanline.api.transports import wait_disconnect
from fanline.shared import keys
from fanline.shared.connections import UNAVAILABLE
from fanline.shared.errors import (
    FanlineError,
    InvalidRequest,
    MethodNotAllowed,
    PayloadTooLarge,
    RequestTimeout,
    Unavailable,
)
from fanline.shared.ids import is_generation_id
from fanline.shared.keys import StreamMeta
from fanline.shared.settings import Settings
from fanline.shared.streams import NEXT_OFFSET, STREAM_CLOSED, Info, Message, Streams, offset_of, seq_of_offset

router = APIRouter()

GENERATIONS_PREFIX = "/generations/"
_OFFSET_PARAM = re.compile(r"-1|now|[0-9]+_[0-9]+")
_INTEGER = re.compile(r"0|[1-9][0-9]*")
_DIGITS = re.compile(r"[0-9]+")
_CONTENT_TYPE = re.compile(r"[\w-]+/[\w-]+")
_MAX_SAFE_INTEGER = 2**53 - 1
_COMPRESS_FROM = 1024
# What ends a live wait early without an error for the client (it reads on from its offset).
_WAIT_ENDS: tuple[type[BaseException], ...] = (TimeoutError, HistoryGone, *RECONNECT_ON)
_SSE_ENDS: tuple[type[BaseException], ...] = (HistoryGone, FanlineError, *RECONNECT_ON)

# Cursor intervals (the protocol's CDN request collapsing): 20 s since 2024-10-09 UTC.
_CURSOR_EPOCH_MS = 1728432000000
_CURSOR_INTERVAL_S = 20

CORS_HEADERS = {
    "access-control-allow-origin": "*",
    "access-control-allow-methods": "GET, POST, PUT, DELETE, HEAD, OPTIONS",
    "access-control-allow-headers": (
        "content-type, authorization, if-none-match, last-event-id, Stream-Seq, Stream-TTL, Stream-Expires-At, "
        "Stream-Closed, Producer-Id, Producer-Epoch, Producer-Seq, Stream-Forked-From, Stream-Fork-Offset, "
        "Stream-Fork-Sub-Offset"
    ),
    "access-control-expose-headers": (
        "Stream-Next-Offset, Stream-Cursor, Stream-Up-To-Date, Stream-Closed, Stream-TTL, Stream-Expires-At, "
        "Stream-SSE-Data-Encoding, Producer-Epoch, Producer-Seq, Producer-Expected-Seq, Producer-Received-Seq, "
        "etag, content-type, content-encoding, vary, location, X-Fanline-Watch-Token"
    ),
    "access-control-max-age": "600",
    # Browser security headers (the protocol's section 10.7).
    "x-content-type-options": "nosniff",
    "cross-origin-resource-policy": "cross-origin",
}


def response_cursor(client_cursor: str | None) -> str:
    """The interval cursor, always past the client's (so a CDN never loops A → B → A)."""
    current = (time.time_ns() // 1_000_000 - _CURSOR_EPOCH_MS) // (_CURSOR_INTERVAL_S * 1000)
    if client_cursor and client_cursor.isdigit() and int(client_cursor) >= current:
        return str(int(client_cursor) + max(1, -(-random.randint(1, 3600) // _CURSOR_INTERVAL_S)))
    return str(current)


def _streams(request: Request) -> Streams:
    streams: Streams = request.app.state.streams
    return streams


def _auth(request: Request) -> Auth:
    auth: Auth = request.app.state.auth
    return auth


def token_id(path: str) -> str:
    """What a stream's watch token is signed for (api/auth.py): its path's digest."""
    return "ds-" + keys.stream_id(path)[:40]


@router.api_route("/v1/streams/{path:path}", methods=["GET", "HEAD", "PUT", "POST", "DELETE", "OPTIONS"])
async def durable_stream(request: Request, path: str) -> Response:
    path = "/" + path
    try:
        if request.method == "OPTIONS":
            response: Response = Response(status_code=204)
        elif path.startswith(GENERATIONS_PREFIX):
            response = await _generation(request, path)
        elif request.method in ("GET", "HEAD"):
            _auth(request).require_read(request, token_id(path))
            response = await (_read(request, path) if request.method == "GET" else _head(request, path))
        else:
            _auth(request).require_key(request)
            handler = {"PUT": _create, "POST": _append, "DELETE": _delete}[request.method]
            response = await handler(request, path)
    except FanlineError as exc:
        response = error_response(exc)
    except UNAVAILABLE:
        response = error_response(Unavailable("Redis is unavailable; retry shortly", code="redis_unavailable"))
    response.headers.update(CORS_HEADERS)
    return response


async def _body(request: Request) -> bytes:
    """The body, refused with 413 as soon as it passes FANLINE_DS_MAX_BODY_BYTES."""
    settings: Settings = request.app.state.settings
    limit = settings.ds_max_body_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body is larger than {limit} bytes")
    body = bytearray()
    try:
        async with asyncio.timeout(settings.body_timeout_s):
            async for part in request.stream():
                body += part
                if len(body) > limit:
                    raise PayloadTooLarge(f"request body is larger than {limit} bytes")
    except TimeoutError:
        raise RequestTimeout(f"the request body did not arrive within {settings.body_timeout_s:.0f} s") from None
    return bytes(body)


# -- PUT ---------------------------------------------------------------------------


async def _create(request: Request, path: str) -> Response:
    headers = request.headers
    settings: Settings = request.app.state.settings
    forked_from = headers.get("stream-forked-from")
    content_type = headers.get("content-type")
    if not content_type or not _CONTENT_TYPE.match(content_type.strip()):
        content_type = None if forked_from else "application/octet-stream"
    ttl_header, expires_header = headers.get("stream-ttl"), headers.get("stream-expires-at")
    if ttl_header is not None and expires_header is not None:
        raise InvalidRequest("Cannot specify both Stream-TTL and Stream-Expires-At", code="invalid_expiry")
    ttl: int | None = None
    if ttl_header is not None:
        if not _INTEGER.fullmatch(ttl_header):
            raise InvalidRequest("Invalid Stream-TTL value: whole seconds, like 3600", code="invalid_ttl")
        ttl = int(ttl_header)
        if settings.ds_max_ttl_s and ttl > settings.ds_max_ttl_s:
            raise InvalidRequest(f"Stream-TTL: at most {settings.ds_max_ttl_s} s", code="ttl_too_long")
    expires_ms: int | None = None
    if expires_header is not None:
        try:
            expires_ms = int(datetime.fromisoformat(expires_header.strip()).timestamp() * 1000)
        except ValueError:
            raise InvalidRequest(
                "Invalid Stream-Expires-At timestamp: an RFC 3339 time", code="invalid_expires_at"
            ) from None
        if settings.ds_max_ttl_s and expires_ms - time.time() * 1000 > settings.ds_max_ttl_s * 1000:
            raise InvalidRequest(f"Stream-Expires-At: at most {settings.ds_max_ttl_s} s ahead", code="ttl_too_long")
    fork_offset = headers.get("stream-fork-offset")
    if fork_offset is not None and not re.fullmatch(r"[0-9]+_[0-9]+", fork_offset):
        raise InvalidRequest("Invalid Stream-Fork-Offset format", code="invalid_fork_offset")
    sub_header = headers.get("stream-fork-sub-offset")
    sub: int | None = None
    if sub_header is not None:
        if not forked_from:
            raise InvalidRequest("Stream-Fork-Sub-Offset requires Stream-Forked-From", code="invalid_fork_offset")
        if not _INTEGER.fullmatch(sub_header):
            raise InvalidRequest("Invalid Stream-Fork-Sub-Offset format", code="invalid_fork_offset")
        sub = int(sub_header)
    if forked_from is not None and forked_from.startswith(GENERATIONS_PREFIX):
        raise InvalidRequest("a generation cannot be forked", code="invalid_fork_source")
    body = await _body(request)
    created, info = await _streams(request).create(
        path,
        content_type=content_type,
        ttl=ttl,
        expires_at=expires_header,
        expires_at_ms=expires_ms,
        body=body,
        closed=headers.get("stream-closed") == "true",
        forked_from=forked_from,
        fork_offset=fork_offset,
        fork_sub_offset=sub,
    )
    out = {"content-type": info.content_type, NEXT_OFFSET: info.next_offset}
    if created:
        out["location"] = str(request.url.replace(query=""))
    if info.closed:
        out[STREAM_CLOSED] = "true"
    if _auth(request).enabled:
        out[WATCH_TOKEN_HEADER] = _auth(request).watch_token(token_id(path))
    return Response(status_code=201 if created else 200, headers=out)


# -- POST --------------------------------------------------------------------------


def _producer(request: Request) -> tuple[str, int, int] | None:
    headers = request.headers
    pid, epoch, seq = (headers.get(h) for h in ("producer-id", "producer-epoch", "producer-seq"))
    if pid is None and epoch is None and seq is None:
        return None
    if pid is None or epoch is None or seq is None:
        raise InvalidRequest(
            "All producer headers (Producer-Id, Producer-Epoch, Producer-Seq) must be provided together",
            code="invalid_producer",
        )
    if not pid:
        raise InvalidRequest("Invalid Producer-Id: must not be empty", code="invalid_producer")
    for name, value in (("Producer-Epoch", epoch), ("Producer-Seq", seq)):
        if not _DIGITS.fullmatch(value) or int(value) > _MAX_SAFE_INTEGER:
            raise InvalidRequest(f"Invalid {name}: must be a non-negative integer", code="invalid_producer")
    return pid, int(epoch), int(seq)


async def _append(request: Request, path: str) -> Response:
    if path.startswith(GENERATIONS_PREFIX):
        raise MethodNotAllowed("generation streams are read-only")
    producer = _producer(request)
    close = request.headers.get("stream-closed") == "true"
    body = await _body(request)
    content_type = request.headers.get("content-type")
    if not body and not close:
        raise InvalidRequest("Empty body: an append needs data (or Stream-Closed: true)", code="empty_body")
    if body and not content_type:
        raise InvalidRequest("Content-Type header is required", code="missing_content_type")
    streams = _streams(request)
    info = await streams.get(path)
    headers = await streams.append(
        info,
        body or None,
        content_type=content_type or "",
        stream_seq=request.headers.get("stream-seq"),
        producer=producer,
        close=close,
    )
    duplicate = headers.pop("dup", None) is not None
    status = 200 if producer is not None and body and not duplicate else 204
    return Response(status_code=status, headers=headers)


# -- DELETE, HEAD --------------------------------------------------------------------


async def _delete(request: Request, path: str) -> Response:
    await _streams(request).delete(path)
    return Response(status_code=204)


def _etag(path: str, start: str, end: str, closed: bool) -> str:
    return f'"{base64.b64encode(path.encode()).decode()}:{start}:{end}{":c" if closed else ""}"'


async def _head(request: Request, path: str) -> Response:
    info = await _streams(request).get(path)
    headers = {NEXT_OFFSET: info.next_offset, "cache-control": "no-store", "content-type": info.content_type}
    if info.closed:
        headers[STREAM_CLOSED] = "true"
    if info.ttl is not None:
        headers["Stream-TTL"] = str(info.ttl)
    if info.expires_at:
        headers["Stream-Expires-At"] = info.expires_at
    headers["etag"] = _etag(path, "-1", info.next_offset, info.closed)
    return Response(status_code=200, headers=headers)


# -- GET ---------------------------------------------------------------------------


class _Source:
    """What a read follows: a Durable Stream, or a generation seen as one."""

    def __init__(self, request: Request, path: str) -> None:
        self.request = request
        self.path = path
        self.streams = _streams(request)
        self.hub: Hub = request.app.state.hub
        self.gen_id = path[len(GENERATIONS_PREFIX) :] if path.startswith(GENERATIONS_PREFIX) else None

    async def info(self) -> Info:
        if self.gen_id is None:
            return await self.streams.get(self.path)
        generations: Generations = self.request.app.state.generations
        generation = await generations.get(self.gen_id)
        tail = generation.last_seq - 1 if generation.ended else generation.last_seq
        meta = {
            StreamMeta.CONTENT_TYPE: "application/json",
            StreamMeta.TAIL: str(tail),
            StreamMeta.CLOSED: "1" if generation.ended else "0",
            "_key": keys.events_key(self.gen_id),
        }
        return Info(self.path, meta)

    async def touch(self) -> None:
        if self.gen_id is None:
            await self.streams.touch(self.path)

    async def read(self, info: Info, after: int) -> list[Message]:
        return await self.streams.read(info, after)

    def follow(self, after: int, stop: asyncio.Future[Any]) -> Any:
        if self.gen_id is not None:
            return self.hub.follow(self.gen_id, after, stop)
        raw = (keys.stream_keys(self.path)[1].encode(), keys.stream_shard(self.path))
        return self.hub.follow("ds:" + self.path, after, stop, raw=raw)


def _body_of(info: Info, messages: list[Message]) -> bytes:
    if info.json:
        return b"[" + b",".join(m.data for m in messages if m.data) + b"]"
    return b"".join(m.data for m in messages)


async def _generation(request: Request, path: str) -> Response:
    gen_id = path[len(GENERATIONS_PREFIX) :]
    if request.method not in ("GET", "HEAD"):
        raise MethodNotAllowed(
            "generation streams are read-only: fanline's workers write them", code="read_only_stream"
        )
    if not is_generation_id(gen_id):
        raise InvalidRequest(f"malformed generation id {gen_id[:64]!r}", code="invalid_generation_id")
    _auth(request).require_read(request, gen_id)
    return await (_read(request, path) if request.method == "GET" else _head_of(_Source(request, path)))


async def _head_of(source: _Source) -> Response:
    info = await source.info()
    headers = {NEXT_OFFSET: info.next_offset, "cache-control": "no-store", "content-type": info.content_type}
    if info.closed:
        headers[STREAM_CLOSED] = "true"
    return Response(status_code=200, headers=headers)


async def _read(request: Request, path: str) -> Response:
    source = _Source(request, path)
    info = await source.info()
    params = request.query_params
    offsets = params.getlist("offset")
    offset = offsets[0] if offsets else None
    if len(offsets) > 1:
        raise InvalidRequest("Multiple offset parameters not allowed", code="invalid_offset", param="offset")
    if offset is not None and not _OFFSET_PARAM.fullmatch(offset):
        raise InvalidRequest(
            f"Invalid offset format {offset[:64]!r}: -1, now, or an offset from Stream-Next-Offset",
            code="invalid_offset",
            param="offset",
        )
    live = params.get("live")
    cursor = params.get("cursor")
    if live in ("long-poll", "sse") and not offset:
        raise InvalidRequest(f"{'SSE' if live == 'sse' else 'Long-poll'} requires offset parameter", code="no_offset")
    after = info.tail if offset == "now" else 0 if offset in (None, "-1") else seq_of_offset(offset)
    if live == "sse":
        await source.touch()
        return _SSEResponse(source, info, after, cursor)
    headers = {"content-type": info.content_type}
    if offset == "now" and live != "long-poll":
        await source.touch()
        headers.update({NEXT_OFFSET: info.next_offset, "Stream-Up-To-Date": "true", "cache-control": "no-store"})
        if info.closed:
            headers[STREAM_CLOSED] = "true"
        return Response(b"[]" if info.json else b"", status_code=200, headers=headers)

    messages = await source.read(info, after)
    await source.touch()
    closed = info.closed
    if live == "long-poll" and not messages and after >= info.tail:
        if info.closed:
            return Response(
                status_code=204,
                headers={NEXT_OFFSET: info.next_offset, "Stream-Up-To-Date": "true", STREAM_CLOSED: "true"},
            )
        messages, closed = await _wait(source, after)
        await source.touch()
        if not messages:
            out = {NEXT_OFFSET: offset_of(after), "Stream-Up-To-Date": "true", "Stream-Cursor": response_cursor(cursor)}
            if closed:
                out[STREAM_CLOSED] = "true"
            return Response(status_code=204, headers=out)
        tail = messages[-1].seq
    else:
        tail = info.tail
    end = messages[-1].seq if messages else info.tail
    up_to_date = end >= tail
    headers[NEXT_OFFSET] = offset_of(end)
    if live == "long-poll":
        headers["Stream-Cursor"] = response_cursor(cursor)
    if up_to_date:
        headers["Stream-Up-To-Date"] = "true"
    at_closed_tail = closed and up_to_date
    if at_closed_tail:
        headers[STREAM_CLOSED] = "true"
    etag = _etag(path, offset or "-1", headers[NEXT_OFFSET], at_closed_tail)
    headers["etag"] = etag
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers={"etag": etag})
    body = _body_of(info, messages)
    if len(body) >= _COMPRESS_FROM and "gzip" in request.headers.get("accept-encoding", "").lower():
        body = gzip.compress(body, compresslevel=5)
        headers["content-encoding"] = "gzip"
        headers["vary"] = "accept-encoding"
    return Response(body, status_code=200, headers=headers)


async def _wait(source: _Source, after: int) -> tuple[list[Message], bool]:
    """Waits (through the hub) for messages after ``after``: (messages, closed); ([], False) on timeout."""
    settings: Settings = source.request.app.state.settings
    gone = asyncio.ensure_future(wait_disconnect(source.request.receive))
    try:
        async with asyncio.timeout(settings.ds_long_poll_timeout_s):
            async for batch in source.follow(after, gone):
                if batch:
                    messages = [Message(e.seq, e.data) for e in batch if not e.is_end]
                    closed = batch[-1].is_end
                    if messages or closed:
                        return messages, closed
    except _WAIT_ENDS:
        pass
    finally:
        gone.cancel()
    return [], False


def _sse(event: str, payload: str) -> bytes:
    # Every line of the payload gets its own data: field (no CR/LF smuggles an event in);
    # no space after the colon, which a client would strip from the payload.
    lines = re.split(r"\r\n|\r|\n", payload)
    return (f"event: {event}\n" + "\n".join("data:" + line for line in lines) + "\n\n").encode()


class _SSEResponse(Response):
    """``live=sse``: a data event per message, each followed by its control event; the
    stored history first, then the hub's live tail; a keep-alive control event at each
    heartbeat; a final ``streamClosed`` control event ends the response."""

    def __init__(self, source: _Source, info: Info, after: int, cursor: str | None) -> None:
        self.status_code = 200
        self.background = None
        self.source, self.info, self.after, self.cursor = source, info, after, cursor
        ct = info.content_type.split(";")[0].strip().lower()
        self.base64 = not (ct.startswith("text/") or ct == "application/json")
        headers = {"content-type": "text/event-stream", "cache-control": "no-cache", "x-accel-buffering": "no"}
        if self.base64:
            headers["Stream-SSE-Data-Encoding"] = "base64"
        headers.update(CORS_HEADERS)
        self.raw_headers = [(k.lower().encode(), v.encode()) for k, v in headers.items()]

    def _data(self, message: Message) -> bytes:
        if self.base64:
            payload = base64.b64encode(message.data).decode()
        elif self.info.json:
            payload = "[" + message.data.decode() + "]"
        else:
            payload = message.data.decode(errors="replace")
        return _sse("data", payload)

    def _control(self, seq: int, *, up_to_date: bool, closed: bool = False) -> bytes:
        control: dict[str, Any] = {"streamNextOffset": offset_of(seq)}
        if closed:
            control["streamClosed"] = True
        else:
            control["streamCursor"] = response_cursor(self.cursor)
            if up_to_date:
                control["upToDate"] = True
        return _sse("control", orjson.dumps(control).decode())

    def _frames(self, messages: list[Message], tail: int, closed: bool) -> bytes:
        parts = []
        for i, message in enumerate(messages):
            last = i == len(messages) - 1
            parts.append(self._data(message))
            at_tail = last and message.seq >= tail
            parts.append(self._control(message.seq, up_to_date=at_tail, closed=at_tail and closed))
        return b"".join(parts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gone: asyncio.Task[Any] = asyncio.ensure_future(wait_disconnect(receive))
        source, cursor = self.source, self.after
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            info = self.info
            sent = False
            while True:  # the stored history (a read answers at most FANLINE_DS_MAX_READ_BYTES)
                messages = await source.read(info, cursor)
                if messages:
                    await send(
                        {
                            "type": "http.response.body",
                            "body": self._frames(messages, info.tail, info.closed),
                            "more_body": True,
                        }
                    )
                    cursor, sent = messages[-1].seq, True
                if cursor >= info.tail or not messages:
                    break
                info = await source.info()
            if info.closed and cursor >= info.tail:
                if not sent:
                    await send(
                        {
                            "type": "http.response.body",
                            "body": self._control(cursor, up_to_date=True, closed=True),
                            "more_body": True,
                        }
                    )
                return
            if not sent:
                await send(
                    {"type": "http.response.body", "body": self._control(cursor, up_to_date=True), "more_body": True}
                )
            async for batch in source.follow(cursor, gone):
                if batch is None:
                    body = self._control(cursor, up_to_date=True)
                else:
                    messages = [Message(e.seq, e.data) for e in batch if not e.is_end]
                    closed = batch[-1].is_end
                    if messages:
                        body = self._frames(messages, messages[-1].seq, closed)
                        cursor = messages[-1].seq
                    else:
                        body = self._control(cursor, up_to_date=True, closed=closed)
                await send({"type": "http.response.body", "body": body, "more_body": True})
                if batch and batch[-1].is_end:
                    return
        except _SSE_ENDS:
            pass  # the client reconnects from its last control event's offset
        finally:
            gone.cancel()
            try:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            except Exception:  # the client is gone: nothing more to send
                pass
