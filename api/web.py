"""The browser side: the demo page at ``/``, the JS client under ``/static/``, and the
Vercel AI SDK endpoints (see the README, "In the browser").

    GET  /                                   the demo page (no build step)
    GET  /static/fanline.js                  the JS client (ES module, no dependencies)
    GET  /static/fanline-react.js            the React hook (React is the app's own)
    POST /v1/ai-sdk/chat                     useChat's request → a UI message stream
    GET  /v1/ai-sdk/chat/{chat_id}/stream    resume: the chat's latest generation, replayed; 204 if none
    POST /v1/ai-sdk/chat/{chat_id}/stop      cancel the chat's latest generation

With FANLINE_API_KEYS set, the AI SDK endpoints need an API key, like the chat
endpoint; the page and the static files never do.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, Response

from fanline.api import transports
from fanline.api.generations import Generations, parse_request
from fanline.api.hub import Hub
from fanline.api.routes import auth_of, read_body
from fanline.api.transports import ai_sdk
from fanline.shared import keys
from fanline.shared.errors import Conflict, InvalidRequest, NotFound
from fanline.shared.requests import ChatCompletionRequest
from fanline.shared.settings import Settings

router = APIRouter(include_in_schema=False)

STATIC = Path(__file__).resolve().parent / "static"
_MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
# Revalidated on every load (ETag), so a stable path never serves a stale client.
_CACHE = {"cache-control": "no-cache", "x-content-type-options": "nosniff"}
_PAGE_HEADERS = {
    **_CACHE,
    "content-security-policy": (
        "default-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "referrer-policy": "no-referrer",
}


def _static_files() -> dict[str, Path]:
    return {p.name: p for p in STATIC.iterdir() if p.suffix in _MEDIA_TYPES and p.is_file()}


_FILES = _static_files()


@router.get("/")
async def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type=_MEDIA_TYPES[".html"], headers=_PAGE_HEADERS)


@router.get("/static/{name}")
async def static(name: str) -> FileResponse:
    path = _FILES.get(name)
    if path is None:
        raise NotFound(f"no static file {name[:64]!r}", code="not_found")
    return FileResponse(path, media_type=_MEDIA_TYPES[path.suffix], headers=_CACHE)


# -- the Vercel AI SDK ---------------------------------------------------------

_CHAT_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
# Request fields passed through to the generation (the AI SDK's `body` option).
_PASSTHROUGH = frozenset(ChatCompletionRequest.model_fields) - {"messages", "stream", "n"}


def _chat_id(value: Any) -> str:
    if not isinstance(value, str) or _CHAT_ID.fullmatch(value) is None:
        raise InvalidRequest(
            "id: the chat id must be 1-128 letters, digits, '-' or '_'", code="invalid_chat_id", param="id"
        )
    return value


def _text(message: dict[str, Any], index: int) -> str:
    """A UIMessage's text parts, joined (reasoning, files and tool parts are not sent back to the model)."""
    parts = message.get("parts")
    if isinstance(parts, list):
        return "".join(
            p["text"]
            for p in parts
            if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        )
    if isinstance(message.get("content"), str):
        return str(message["content"])
    raise InvalidRequest(f"messages.{index}: a UI message needs a parts list", code="invalid_value", param="messages")


def _completion_request(body: Any, settings: Settings) -> tuple[str, ChatCompletionRequest]:
    """useChat's body ({id, messages | message, trigger, messageId, ...body}) → (chat id, request)."""
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object", code="invalid_json")
    chat_id = _chat_id(body.get("id"))
    ui_messages = body.get("messages")
    if ui_messages is None and isinstance(body.get("message"), dict):
        ui_messages = [body["message"]]  # the docs' variant that sends only the newest message
    if not isinstance(ui_messages, list):
        raise InvalidRequest("messages: expected a list of UI messages", code="invalid_value", param="messages")
    messages = []
    for i, m in enumerate(ui_messages):
        if not isinstance(m, dict):
            raise InvalidRequest(f"messages.{i}: expected an object", code="invalid_value", param="messages")
        messages.append({"role": m.get("role"), "content": _text(m, i)})
    request: dict[str, Any] = {k: v for k, v in body.items() if k in _PASSTHROUGH}
    request.setdefault("model", settings.upstream_model or "demo")
    request["messages"] = messages
    request["stream"] = True
    return chat_id, parse_request(orjson.dumps(request), settings)


def _stream(request: Request, gen_id: str) -> transports.EventStreamResponse:
    hub: Hub = request.app.state.hub
    headers = {**auth_of(request).creation_headers(gen_id), **ai_sdk.HEADERS}
    return transports.EventStreamResponse(hub, gen_id, 0, ai_sdk.UIMessageStream(gen_id), headers)


async def _latest(request: Request, owner: str, chat_id: str) -> str | None:
    gen_id = await request.app.state.redis.get(keys.ai_sdk_chat_key(owner, _chat_id(chat_id)))
    return gen_id.decode() if gen_id else None


@router.post("/v1/ai-sdk/chat", response_model=None)
async def ai_sdk_chat(request: Request) -> transports.EventStreamResponse:
    settings: Settings = request.app.state.settings
    generations: Generations = request.app.state.generations
    owner = auth_of(request).require_key(request)
    raw = await read_body(request)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}", code="invalid_json") from None
    chat_id, completion = _completion_request(body, settings)
    gen_id = await generations.create(completion, owner)
    await request.app.state.redis.set(keys.ai_sdk_chat_key(owner, chat_id), gen_id, ex=keys.UNFINISHED_TTL_S)
    return _stream(request, gen_id)


@router.get("/v1/ai-sdk/chat/{chat_id}/stream", response_model=None)
async def ai_sdk_resume(request: Request, chat_id: str) -> Response | transports.EventStreamResponse:
    """The chat's latest answer from its first event (a replay, then live), or 204.

    Unlike the AI SDK example, a finished answer is replayed too (for as long as it
    is retained): a client that lost its connection just before the end must still
    get the end. The message id is stable, so the replay replaces the message.
    """
    owner = auth_of(request).require_key(request)
    gen_id = await _latest(request, owner, chat_id)
    if gen_id is None:
        return Response(status_code=204)
    generations: Generations = request.app.state.generations
    try:
        await generations.get(gen_id)
    except NotFound:
        return Response(status_code=204)  # retention has passed
    return _stream(request, gen_id)


@router.post("/v1/ai-sdk/chat/{chat_id}/stop")
async def ai_sdk_stop(request: Request, chat_id: str) -> JSONResponse:
    """Cancels the chat's latest answer; its stream ends with finishReason "other" (fanline: "cancelled")."""
    owner = auth_of(request).require_key(request)
    gen_id = await _latest(request, owner, chat_id)
    if gen_id is None:
        raise NotFound(f"chat {chat_id} has no generation", code="chat_not_found")
    generations: Generations = request.app.state.generations
    try:
        status = await generations.cancel(gen_id, owner)
    except Conflict:
        status = (await generations.get(gen_id)).status  # it had already finished
    return JSONResponse({"id": chat_id, "generation_id": gen_id, "status": status}, status_code=202)
