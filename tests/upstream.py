"""A stand-in OpenAI-compatible upstream that misbehaves on command, for the failure cases.

It replaces a remote model server we cannot run here, so it speaks the real wire
format: HTTP/1.1 on a loopback port, ``POST /v1/chat/completions``, an SSE body in
chunked transfer encoding (``data: {chat.completion.chunk}`` … ``data: [DONE]``),
OpenAI's error bodies. It runs on its own thread and event loop, so nothing a test
does on its own loop can stall it.

    with Upstream() as upstream:                      # upstream.base_url: http://127.0.0.1:PORT/v1
        ... a fanline stack with FANLINE_UPSTREAM_BASE_URL=upstream.base_url ...
        seen = await upstream.request("the prompt")   # what it received for that prompt
        assert await seen.client_left()               # the client closed the connection mid-answer

The request's ``model`` says how to answer (the fanline stack under test passes the
client's model through when FANLINE_UPSTREAM_MODEL is unset):

    ok                the prompt's words as content, finish_reason "stop", usage, [DONE]
    fidelity          FIDELITY_DELTAS: reasoning, reasoning_content, logprobs, refusal, tool calls, an unknown
                      field, nulls; finish_reason "content_filter"; usage with details
    json              one chat.completion (application/json) instead of a stream
    html              a web page (200, text/html): the base URL is not an OpenAI API
    status-NNN        answers NNN with OpenAI's error body (429: Retry-After: 20; 503: a proxy's text body)
    error-mid-stream  two chunks, then ``data: {"error": {...}}``, then the end of the body
    stall             two chunks, then silence until the client leaves
    stall-head        no answer at all (not even the status line) until the client leaves
    cut               two chunks, then the TCP connection is closed mid-body (chunked encoding left incomplete)
    truncate          two chunks, then a clean end of the body: no finish_reason, no [DONE]
    hold              a chunk every 20 ms, for longer than any test: a long answer, until the client leaves

``refusing_base_url`` is an address whose port is bound but not listening: connecting is refused.
Every response says ``Connection: close``, so a connection closed before the answer
ended was closed by the client.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

FIRST_WORDS = ("Hello", " world")
# The longest a test waits for something the stand-in should see (a bound against hanging, not a timing claim).
WAIT_S = 20.0

# What "fidelity" sends, choice by choice: (delta, logprobs). Real servers send each of these shapes.
FIDELITY_DELTAS: list[tuple[dict[str, Any], dict[str, Any] | None]] = [
    ({"role": "assistant", "content": None, "reasoning": "Let me think"}, None),  # OpenRouter, Ollama
    ({"content": None, "reasoning_content": " about it."}, None),  # DeepSeek, vLLM
    (
        {"content": "Hel", "refusal": None},
        {"content": [{"token": "Hel", "logprob": -0.25, "bytes": [72, 101, 108], "top_logprobs": []}], "refusal": None},
    ),
    (
        {"content": "lo"},
        {"content": [{"token": "lo", "logprob": -0.5, "bytes": [108, 111], "top_logprobs": []}], "refusal": None},
    ),
    ({"refusal": "I cannot help with that part."}, None),
    (
        {
            "tool_calls": [
                {"index": 0, "id": "call_standin1", "type": "function", "function": {"name": "lookup", "arguments": ""}}
            ]
        },
        None,
    ),
    ({"tool_calls": [{"index": 0, "function": {"arguments": '{"q": '}}]}, None),
    ({"tool_calls": [{"index": 0, "function": {"arguments": '"fan"}'}}]}, None),
    ({"annotations": [{"type": "url_citation", "url_citation": {"url": "https://example.org"}}]}, None),
]
FIDELITY_USAGE = {
    "prompt_tokens": 11,
    "completion_tokens": 9,
    "total_tokens": 20,
    "completion_tokens_details": {"reasoning_tokens": 2},
}

_REASONS = {401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 429: "Too Many Requests"}
_REASONS |= {500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable"}


@dataclass
class Seen:
    """One request the stand-in received, and what became of its connection."""

    model: str
    body: dict[str, Any]
    headers: dict[str, str]
    chunks_sent: int = 0
    finished: bool = False  # the stand-in ended the answer itself (or cut it, on command)
    closed_by_client: threading.Event = field(default_factory=threading.Event)

    async def client_left(self) -> bool:
        """True once the client has closed the connection before the answer ended (False after WAIT_S)."""
        return await asyncio.to_thread(self.closed_by_client.wait, WAIT_S)


class Upstream:
    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="stand-in-upstream", daemon=True)
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._seen: dict[str, Seen] = {}
        self._arrived = threading.Condition()
        # Bound, never listening: a connection to it is refused.
        self._refusing = socket.socket()
        self._refusing.bind(("127.0.0.1", 0))
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def refusing_base_url(self) -> str:
        return f"http://127.0.0.1:{self._refusing.getsockname()[1]}/v1"

    def start(self) -> Upstream:
        self._thread.start()
        listening = socket.socket()
        listening.bind(("127.0.0.1", 0))
        self.port = listening.getsockname()[1]
        start = asyncio.start_server(self._handle, sock=listening)
        self._server = asyncio.run_coroutine_threadsafe(start, self._loop).result(10)
        return self

    def stop(self) -> None:
        async def close() -> None:
            assert self._server is not None
            self._server.close()
            for task in list(self._handlers):
                task.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        self._refusing.close()

    def __enter__(self) -> Upstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def request(self, prompt: str) -> Seen:
        """The request whose last message is ``prompt``, once it has arrived."""

        def wait() -> Seen | None:
            with self._arrived:
                self._arrived.wait_for(lambda: prompt in self._seen, WAIT_S)
                return self._seen.get(prompt)

        seen = await asyncio.to_thread(wait)
        assert seen is not None, f"the stand-in upstream got no request for {prompt!r} within {WAIT_S} s"
        return seen

    # -- serving (on the stand-in's own loop) -----------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            seen = await self._read_request(reader)
            if seen is not None:
                await self._answer(seen, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._handlers.discard(task)
            writer.close()

    async def _read_request(self, reader: asyncio.StreamReader) -> Seen | None:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        body = orjson.loads(await reader.readexactly(int(headers.get("content-length", "0"))) or b"{}")
        messages = body.get("messages") or [{}]
        seen = Seen(model=str(body.get("model")), body=body, headers=headers)
        with self._arrived:
            self._seen[str(messages[-1].get("content"))] = seen
            self._arrived.notify_all()
        return seen

    async def _answer(self, seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # The client sends nothing more on this connection: a read that ends means it closed it.
        left = asyncio.ensure_future(reader.read(1))
        try:
            await _Answer(seen, writer, left).run()
            gone = left.done()
        except ConnectionError:  # a write found the connection closed
            gone = True
        if gone and not seen.finished:
            seen.closed_by_client.set()
        left.cancel()


class _Answer:
    def __init__(self, seen: Seen, writer: asyncio.StreamWriter, left: asyncio.Future[bytes]) -> None:
        self.seen = seen
        self.writer = writer
        self.left = left
        self.created = int(time.time())

    async def run(self) -> None:
        mode = self.seen.model
        if mode.startswith("status-"):
            return await self.status(int(mode.removeprefix("status-")))
        if mode == "stall-head":
            return await self.until_client_leaves()
        if mode == "json":
            return await self.json()
        if mode == "html":
            return await self.whole(200, "text/html; charset=utf-8", b"<!doctype html><title>Welcome</title>")
        await self.head()
        if mode == "ok":
            return await self.ok()
        if mode == "fidelity":
            return await self.fidelity()
        if mode == "hold":
            return await self.hold()
        for word in FIRST_WORDS:
            await self.event(self.chunk({"content": word}))
        if mode == "error-mid-stream":
            error = {"message": "The server had an error while processing your request.", "type": "server_error"}
            await self.event({"error": {**error, "param": None, "code": "internal_error"}})
            await self.end()
        elif mode == "stall":
            await self.until_client_leaves()
        elif mode == "cut":
            self.seen.finished = True
            self.writer.transport.abort()
        elif mode == "truncate":
            await self.end()
        else:
            raise AssertionError(f"unknown stand-in mode {mode!r}")

    # -- the modes --------------------------------------------------------------

    async def ok(self) -> None:
        words = str(self.seen.body["messages"][-1]["content"]).split()
        await self.event(self.chunk({"role": "assistant", "content": "", "refusal": None}))
        for word in words:
            await self.event(self.chunk({"content": word + " "}))
        await self.event(self.chunk({}, finish_reason="stop"))
        if (self.seen.body.get("stream_options") or {}).get("include_usage"):
            n = len(words)
            await self.event(self.usage({"prompt_tokens": n, "completion_tokens": n, "total_tokens": 2 * n}))
        await self.done()

    async def fidelity(self) -> None:
        for delta, logprobs in FIDELITY_DELTAS:
            await self.event(self.chunk(delta, logprobs=logprobs))
        await self.event(self.chunk({}, finish_reason="content_filter"))
        await self.event(self.usage(FIDELITY_USAGE))
        await self.done()

    async def hold(self) -> None:
        for n in range(100_000):
            if self.left.done():
                return
            await self.event(self.chunk({"content": f"word{n} "}))
            await asyncio.wait([self.left], timeout=0.02)

    async def json(self) -> None:
        message: dict[str, Any] = {
            "role": "assistant",
            "content": "Whole answer.",
            "refusal": None,
            "reasoning_content": "Short.",
        }
        message["tool_calls"] = [
            {"id": "call_json1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": 1}'}}
        ]
        body = {
            "id": "chatcmpl-stand-in",
            "object": "chat.completion",
            "created": self.created,
            "model": self.seen.model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": "tool_calls"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
        }
        await self.whole(200, "application/json", orjson.dumps(body))

    async def status(self, status: int) -> None:
        headers: dict[str, str] = {}
        error: dict[str, Any]
        if status == 503:  # a proxy in front of the model server answers in plain text
            text = b"upstream connect error or disconnect/reset before headers. reset reason: connection failure"
            return await self.whole(status, "text/plain", text)
        if status == 401:
            error = {"message": "Incorrect API key provided: sk-st***in.", "type": "invalid_request_error"}
            error["code"] = "invalid_api_key"
        elif status == 429:
            error = {"message": "Rate limit reached for requests. Please try again in 20s.", "type": "requests"}
            error["code"] = "rate_limit_exceeded"
            headers["Retry-After"] = "20"
        elif status == 404:
            error = {"message": f"The model `{self.seen.model}` does not exist.", "type": "invalid_request_error"}
            error["code"] = "model_not_found"
        else:
            error = {"message": "The server had an error while processing your request.", "type": "server_error"}
            error["code"] = None
        body = orjson.dumps({"error": {**error, "param": None}})
        await self.whole(status, "application/json", body, headers)

    async def until_client_leaves(self) -> None:
        await self.left

    # -- the wire ---------------------------------------------------------------

    def chunk(self, delta: dict[str, Any], *, finish_reason: str | None = None, logprobs: Any = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        return {**self.common(), "choices": [choice]}

    def usage(self, usage: dict[str, Any]) -> dict[str, Any]:
        return {**self.common(), "choices": [], "usage": usage}

    def common(self) -> dict[str, Any]:
        return {
            "id": "chatcmpl-stand-in",
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.seen.model,
            "system_fingerprint": None,
        }

    async def head(self) -> None:
        self.writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
            b"transfer-encoding: chunked\r\ncache-control: no-cache\r\nconnection: close\r\n\r\n"
        )
        await self.writer.drain()

    async def event(self, payload: dict[str, Any]) -> None:
        await self.body_chunk(b"data: " + orjson.dumps(payload) + b"\n\n")
        self.seen.chunks_sent += 1

    async def done(self) -> None:
        await self.body_chunk(b"data: [DONE]\n\n")
        await self.end()

    async def body_chunk(self, data: bytes) -> None:
        self.writer.write(b"%x\r\n%s\r\n" % (len(data), data))
        await self.writer.drain()

    async def end(self) -> None:
        self.seen.finished = True
        self.writer.write(b"0\r\n\r\n")
        await self.writer.drain()

    async def whole(self, status: int, content_type: str, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.seen.finished = True
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'OK')}", f"content-type: {content_type}"]
        lines += [f"content-length: {len(body)}", "connection: close"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        await self.writer.drain()
