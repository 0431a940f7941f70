"""Helpers for tests that run real processes: Redis/Valkey servers, API pods, workers.

stack = Stack(redis_url, tmp_dir, env={"FANLINE_DEMO_TOKENS_PER_S": "0"})
stack.start(apis=2, workers=1)
... stack.api_urls[0] ...
stack.stop()

Below the processes: clients for the API and readers of the three transports (SSE,
NDJSON, WebSocket), shared by the test folders. A helper named ``..._at`` takes a
base URL and opens a client of its own; its sibling without the suffix takes an
``httpx.AsyncClient``.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
from httpx_sse import aconnect_sse
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from fanline.cli.valkey import free_port, spawn_logged, stop_process

REPO = Path(__file__).resolve().parent.parent
TERMINAL = ("completed", "failed", "cancelled")


def spawn(args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """A ``fanline`` subcommand as a real process, its output in ``log_path``."""
    return spawn_logged([sys.executable, "-m", "fanline.cli", *args], env, log_path, REPO)


def wait_http_ok(url: str, process: subprocess.Popen[bytes] | None = None, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before {url} answered")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer 200 within {timeout} s")


def start_asgi_app(target: str, env: dict[str, str], log_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    """An app of the user's kind (``module:app``) under uvicorn as a real process; its URL once it answers."""
    port = free_port()
    argv = [sys.executable, "-m", "uvicorn", target, "--port", str(port)]
    process = spawn_logged(argv, {**os.environ, **env}, log_path, REPO)
    url = f"http://127.0.0.1:{port}"
    wait_http_ok(url + "/openapi.json", process)
    return process, url


@dataclass
class Stack:
    """API pods and workers on one Redis, with a queue of their own."""

    redis_url: str
    log_dir: Path
    env_overrides: dict[str, str] = field(default_factory=dict)
    apis: list[subprocess.Popen[bytes]] = field(default_factory=list)
    api_urls: list[str] = field(default_factory=list)
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.env = {
            **os.environ,
            "FANLINE_REDIS_URL": self.redis_url,
            "FANLINE_QUEUE_NAME": f"fanline:test:{uuid.uuid4().hex[:8]}",
            "FANLINE_LOG_LEVEL": "warning",
            **self.env_overrides,
        }

    @property
    def url(self) -> str:
        return self.api_urls[0]

    def start_api(self) -> str:
        port = free_port()
        n = len(self.apis)
        process = spawn(["api", "--port", str(port)], self.env, self.log_dir / f"api{n}.log")
        url = f"http://127.0.0.1:{port}"
        wait_http_ok(url + "/readyz", process)
        self.apis.append(process)
        self.api_urls.append(url)
        return url

    def start_worker(self) -> subprocess.Popen[bytes]:
        process = spawn(["worker"], self.env, self.log_dir / f"worker{len(self.workers)}.log")
        self.workers.append(process)
        return process

    def start(self, apis: int = 2, workers: int = 1) -> Stack:
        for _ in range(workers):
            self.start_worker()
        for _ in range(apis):
            self.start_api()
        return self

    def stop(self) -> None:
        for process in self.apis + self.workers:
            stop_process(process)


# -- waiting --------------------------------------------------------------------


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


# -- event ids and text -----------------------------------------------------------


def seq_of(event_id: str) -> tuple[int, ...]:
    """Event ids are opaque but ordered like Redis stream ids (``<ms>-<seq>``)."""
    return tuple(int(part) for part in event_id.split("-"))


def assert_strictly_increasing(ids: list[str]) -> None:
    assert all(seq_of(a) < seq_of(b) for a, b in itertools.pairwise(ids)), ids


def text_of(chunks: list[dict[str, Any]]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))


def finish_reason_of(chunks: list[dict[str, Any]]) -> str | None:
    reasons = [c["choices"][0]["finish_reason"] for c in chunks if c.get("choices")]
    return next((r for r in reversed(reasons) if r), None)


# -- requests and SSE ---------------------------------------------------------


def chat_body(
    prompt: str = "hello", *, stream: bool = True, max_tokens: int | None = None, **extra: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "demo", "stream": stream, "messages": [{"role": "user", "content": prompt}]}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    body.update(extra)
    return body


