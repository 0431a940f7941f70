"""The OpenAI-compatible upstream: stream a chat completion from vLLM, Ollama, llama.cpp, OpenAI, LiteLLM…

    FANLINE_GENERATOR=openai
    FANLINE_UPSTREAM_BASE_URL=http://127.0.0.1:11434/v1    # POST {base}/chat/completions
    FANLINE_UPSTREAM_API_KEY=sk-…                           # sent as a bearer token, when set
    FANLINE_UPSTREAM_MODEL=llama3.1                         # when set, instead of the request's model
    FANLINE_UPSTREAM_TIMEOUT_S=60                           # longest silence from the upstream

The request's messages and parameters go upstream as fanline validated them, with
``stream: true`` and ``stream_options.include_usage``. Every field of each chunk's
delta is republished as sent (``content``, ``reasoning_content`` / ``reasoning``,
``refusal``, ``tool_calls`` fragments, the choice's ``logprobs``, and fields fanline
does not know); only ``role`` (the publisher sends it once, first) and null fields
are left out. The upstream's ``finish_reason`` and ``usage`` become the generation's.

Every way the upstream can fail ends the generation with an error event, never a
hang and never a silently short answer:

    code                      when
    upstream_not_configured   FANLINE_UPSTREAM_BASE_URL is empty or not an http(s) URL
    upstream_unreachable      connection refused, unknown host, TLS failure, connect timeout
    upstream_unauthorized     401, 403
    upstream_rate_limited     429; the message says when to retry (Retry-After)
    upstream_bad_request      any other 4xx (unknown model, context too long…)
    upstream_error            5xx, other statuses, an error payload mid-stream, an answer not in OpenAI's format
    upstream_timeout          nothing received for upstream_timeout_s (waiting for the answer or between chunks)
    upstream_disconnected     the connection dropped, or the stream ended without finish_reason or [DONE]

Messages name the upstream's status, its message and its code, e.g.
``upstream 429 Too Many Requests (retry after 20 s): Rate limit reached… [code: rate_limit_exceeded]``.

Cancel: the job cancels the generator's task; leaving the ``async with`` around the
response closes its connection at once, so the upstream stops generating.
"""

from __future__ import annotations

import asyncio
import logging
import os
import weakref
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import Any, cast

import httpx
import orjson

from fanline.shared.errors import GenerationFailed
from fanline.shared.events import Delta
from fanline.shared.requests import ChatCompletionRequest
from fanline.worker.generators import GenerationContext

log = logging.getLogger("fanline.worker")

# How much of an error response's body is read for its message.
_ERROR_BODY_BYTES = 64 * 1024

# One connection pool per event loop (one per worker process): keep-alive saves a
# TCP (and TLS) handshake per generation.
_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = weakref.WeakKeyDictionary()


def _client() -> httpx.AsyncClient:
    loop = asyncio.get_running_loop()
    client = _clients.get(loop)
    if client is None or client.is_closed:
        client = httpx.AsyncClient(limits=httpx.Limits(max_connections=None, max_keepalive_connections=32))
        _clients[loop] = client
    return client


def upstream_body(request: ChatCompletionRequest, model: str) -> dict[str, Any]:
    """The request as the upstream gets it: the client's messages and parameters, streamed, with usage."""
    body = request.model_dump(mode="json", exclude_none=True, exclude={"stream", "stream_options", "n"})
    body["model"] = model
    body["stream"] = True
    body["stream_options"] = {"include_usage": True}
    return body


async def openai(request: ChatCompletionRequest, ctx: GenerationContext) -> AsyncIterator[Delta]:
    settings = ctx.settings
    base = settings.upstream_base_url.strip().rstrip("/")
    if not base.startswith(("http://", "https://")):
        message = "FANLINE_UPSTREAM_BASE_URL must be the upstream's http(s) base URL, e.g. http://host:8000/v1"
        raise _failed(ctx, message, "upstream_not_configured")
    url = base + "/chat/completions"
    headers = {"Accept": "text/event-stream"}
    if settings.upstream_api_key:
        headers["Authorization"] = f"Bearer {settings.upstream_api_key}"
    body = upstream_body(request, settings.upstream_model or request.model)
    # read: the longest wait for the next bytes (the response head, or the next chunk).
    timeout = httpx.Timeout(settings.upstream_timeout_s, connect=min(settings.upstream_timeout_s, 30.0))
    try:
        async with _client().stream("POST", url, json=body, headers=headers, timeout=timeout) as response:
            if not response.is_success:
                raise _failed(ctx, *await _status_error(response))
            content_type = response.headers.get("content-type", "")
            if content_type.startswith("application/json"):
                # A server that ignored stream: true answered with one chat.completion.
                deltas = _whole(ctx, await response.aread())
            elif content_type and "event-stream" not in content_type:
                # A web page, say: FANLINE_UPSTREAM_BASE_URL is not an OpenAI API.
                snippet = (await _head_of(response)).decode(errors="replace").strip()[:200]
                message = f"the upstream answered {content_type} instead of an event stream: {snippet!r}"
                raise _failed(ctx, message + f" (is {base} an OpenAI-compatible /v1 URL?)", "upstream_error")
            else:
                deltas = _stream(ctx, response)
            async with aclosing(deltas):
                async for delta in deltas:
                    yield delta
    except httpx.HTTPError as exc:
        raise _failed(ctx, *_transport_error(exc, url, timeout)) from exc


