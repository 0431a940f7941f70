"""Fault injection and hostile input against real processes (issue 3; DESIGN.md Guarantees 1–6).

Tests that kill or restart something run it privately: their own Valkey
(``private_valkey``) and their own API pods and workers (``private_stack``), never
the session's shared fixtures. The readers in ``tests.support`` (``read_sse_at``,
``read_ndjson_at``, ``read_ws``) read the three transports into plain records, so a
test can start viewers, inject a fault while they are attached, and then check what
each one got.

    async with private_valkey(tmp_path) as valkey, private_stack(valkey.url, "name", apis=2) as stack:
        viewer = asyncio.create_task(read_ndjson_at(stack.api_urls[0], gen_id, into=NdjsonRead()))
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson

from fanline.cli.valkey import EmbeddedValkey
from tests.support import REPO, Received, Stack, assert_strictly_increasing, chat_body, read_sse, wait_until

OUTPUT = REPO / "test-output" / "reliability"


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


# -- SSE, line by line ---------------------------------------------------------------


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