@dataclass
class Received:
    """What one SSE viewer got."""

    ids: list[str] = field(default_factory=list)
    chunks: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    done: bool = False
    gen_id: str = ""
    times: list[float] = field(default_factory=list)  # time.monotonic() at each id's arrival (read_sse)

    @property
    def text(self) -> str:
        return text_of(self.chunks)

    @property
    def finish_reason(self) -> str | None:
        return finish_reason_of(self.chunks)


async def read_sse(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    received: Received | None = None,
    stop_after: int | None = None,
    **kwargs: Any,
) -> Received:
    """Reads an SSE stream into ``received``; stops after ``stop_after`` events if given (a dropped client)."""
    received = received or Received()
    async with aconnect_sse(client, method, url, **kwargs) as source:
        assert source.response.status_code == 200, (await source.response.aread()).decode()
        received.gen_id = received.gen_id or source.response.headers.get("x-fanline-generation-id", "")
        count = 0
        async for sse in source.aiter_sse():
            if sse.data == "[DONE]":
                received.done = True
                if sse.id:
                    received.ids.append(sse.id)
                    received.times.append(time.monotonic())
                return received
            payload = orjson.loads(sse.data)
            if sse.id:
                received.ids.append(sse.id)
                received.times.append(time.monotonic())
            if "error" in payload:
                received.errors.append(payload["error"])
            else:
                received.chunks.append(payload)
            count += 1
            if stop_after is not None and count >= stop_after:
                return received
    return received


async def read_sse_at(base_url: str, gen_id: str, into: Received, last_event_id: str | None = None) -> Received:
    """One SSE viewer of ``gen_id``; ``into`` fills while it reads, so a test can watch its progress."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        return await read_sse(client, "GET", f"/v1/generations/{gen_id}/events", received=into, headers=headers)


async def watch(client: httpx.AsyncClient, gen_id: str, streaming: asyncio.Event) -> Received:
    """One SSE viewer of ``gen_id`` from the start to [DONE]; sets ``streaming`` once text has arrived."""
    received = Received(gen_id=gen_id)
    async with aconnect_sse(client, "GET", f"/v1/generations/{gen_id}/events") as source:
        assert source.response.status_code == 200
        async for sse in source.aiter_sse():
            received.ids.append(sse.id)
            if sse.data == "[DONE]":
                received.done = True
                break
            payload = orjson.loads(sse.data)
            if "error" in payload:
                received.errors.append(payload["error"])
            else:
                received.chunks.append(payload)
            if received.text:
                streaming.set()
    return received


async def watch_at(base_url: str, gen_id: str, streaming: asyncio.Event) -> Received:
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        return await watch(client, gen_id, streaming)


def parse_sse(body: bytes) -> list[tuple[str, bytes]]:
    """(id, data) of each event in an SSE body, by the SSE rules (comments and retry lines skipped).

    An event the body breaks off in (no blank line after it) is not dispatched.
    """
    frames: list[tuple[str, bytes]] = []
    event_id, data = "", b""
    for line in body.split(b"\n"):
        if not line:
            if data:
                frames.append((event_id, data))
            event_id, data = "", b""
        elif line.startswith(b"id: "):
            event_id = line[4:].decode()
        elif line.startswith(b"data: "):
            data = line[6:]
    return frames


# -- generations ------------------------------------------------------------------


async def create(client: httpx.AsyncClient, **body: Any) -> str:
    """``POST /v1/generations`` of ``chat_body(stream=False, **body)``; returns the new generation's id."""
    response = await client.post("/v1/generations", json=chat_body(stream=False, **body))
    assert response.status_code == 201, response.text
    gen_id: str = response.json()["id"]
    return gen_id


async def create_at(base_url: str, **body: Any) -> str:
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        return await create(client, **body)


async def generation(client: httpx.AsyncClient, gen_id: str) -> dict[str, Any]:
    response = await client.get(f"/v1/generations/{gen_id}")
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


