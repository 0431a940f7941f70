"""``fanline chat`` and ``fanline watch``: terminal viewers that resume after a dropped connection."""

from __future__ import annotations

import sys
import time
from typing import Any

import httpx
import orjson
from httpx_sse import connect_sse

MAX_RECONNECTS = 20


class _Viewer:
    """Prints a generation's SSE events and remembers the last event id."""

    def __init__(self) -> None:
        self.last_event_id: str | None = None
        self.done = False
        self.failed = False

    def consume(self, response: httpx.Response, source: Any) -> None:
        if response.status_code != 200:
            response.read()
            raise SystemExit(f"fanline: {response.status_code} {response.text}")
        for sse in source.iter_sse():
            if sse.id:
                self.last_event_id = sse.id
            if sse.data == "[DONE]":
                self.done = True
                return
            if not sse.data:
                continue
            payload = orjson.loads(sse.data)
            if "error" in payload:
                self.failed = True
                print(f"\nfanline: generation failed: {payload['error'].get('message')}", file=sys.stderr)
                continue
            for choice in payload.get("choices", ()):
                text = choice.get("delta", {}).get("content")
                if text:
                    sys.stdout.write(text)
                    sys.stdout.flush()


def _follow(client: httpx.Client, gen_id: str, viewer: _Viewer) -> None:
    """Resume through the events endpoint until the end, with backoff between attempts."""
    for attempt in range(MAX_RECONNECTS):
        headers = {"Last-Event-ID": viewer.last_event_id} if viewer.last_event_id else {}
        try:
            with connect_sse(client, "GET", f"/v1/generations/{gen_id}/events", headers=headers) as source:
                viewer.consume(source.response, source)
        except httpx.TransportError as exc:
            print(f"\nfanline: connection lost ({exc}); resuming…", file=sys.stderr)
            time.sleep(min(0.2 * 2**attempt, 5.0))
            continue
        if viewer.done:
            return
    raise SystemExit("fanline: gave up reconnecting")


def chat(url: str, prompt: str, model: str, max_tokens: int | None) -> int:
    body: dict[str, Any] = {"model": model, "stream": True, "messages": [{"role": "user", "content": prompt}]}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    viewer = _Viewer()
    with httpx.Client(base_url=url, timeout=httpx.Timeout(10.0, read=60.0)) as client:
        try:
            with connect_sse(client, "POST", "/v1/chat/completions", json=body) as source:
                gen_id = source.response.headers.get("x-fanline-generation-id", "")
                try:
                    viewer.consume(source.response, source)
                except httpx.TransportError as exc:
                    print(f"\nfanline: connection lost ({exc}); resuming…", file=sys.stderr)
        except httpx.ConnectError as exc:
            raise SystemExit(f"fanline: cannot reach {url}: {exc}") from None
        if not viewer.done and gen_id:
            _follow(client, gen_id, viewer)
    print()
    print(f"generation {gen_id}", file=sys.stderr)
    return 1 if viewer.failed else 0


def watch(url: str, gen_id: str, last_event_id: str | None) -> int:
    viewer = _Viewer()
    viewer.last_event_id = last_event_id
    with httpx.Client(base_url=url, timeout=httpx.Timeout(10.0, read=60.0)) as client:
        _follow(client, gen_id, viewer)
    print()
    return 1 if viewer.failed else 0
