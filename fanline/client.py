"""Watch a generation from Python, resuming by itself (the ``openai`` SDK does not resume).

    async for update in fanline.watch("http://127.0.0.1:8000", gen_id):
        print(update.content, end="")

``watch`` reads ``GET /v1/generations/{id}/events`` (SSE) and, when the connection drops
or a pod asks its viewers to reconnect (a drain), reads again strictly after the last
event id it saw, on the next of the given URLs (several pods, or one load balancer). So
the updates it yields are exactly the generation's events, in order, with no gap and no
duplicate, whatever happens to the connection. It ends after the generation's end, and
raises :class:`GenerationError` for an error event (e.g. ``worker_lost``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
from httpx_sse import aconnect_sse

MAX_RECONNECTS = 20


class WatchError(Exception):
    """The generation cannot be watched: an HTTP error answer (401, 403, 404, 400...), or no pod reachable."""

    def __init__(self, message: str, status: int | None = None, body: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


class GenerationError(Exception):
    """The generation ended with an error event; ``code`` is e.g. ``worker_lost``."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Update:
    """One event of a generation: its id, and its chunk's first choice's delta."""

    id: str
    delta: dict[str, Any] = field(default_factory=dict)
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    chunk: dict[str, Any] = field(default_factory=dict)

    @property
    def content(self) -> str:
        return str(self.delta.get("content") or "")

    @property
    def reasoning(self) -> str:
        return str(self.delta.get("reasoning_content") or self.delta.get("reasoning") or "")


DONE = object()  # what parse_event returns for ``data: [DONE]``


def parse_event(event_id: str, data: str) -> Update | object | None:
    """One SSE event of a fanline stream: an Update, DONE, or None (nothing in it).

    Raises GenerationError for an error event (the stream's ``[DONE]`` follows it).
    """
    if data == "[DONE]":
        return DONE
    if not data:
        return None
    payload = orjson.loads(data)
    if "error" in payload:
        error = payload["error"]
        raise GenerationError(str(error.get("message")), str(error.get("code")))
    choices = payload.get("choices") or [{}]
    return Update(
        id=event_id,
        delta=choices[0].get("delta") or {},
        finish_reason=choices[0].get("finish_reason"),
        usage=payload.get("usage"),
        chunk=payload,
    )


async def watch(
    url: str | Sequence[str],
    gen_id: str,
    *,
    last_event_id: str | None = None,
    api_key: str | None = None,
    max_reconnects: int = MAX_RECONNECTS,
    client: httpx.AsyncClient | None = None,
) -> AsyncIterator[Update]:
    """Yield the generation's updates after ``last_event_id`` (from the start when None), resuming on drops.

    ``url`` is one base URL or several (API pods): after a failed or dropped connection the
    next one is tried. ``api_key`` may also be the generation's watch token.
    """
    urls = [url] if isinstance(url, str) else list(url)
    if not urls:
        raise ValueError("watch needs at least one URL")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    own = client is None
    http = client or httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=60.0))
    cursor = last_event_id
    failures = 0
    try:
        for attempt in range(max_reconnects + 1):
            base = urls[attempt % len(urls)].rstrip("/")
            request_headers = {**headers, **({"Last-Event-ID": cursor} if cursor else {})}
            try:
                async with aconnect_sse(
                    http, "GET", f"{base}/v1/generations/{gen_id}/events", headers=request_headers
                ) as source:
                    response = source.response
                    if response.status_code == 503:  # draining or no Redis: another pod, or later
                        raise httpx.TransportError(f"{base} answered 503")
                    if response.status_code != 200:
                        await response.aread()
                        raise WatchError(f"{response.status_code} {response.text}", response.status_code, response.text)
                    async for sse in source.aiter_sse():
                        parsed = parse_event(sse.id, sse.data)
                        if sse.id:
                            cursor = sse.id
                        if parsed is DONE:
                            return
                        if isinstance(parsed, Update):
                            failures = 0
                            yield parsed
            except httpx.TransportError:
                failures += 1
                await asyncio.sleep(min(0.1 * 2 ** min(failures - 1, 6), 5.0) if failures > len(urls) else 0)
                continue
            # The stream closed before [DONE]: the pod asked its viewers to reconnect (a drain).
        raise WatchError(f"gave up after {max_reconnects} reconnects")
    finally:
        if own:
            await http.aclose()