async def generation_at(base_url: str, gen_id: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        return await generation(client, gen_id)


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """The OpenAI error body with a fitting status (and ``code``, if given); returns the error."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json"), response.headers
    error: dict[str, Any] = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    assert isinstance(error["code"], str) and error["code"]
    assert code is None or error["code"] == code, error
    return error


async def settled(client: httpx.AsyncClient, gen_id: str) -> dict[str, Any]:
    """The generation once its status is terminal; after 10 s, whatever it is then (the caller checks it).

    The worker writes the status one round trip after the end event, and nothing
    announces that write, so this polls (with a bound). The race itself is pinned by
    tests/api/test_transports.py::test_status_is_final_when_the_stream_ends.
    """
    deadline = time.monotonic() + 10
    while True:
        info = await generation(client, gen_id)
        if info["status"] in TERMINAL or time.monotonic() > deadline:
            return info
        await asyncio.sleep(0.02)


async def settled_at(base_url: str, gen_id: str, within: float = 15.0) -> dict[str, Any]:
    """The generation once its status is terminal (the status is written right after the end event).

    Each poll on a client of its own; fails after ``within`` seconds.
    """
    info: dict[str, Any] = {}

    async def terminal() -> bool:
        info.update(await generation_at(base_url, gen_id))
        return info["status"] in TERMINAL

    await wait_until(terminal, f"generation {gen_id} to reach a terminal status", within)
    return info


async def wait_finished(client: httpx.AsyncClient, gen_id: str, polls: int = 400) -> dict[str, Any]:
    """The generation once it has ended: at most ``polls`` polls of its status, 0.05 s apart, or it fails."""
    for _ in range(polls):
        info = await generation(client, gen_id)
        if info["status"] in TERMINAL:
            return info
        await asyncio.sleep(0.05)
    raise AssertionError(f"generation {gen_id} did not finish: it is still {info['status']}")


# -- NDJSON -----------------------------------------------------------------------


@dataclass
class NdjsonRead:
    """What one NDJSON viewer got: every line, parsed."""

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


async def read_ndjson(
    client: httpx.AsyncClient,
    gen_id: str,
    into: NdjsonRead | None = None,
    *,
    last_event_id: str | None = None,
    stop_after: int | None = None,
) -> NdjsonRead:
    """Reads until ``{"done": true}``, until the server ends the response, or after ``stop_after`` lines.

    ``into`` fills while it reads, so a test can watch its progress.
    """
    into = into if into is not None else NdjsonRead()
    headers = {"Accept": "application/x-ndjson"}
    if last_event_id:
        headers["Last-Event-ID"] = last_event_id
    async with client.stream("GET", f"/v1/generations/{gen_id}/events", headers=headers) as response:
        assert response.status_code == 200, (await response.aread()).decode()
        assert response.headers["content-type"].startswith("application/x-ndjson")
        async for line in response.aiter_lines():
            if not line.strip():
                continue  # a heartbeat
            into.lines.append(orjson.loads(line))
            if into.done or (stop_after is not None and len(into.lines) >= stop_after):
                break
    return into


async def read_ndjson_at(base_url: str, gen_id: str, into: NdjsonRead, last_event_id: str | None = None) -> NdjsonRead:
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        return await read_ndjson(client, gen_id, into, last_event_id=last_event_id)


# -- WebSocket ----------------------------------------------------------------------


def ws_url(base_url: str, gen_id: str, last_event_id: str | None = None, token: str | None = None) -> str:
    url = base_url.replace("http://", "ws://", 1) + f"/v1/generations/{gen_id}/ws"
    query = [f"last_event_id={last_event_id}"] if last_event_id else []
    query += [f"token={token}"] if token else []
    return url + ("?" + "&".join(query) if query else "")


@dataclass
class WsRead:
    """What one WebSocket viewer got."""

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


async def read_ws(
    url: str,
    into: WsRead | None = None,
    *,
    send: list[str | bytes] | None = None,
    stop_after: int | None = None,
    recv_timeout: float | None = None,
) -> WsRead:
    """Reads until the server closes, or until ``stop_after`` messages with an id (``close_code`` stays None).

    Sends ``send`` once, after the first message; waits at most ``recv_timeout`` seconds for each message
    if given. ``into`` fills while it reads. A connection that breaks without a close frame (a killed pod)
    leaves ``close_code`` 1006.
    """
    into = into if into is not None else WsRead()
    async with connect(url, open_timeout=10, close_timeout=5, max_size=None) as ws:
        try:
            while True:
                message = orjson.loads(await asyncio.wait_for(ws.recv(), recv_timeout))
                (into.messages if "id" in message else into.replies).append(message)
                if send and len(into.messages) == 1:
                    for item in send:
                        await ws.send(item)
                    send = None
                if stop_after is not None and len(into.messages) >= stop_after:
                    return into
        except ConnectionClosed:
            pass
        into.close_code = ws.close_code if ws.close_code is not None else 1006
    return into
