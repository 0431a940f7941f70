"""``fanline chat``, ``fanline watch`` and ``fanline status``: terminal clients.

They resume after a dropped connection (with the last event id), print reasoning
dimmed and content normally, and ``chat`` cancels its generation on Ctrl-C.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import httpx
from httpx_sse import connect_sse

from fanline.client import DONE, GenerationError, Update, WatchError, parse_event
from fanline.client import watch as watch_updates

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
            try:
                parsed = parse_event(sse.id, sse.data)
            except GenerationError as exc:
                self.fail(exc)
                continue
            if parsed is DONE:
                self.done = True
                return
            if isinstance(parsed, Update):
                self.show(parsed)

    def show(self, update: Update) -> None:
        if update.reasoning:
            self._write(update.reasoning, dim=True)
        if update.content:
            self._write(update.content, dim=False)
        if update.finish_reason == "cancelled":
            print("\nfanline: cancelled", file=sys.stderr)

    def fail(self, exc: GenerationError) -> None:
        self.failed = True
        print(f"\nfanline: generation failed: {exc}", file=sys.stderr)

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


def _follow(url: str, gen_id: str, viewer: _Viewer, api_key: str | None) -> None:
    """Resume after the viewer's last event until the end (fanline.watch does the reconnecting)."""

    async def run() -> None:
        try:
            async for update in watch_updates(url, gen_id, last_event_id=viewer.last_event_id, api_key=api_key):
                viewer.last_event_id = update.id
                viewer.show(update)
        except GenerationError as exc:
            viewer.fail(exc)
        except WatchError as exc:
            raise SystemExit(f"fanline: {exc}") from None
        viewer.done = True

    asyncio.run(run())


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
                print("\nfanline: stream ended early; resuming…", file=sys.stderr)
                _follow(url, gen_id, viewer, api_key)
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
    try:
        _follow(url, gen_id, viewer, api_key)
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