def _transport_error(exc: httpx.HTTPError, url: str, timeout: httpx.Timeout) -> tuple[str, str]:
    """(message, code) for a request that failed below HTTP."""
    reason = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.ConnectTimeout):
        return f"could not connect to the upstream at {url} within {timeout.connect:g} s", "upstream_unreachable"
    if isinstance(exc, httpx.ConnectError):
        return f"could not connect to the upstream at {url}: {_root_cause(exc)}", "upstream_unreachable"
    if isinstance(exc, httpx.TimeoutException):
        return f"the upstream sent nothing for {timeout.read:g} s (FANLINE_UPSTREAM_TIMEOUT_S)", "upstream_timeout"
    if isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError | httpx.WriteError):
        return f"the upstream connection dropped before the answer was complete: {reason}", "upstream_disconnected"
    if isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL):
        return f"bad FANLINE_UPSTREAM_BASE_URL ({url}): {reason}", "upstream_not_configured"
    return f"the upstream request failed: {type(exc).__name__}: {reason}", "upstream_error"


def _root_cause(exc: BaseException) -> str:
    """The innermost OS error's text ("Connection refused", "Name or service not known"), else the exception's."""
    reason = str(exc) or type(exc).__name__
    cause = exc.__cause__ or exc.__context__
    while cause is not None:
        if isinstance(cause, OSError) and cause.strerror:
            # asyncio words a refusal "Connect call failed (addr)": the errno's own text is clearer.
            reason = os.strerror(cause.errno) if cause.errno and cause.errno > 0 else cause.strerror
        cause = cause.__cause__ or cause.__context__
    return reason


async def _stream(ctx: GenerationContext, response: httpx.Response) -> AsyncGenerator[Delta, None]:
    finish_reason: str | None = None
    done = False
    async with aclosing(_events(response)) as events:
        async for event, data in events:
            if data == "[DONE]":
                done = True
                break
            payload = _chunk(ctx, event, data)
            usage = payload.get("usage")
            if isinstance(usage, dict):
                ctx.usage = usage
            for choice in payload.get("choices") or ():
                if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                    continue
                delta = {k: v for k, v in (choice.get("delta") or {}).items() if v is not None and k != "role"}
                if choice.get("logprobs") is not None:
                    delta["logprobs"] = choice["logprobs"]
                if delta:
                    yield cast(Delta, delta)
                if isinstance(choice.get("finish_reason"), str):
                    finish_reason = choice["finish_reason"]
    if not done and finish_reason is None:
        # The body ended without [DONE] and without saying why: a truncated answer.
        message = "the upstream's stream ended before the answer was complete (no finish_reason, no [DONE])"
        raise _failed(ctx, message, "upstream_disconnected")
    ctx.finish_reason = finish_reason or "stop"


def _chunk(ctx: GenerationContext, event: str, data: str) -> dict[str, Any]:
    """One chunk's JSON; an error payload (OpenAI's, vLLM's, or an ``event: error``) fails the generation."""
    try:
        payload = orjson.loads(data)
    except orjson.JSONDecodeError:
        payload = None
    error = _error_of(payload) if isinstance(payload, dict) else None
    if event == "error" or error is not None:
        message, code = error or (data[:500], None)
        raise _failed(ctx, _describe("upstream error mid-stream", message, code), "upstream_error")
    if not isinstance(payload, dict):
        raise _failed(ctx, f"the upstream sent an unreadable chunk: {data[:200]!r}", "upstream_error")
    return payload


