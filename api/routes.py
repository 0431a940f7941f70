"""The HTTP and WebSocket endpoints (see DESIGN.md, "HTTP API")."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
from fastapi import APIRouter, Request, WebSocket
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError

from fanline.api import metrics, transports
from fanline.api.auth import GEN_HEADER, WATCH_TOKEN_HEADER, Auth
from fanline.api.errors import error_response
from fanline.api.generations import Generation, Generations, check_size, parse_request
from fanline.api.hub import Hub
from fanline.api.transports.ndjson import NDJSON
from fanline.api.transports.sse import SSE
from fanline.api.transports.websocket import serve as serve_websocket
from fanline.shared import events
from fanline.shared.errors import Conflict, FanlineError, InvalidRequest, RequestTimeout
from fanline.shared.ids import parse_event_id
from fanline.shared.requests import ChatCompletionRequest
from fanline.shared.settings import Settings

router = APIRouter()


def _hub(request: Request | WebSocket) -> Hub:
    hub: Hub = request.app.state.hub
    return hub


def auth_of(conn: Request | WebSocket) -> Auth:
    auth: Auth = conn.app.state.auth
    return auth


def _generations(request: Request | WebSocket) -> Generations:
    generations: Generations = request.app.state.generations
    return generations


async def _read_request(request: Request) -> ChatCompletionRequest:
    return parse_request(await read_body(request), request.app.state.settings)


async def read_body(request: Request) -> bytes:
    """The body, refused with 413 as soon as it passes the limit (never buffered whole first),
    and with 408 if it does not arrive in time."""
    settings: Settings = request.app.state.settings
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit():
        check_size(int(declared), settings)
    body = bytearray()
    try:
        async with asyncio.timeout(settings.body_timeout_s):
            async for part in request.stream():
                body += part
                check_size(len(body), settings)
    except TimeoutError:
        raise RequestTimeout(f"the request body did not arrive within {settings.body_timeout_s:.0f} s") from None
    return bytes(body)


def _cursor(generation: Generation, last_event_id: str | None) -> int:
    """Where a viewer starts: strictly after ``last_event_id``."""
    cursor = parse_event_id(last_event_id) if last_event_id else 0
    if cursor > generation.last_seq:
        raise InvalidRequest(
            f"event id {last_event_id} is not an event of generation {generation.id}",
            code="invalid_last_event_id",
            param="Last-Event-ID",
        )
    if generation.finished and cursor == generation.last_seq and cursor > 0:
        cursor -= 1  # resuming after the end: send the end again, so the client stops
    return cursor


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(request: Request) -> Response | transports.EventStreamResponse:
    started_at = time.monotonic()
    owner = auth_of(request).require_key(request)
    body = await _read_request(request)
    gen_id = await _generations(request).create(body, owner)
    headers = auth_of(request).creation_headers(gen_id)
    if body.stream:
        return transports.EventStreamResponse(_hub(request), gen_id, 0, SSE(), headers, started_at)
    return await _complete(request, gen_id, headers)


async def _complete(request: Request, gen_id: str, headers: dict[str, str]) -> Response:
    """Non-streaming: wait for the end through the hub, then answer with a chat.completion."""
    gone = asyncio.ensure_future(transports.wait_disconnect(request.receive))
    error: bytes | None = None
    try:
        async for batch in _hub(request).follow(gen_id, 0, gone, drainable=False):
            for event in batch or ():
                if event.kind == events.ERROR:
                    error = event.data
    finally:
        gone.cancel()
    if error is not None:
        return Response(error, status_code=500, media_type="application/json", headers=headers)
    info = await _generations(request).describe(gen_id)
    completion = {
        "id": events.completion_id(gen_id),
        "object": "chat.completion",
        "created": info["created"],
        "model": info["model"],
        "choices": [
            {
                "index": 0,
                "message": _message(info),
                "logprobs": None,
                "finish_reason": info["finish_reason"],
            }
        ],
        "usage": info["usage"],
    }
    return Response(orjson.dumps(completion), media_type="application/json", headers=headers)


def _message(info: dict[str, Any]) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": info["content"], "refusal": None}
    if info["reasoning"]:
        message["reasoning_content"] = info["reasoning"]
    if info["tool_calls"]:
        message["tool_calls"] = info["tool_calls"]
    return message


@router.post("/v1/generations", status_code=201)
async def create_generation(request: Request) -> JSONResponse:
    auth = auth_of(request)
    owner = auth.require_key(request)
    body = await _read_request(request)
    gen_id = await _generations(request).create(body, owner)
    created: dict[str, str] = {
        "id": gen_id,
        "object": "generation",
        "status": "queued",
        "events_url": f"/v1/generations/{gen_id}/events",
        "ws_url": f"/v1/generations/{gen_id}/ws",
    }
    headers = auth.creation_headers(gen_id)
    if WATCH_TOKEN_HEADER in headers:
        created["watch_token"] = headers[WATCH_TOKEN_HEADER]
    return JSONResponse(created, status_code=201, headers=headers)


@router.get("/v1/generations/{gen_id}")
async def get_generation(request: Request, gen_id: str) -> Response:
    auth_of(request).require_read(request, gen_id)
    return Response(orjson.dumps(await _generations(request).describe(gen_id)), media_type="application/json")


@router.get("/v1/generations/{gen_id}/events", response_model=None)
async def generation_events(request: Request, gen_id: str) -> transports.EventStreamResponse:
    return await events_response(request, gen_id)


async def events_response(request: Request, gen_id: str) -> transports.EventStreamResponse:
    """Watch or resume (also served by api.app.Edge, outside FastAPI, as the hot path)."""
    auth_of(request).require_read(request, gen_id)
    last_event_id = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
    generation = await _generations(request).get(gen_id)
    cursor = _cursor(generation, last_event_id)
    transport: transports.Transport = NDJSON() if "application/x-ndjson" in request.headers.get("accept", "") else SSE()
    return transports.EventStreamResponse(_hub(request), gen_id, cursor, transport, {GEN_HEADER: gen_id})


@router.post("/v1/generations/{gen_id}/cancel", status_code=202)
async def cancel_generation(request: Request, gen_id: str) -> JSONResponse:
    owner = auth_of(request).require_key(request)
    status = await _generations(request).cancel(gen_id, owner)
    return JSONResponse({"id": gen_id, "object": "generation", "status": status}, status_code=202)


@router.websocket("/v1/generations/{gen_id}/ws")
async def generation_ws(websocket: WebSocket, gen_id: str) -> None:
    generations = _generations(websocket)
    auth = auth_of(websocket)
    try:
        auth.require_read(websocket, gen_id)
        generation = await generations.get(gen_id)
        cursor = _cursor(generation, websocket.query_params.get("last_event_id"))
    except FanlineError as exc:
        # Refuse before the handshake completes: the client sees the HTTP status and body.
        try:
            await websocket.send_denial_response(error_response(exc))
        except RuntimeError:  # a server without the denial-response extension
            await websocket.close(4000 + exc.status, exc.message[:120])
        return
    await websocket.accept()

    async def cancel() -> None:
        # Cancelling needs the API key that created the generation; a watch token only reads.
        owner = auth.require_key(websocket)
        try:
            await generations.cancel(gen_id, owner)
        except Conflict:
            pass  # already finished: the stream ends by itself

    await serve_websocket(websocket, _hub(websocket), gen_id, cursor, cancel)


@router.get("/metrics")
async def metrics_endpoint(request: Request) -> Response:
    auth_of(request).require_key(request)
    settings: Settings = request.app.state.settings
    try:
        metrics.QUEUE_DEPTH.set(await request.app.state.queue.zcard(settings.queue_name))
    except RedisError:
        metrics.REDIS_ERRORS.labels("metrics").inc()
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    state = request.app.state
    problems = []
    if state.draining:
        problems.append("draining")
    try:
        await asyncio.wait_for(state.redis.ping(), timeout=2.0)
        await asyncio.wait_for(state.queue.ping(), timeout=2.0)
    except Exception as exc:
        problems.append(f"redis: {type(exc).__name__}")
    if problems:
        return JSONResponse({"status": "not ready", "problems": problems}, status_code=503)
    return JSONResponse({"status": "ready"})
