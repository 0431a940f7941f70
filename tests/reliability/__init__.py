"""Fault injection and hostile input against real processes (issue 3; DESIGN.md Guarantees 1–6).

Tests that kill or restart something run it privately: their own Valkey
(``private_valkey``) and their own API pods and workers (``private_stack``), never
the session's shared fixtures. The helpers below read the three transports into
plain records, so a test can start viewers, inject a fault while they are
attached, and then check what each one got.

    async with private_valkey(tmp_path) as valkey, private_stack(valkey.url, "name", apis=2) as stack:
        viewer = asyncio.create_task(read_ndjson(stack.api_urls[0], gen_id, into=NdjsonRead()))
"""

from __future__ import annotations

import asyncio
import itertools
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from cli.valkey import EmbeddedValkey
from tests.support import REPO, Received, Stack, chat_body, read_sse

OUTPUT = REPO / "test-output" / "reliability"
TERMINAL = ("completed", "failed", "cancelled")


# -- private servers -----------------------------------------------------------


@contextmanager
def private_valkey(data_dir: Path, *, persistent: bool = False) -> Iterator[EmbeddedValkey]:
    """A Valkey of the test's own, which it may stop, kill and restart (same port and data dir)."""
    server = EmbeddedValkey(data_dir, persistent=persistent)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def private_stack(redis_url: str, name: str, *, apis: int = 2, workers: int = 1, **env: str) -> Iterator[Stack]:
    """API pods and workers of the test's own; ``env`` keys are lowercase setting names.

    Logs go to ``test-output/reliability/<name>/``, emptied first.
    """
    log_dir = OUTPUT / name
    shutil.rmtree(log_dir, ignore_errors=True)
    stack = Stack(redis_url, log_dir, {f"FANLINE_{k.upper()}": v for k, v in env.items()})
    try:
        stack.start(apis=apis, workers=workers)
        yield stack
    finally:
        stack.stop()


# -- waiting -----------------------------------------------------------------------


async def wait_until(check: Callable[[], Awaitable[bool] | bool], what: str, within: float = 15.0) -> None:
    """Polls ``check`` (sync or async) until it is true; fails after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(0.02)


async def create(base_url: str, max_tokens: int, prompt: str = "reliability", **headers: str) -> dict[str, Any]:
    """``POST /v1/generations``; returns the 201 body."""
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        response = await client.post(
            "/v1/generations", json=chat_body(prompt, stream=False, max_tokens=max_tokens), headers=headers
        )
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


async def status_of(base_url: str, gen_id: str, **headers: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        response = await client.get(f"/v1/generations/{gen_id}", headers=headers)
    assert response.status_code == 200, response.text
    info: dict[str, Any] = response.json()
    return info


async def settled(base_url: str, gen_id: str, within: float = 15.0) -> dict[str, Any]:
    """The generation once its status is terminal (the status is written right after the end event)."""
    info: dict[str, Any] = {}

    async def terminal() -> bool:
        info.update(await status_of(base_url, gen_id))
        return info["status"] in TERMINAL

    await wait_until(terminal, f"generation {gen_id} to reach a terminal status", within)
    return info


# -- ids and text ------------------------------------------------------------------


def seq_of(event_id: str) -> tuple[int, ...]:
    """Event ids are opaque but ordered like Redis stream ids."""
    return tuple(int(part) for part in event_id.split("-"))


def assert_strictly_increasing(ids: list[str]) -> None:
    assert all(seq_of(a) < seq_of(b) for a, b in itertools.pairwise(ids)), ids


def text_of(chunks: list[dict[str, Any]]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))


def finish_reason_of(chunks: list[dict[str, Any]]) -> str | None:
    reasons = [c["choices"][0]["finish_reason"] for c in chunks if c.get("choices")]
    return next((r for r in reversed(reasons) if r), None)


# -- SSE -------------------------------------------------------------------------


async def read_sse_at(base_url: str, gen_id: str, into: Received, last_event_id: str | None = None) -> Received:
    """One SSE viewer of ``gen_id``; ``into`` fills while it reads, so a test can watch its progress."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        return await read_sse(client, "GET", f"/v1/generations/{gen_id}/events", received=into, headers=headers)


@dataclass
class RawSse:
    """An SSE response read line by line, so hints that dispatch no event (``retry:``, comments) are seen."""

    lines: list[str] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    chunks: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    done: bool = False

    @property
    def events(self) -> int:
        return len(self.chunks) + len(self.errors)

    def feed(self, line: str) -> None:
        self.lines.append(line)
        if line.startswith("id:"):
            self.ids.append(line[3:].strip())
        elif line.startswith("data:"):
            data = line[5:].strip()
            if data == "[DONE]":
                self.done = True
                return
            payload = orjson.loads(data)
            (self.errors if "error" in payload else self.chunks).append(
                payload["error"] if "error" in payload else payload
            )


