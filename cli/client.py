"""``fanline chat``, ``fanline watch`` and ``fanline status``: terminal clients.

They resume after a dropped connection (with the last event id), print reasoning
dimmed and content normally, and ``chat`` cancels its generation on Ctrl-C.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import httpx
import orjson
from httpx_sse import connect_sse

MAX_RECONNECTS = 20
_DIM, _RESET = "\033[2m", "\033[0m"


class _Viewer:
    """Prints a generation's SSE events and remembers the last event id."""

    def __init__(self) -> None:
        self.last_event_id: str | None = None
        self.done = False
        self.failed = False
        self._dim = sys.stdout.isatty()
        self._in_reasoning = False

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
                delta = choice.get("delta", {})
                reasoning = delta.get("reasoning_content") or delta.get("reasoning")
                if reasoning:
                    self._write(reasoning, dim=True)
                if delta.get("content"):
                    self._write(delta["content"], dim=False)
                if choice.get("finish_reason") == "cancelled":
                    print("\nfanline: cancelled", file=sys.stderr)

    def _write(self, text: str, *, dim: bool) -> None:
        if self._dim and dim != self._in_reasoning:
            sys.stdout.write(_DIM if dim else _RESET)
            self._in_reasoning = dim
        sys.stdout.write(text)
        sys.stdout.flush()

    def close(self) -> None:
        if self._in_reasoning:
            sys.stdout.write(_RESET)
        print()


def _client(url: str, api_key: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.Client(base_url=url, headers=headers, timeout=httpx.Timeout(10.0, read=60.0))


def _follow(client: httpx.Client, gen_id: str, viewer: _Viewer) -> None:
    """Resume through the events endpoint until the end, with backoff between attempts."""
    for attempt in range(MAX_RECONNECTS):
        headers = {"Last-Event-ID": viewer.last_event_id} if viewer.last_event_id else {}
        try:
            with connect_sse(client, "GET", f"/v1/generations/{gen_id}/events", headers=headers) as source:
                viewer.consume(source.response, source)
        except httpx.TransportError as exc:
            print(f"\nfanline: connection lost ({type(exc).__name__}); resuming…", file=sys.stderr)
            time.sleep(min(0.2 * 2**attempt, 5.0))
            continue
        if viewer.done:
            return
        print("\nfanline: stream closed early (the server asked to reconnect); resuming…", file=sys.stderr)
    raise SystemExit("fanline: gave up reconnecting")


def chat(url: str, prompt: str, model: str, max_tokens: int | None, api_key: str | None) -> int:
    body: dict[str, Any] = {"model": model, "stream": True, "messages": [{"role": "user", "content": prompt}]}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    viewer = _Viewer()
    gen_id = ""
    with _client(url, api_key) as client:
        try:
            try:
                with connect_sse(client, "POST", "/v1/chat/completions", json=body) as source:
                    gen_id = source.response.headers.get("x-fanline-generation-id", "")
                    try:
                        viewer.consume(source.response, source)
                    except httpx.TransportError as exc:
                        print(f"\nfanline: connection lost ({type(exc).__name__}); resuming…", file=sys.stderr)
            except httpx.ConnectError as exc:
                raise SystemExit(f"fanline: cannot reach {url}: {exc}") from None
            if not viewer.done and gen_id:
                _follow(client, gen_id, viewer)
        except KeyboardInterrupt:
            viewer.close()
            if gen_id:
                client.post(f"/v1/generations/{gen_id}/cancel")
                print(f"fanline: cancelled generation {gen_id}", file=sys.stderr)
            return 130
    viewer.close()
    print(f"generation {gen_id}", file=sys.stderr)
    return 1 if viewer.failed else 0


def watch(url: str, gen_id: str, last_event_id: str | None, api_key: str | None) -> int:
    viewer = _Viewer()
    viewer.last_event_id = last_event_id
    with _client(url, api_key) as client:
        try:
            _follow(client, gen_id, viewer)
        except KeyboardInterrupt:
            pass  # watching only: the generation goes on
    viewer.close()
    return 1 if viewer.failed else 0


def status(url: str, gen_id: str, api_key: str | None) -> int:
    with _client(url, api_key) as client:
        try:
            response = client.get(f"/v1/generations/{gen_id}")
        except httpx.TransportError as exc:
            raise SystemExit(f"fanline: cannot reach {url}: {exc}") from None
    if response.status_code != 200:
        raise SystemExit(f"fanline: {response.status_code} {response.text}")
    info = response.json()
    for name in ("id", "status", "model", "finish_reason", "last_event_id", "usage", "error"):
        if info.get(name) is not None:
            print(f"{name:>14}: {info[name]}")
    print(f"{'content':>14}: {len(info.get('content') or '')} characters")
    return 0