async def _events(response: httpx.Response) -> AsyncGenerator[tuple[str, str], None]:
    """``(event, data)`` per server-sent event. An event cut off by the end of the body is dropped, as the spec says."""
    event = ""
    data: list[str] = []
    async for line in response.aiter_lines():
        if not line:
            if data:
                yield event or "message", "\n".join(data)
            event, data = "", []
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data.append(value)
        elif name == "event":
            event = value


async def _whole(ctx: GenerationContext, content: bytes) -> AsyncGenerator[Delta, None]:
    """A non-streamed chat.completion, as one delta."""
    try:
        payload = orjson.loads(content)
    except orjson.JSONDecodeError:
        payload = None
    error = _error_of(payload) if isinstance(payload, dict) else None
    if error is not None:
        raise _failed(ctx, _describe("upstream error", *error), "upstream_error")
    choices = payload.get("choices") if isinstance(payload, dict) else None
    choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else None
    message = choice.get("message") if choice is not None else None
    if choice is None or not isinstance(message, dict):
        raise _failed(ctx, f"the upstream sent an unreadable answer: {content[:200]!r}", "upstream_error")
    delta: dict[str, Any] = {k: v for k, v in message.items() if v is not None and k not in ("role", "tool_calls")}
    if message.get("tool_calls"):
        delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]
    if choice.get("logprobs") is not None:
        delta["logprobs"] = choice["logprobs"]
    if isinstance(payload, dict) and isinstance(payload.get("usage"), dict):
        ctx.usage = payload["usage"]
    if delta:
        yield cast(Delta, delta)
    ctx.finish_reason = choice.get("finish_reason") or "stop"


async def _status_error(response: httpx.Response) -> tuple[str, str]:
    """(message, code) for an answer that is not a 2xx."""
    message, upstream_code = _message_of(await _head_of(response))
    status = response.status_code
    head = f"upstream {status} {response.reason_phrase}".rstrip()
    if status in (401, 403):
        code = "upstream_unauthorized"
    elif status == 429:
        code = "upstream_rate_limited"
        head += f" (retry after {_retry_after(response.headers)})"
    elif 400 <= status < 500:
        code = "upstream_bad_request"
    else:
        code = "upstream_error"
    return _describe(head, message, upstream_code), code


async def _head_of(response: httpx.Response) -> bytes:
    """The start of a body that is not the answer (an error's), for its message; what could be read of it."""
    content = b""
    try:
        async for part in response.aiter_bytes():
            content += part
            if len(content) >= _ERROR_BODY_BYTES:
                break
    except httpx.HTTPError:
        pass  # the status says enough
    return content


def _retry_after(headers: httpx.Headers) -> str:
    if "retry-after-ms" in headers:
        return f"{headers['retry-after-ms']} ms"
    value = headers.get("retry-after", "").strip()
    if not value:
        return "an unspecified time: no Retry-After header"
    return f"{value} s" if value.isdigit() else value


def _message_of(content: bytes) -> tuple[str, str | None]:
    """The message and code of an error body: OpenAI's ``{"error": {...}}``, vLLM's, Ollama's, FastAPI's, or text."""
    try:
        payload = orjson.loads(content)
    except orjson.JSONDecodeError:
        return content.decode(errors="replace").strip()[:500], None
    error = _error_of(payload) if isinstance(payload, dict) else None
    if error is not None:
        return error
    if isinstance(payload, dict) and "detail" in payload:
        return str(payload["detail"])[:500], None
    return content.decode(errors="replace").strip()[:500], None


def _error_of(payload: dict[str, Any]) -> tuple[str, str | None] | None:
    """(message, "code: …" or "type: …") of an error payload, or None if it is not one."""
    error = payload.get("error")
    if isinstance(error, str):  # Ollama, llama.cpp: {"error": "model 'x' not found"}
        return error[:500], None
    if not isinstance(error, dict):
        if payload.get("object") != "error":  # vLLM: {"object": "error", "message", "type", "code"}
            return None
        error = payload
    for label in ("code", "type"):
        if error.get(label) not in (None, ""):
            return str(error.get("message") or error)[:500], f"{label}: {error[label]}"
    return str(error.get("message") or error)[:500], None


def _describe(head: str, message: str, code: str | None) -> str:
    text = f"{head}: {message}" if message else head
    return f"{text} [{code}]" if code else text


def _failed(ctx: GenerationContext, message: str, code: str) -> GenerationFailed:
    log.warning("generation %s: %s (%s)", ctx.gen_id, message, code)
    return GenerationFailed(message, code=code)