async def read_raw_sse(base_url: str, gen_id: str, into: RawSse) -> RawSse:
    """Reads until [DONE] or until the server ends the response (a drain ends it without [DONE])."""
    async with (
        httpx.AsyncClient(base_url=base_url, timeout=30) as client,
        client.stream("GET", f"/v1/generations/{gen_id}/events") as response,
    ):
        assert response.status_code == 200, (await response.aread()).decode()
        async for line in response.aiter_lines():
            into.feed(line)
            if into.done:
                break
    return into


# -- NDJSON --------------------------------------------------------------------------


@dataclass
class NdjsonRead:
    lines: list[dict[str, Any]] = field(default_factory=list)

    @property
    def chunks(self) -> list[dict[str, Any]]:
        return [line["chunk"] for line in self.lines if "chunk" in line]

    @property
    def ids(self) -> list[str]:
        """Ids of events (chunks, errors, the end); not of a reconnect hint, which repeats the last one."""
        return [line["id"] for line in self.lines if not line.get("reconnect")]

    @property
    def errors(self) -> list[dict[str, Any]]:
        return [line["error"] for line in self.lines if "error" in line]

    @property
    def done(self) -> bool:
        return bool(self.lines) and self.lines[-1].get("done") is True

    @property
    def events(self) -> int:
        return len(self.ids)


async def read_ndjson(base_url: str, gen_id: str, into: NdjsonRead, last_event_id: str | None = None) -> NdjsonRead:
    """Reads until ``{"done": true}``, or until the server ends the response."""
    headers = {"Accept": "application/x-ndjson"}
    if last_event_id:
        headers["Last-Event-ID"] = last_event_id
    async with (
        httpx.AsyncClient(base_url=base_url, timeout=30) as client,
        client.stream("GET", f"/v1/generations/{gen_id}/events", headers=headers) as response,
    ):
        assert response.status_code == 200, (await response.aread()).decode()
        async for line in response.aiter_lines():
            if line.strip():  # empty lines are heartbeats
                into.lines.append(orjson.loads(line))
                if into.done:
                    break
    return into


# -- WebSocket -----------------------------------------------------------------------


def ws_url(base_url: str, gen_id: str, last_event_id: str | None = None, token: str | None = None) -> str:
    url = base_url.replace("http://", "ws://", 1) + f"/v1/generations/{gen_id}/ws"
    query = [f"last_event_id={last_event_id}"] if last_event_id else []
    query += [f"token={token}"] if token else []
    return url + ("?" + "&".join(query) if query else "")


@dataclass
class WsRead:
    messages: list[dict[str, Any]] = field(default_factory=list)
    replies: list[dict[str, Any]] = field(default_factory=list)  # messages without an id (answers to the client)
    close_code: int | None = None

    @property
    def chunks(self) -> list[dict[str, Any]]:
        return [m["chunk"] for m in self.messages if "chunk" in m]

    @property
    def ids(self) -> list[str]:
        return [m["id"] for m in self.messages]

    @property
    def errors(self) -> list[dict[str, Any]]:
        return [m["error"] for m in self.messages if "error" in m]

    @property
    def done(self) -> bool:
        return bool(self.messages) and self.messages[-1].get("done") is True

    @property
    def events(self) -> int:
        return len(self.messages)


async def read_ws(url: str, into: WsRead, send: list[str | bytes] | None = None) -> WsRead:
    """Reads until the server closes; sends ``send`` after the first message; notes the close code.

    A connection that breaks without a close frame (a killed pod) leaves ``close_code`` 1006.
    """
    async with connect(url, open_timeout=10, close_timeout=5, max_size=None) as ws:
        try:
            while True:
                message = orjson.loads(await ws.recv())
                (into.messages if "id" in message else into.replies).append(message)
                if send and len(into.messages) == 1:
                    for item in send:
                        await ws.send(item)
        except ConnectionClosed:
            pass
        into.close_code = ws.close_code if ws.close_code is not None else 1006
    return into


# -- a streaming generation meanwhile ---------------------------------------------


@asynccontextmanager
async def streaming_meanwhile(base_url: str, max_tokens: int = 60) -> AsyncIterator[Received]:
    """A generation streaming over SSE while the block runs; on exit it must complete exactly."""
    received = Received()
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        viewer = asyncio.create_task(
            read_sse(client, "POST", "/v1/chat/completions", received=received, json=chat_body(max_tokens=max_tokens))
        )
        await wait_until(lambda: viewer.done() or len(received.chunks) >= 2, "the streaming generation to start")
        yield received
        await asyncio.wait_for(viewer, 60)
        info = (await client.get(f"/v1/generations/{received.gen_id}")).json()
    assert received.done and received.errors == [], received.errors
    assert received.finish_reason == "length"
    assert_strictly_increasing(received.ids)
    assert received.text == info["content"] != ""
    assert len(received.text.split()) == max_tokens
