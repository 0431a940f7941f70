"""A viewer that stops reading is cut off and never slows the others (Guarantee 3).

The stuck viewer is a raw socket that sends its request and then reads nothing.
It advertises a tiny receive window and a small segment size, so the kernel on
the server side buffers little for it (on loopback the default 64 KiB segments
let the server's send buffer grow to megabytes) and its stream really blocks.
"""

from __future__ import annotations

import asyncio
import re
import socket
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson

from tests.conftest import StackFactory
from tests.support import (
    Received,
    assert_strictly_increasing,
    create,
    parse_sse,
    read_sse_at,
    settled_at,
    text_of,
    wait_until,
)

VIEWERS = 100
TOKENS = 20_000  # about 600 KB of SSE: far more than a blocked socket can take


def ids_chunks_done(body: bytes) -> tuple[list[str], list[dict[str, Any]], bool]:
    """(ids, chunks, done) of a complete or cut-off SSE body."""
    frames = parse_sse(body)
    ids = [event_id for event_id, _ in frames]
    chunks = [orjson.loads(data) for _, data in frames if data != b"[DONE]"]
    return ids, chunks, any(data == b"[DONE]" for _, data in frames)


def dechunk(raw: bytes) -> bytes:
    """The body of an HTTP/1.1 chunked response, as far as it got."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head[:200]
    body = bytearray()
    while rest:
        size_line, sep, rest = rest.partition(b"\r\n")
        if not sep:
            break
        size = int(size_line, 16)
        if size == 0 or len(rest) < size + 2:
            break
        body += rest[:size]
        rest = rest[size + 2 :]
    return bytes(body)


def stuck_viewer(url: str, gen_id: str) -> socket.socket:
    """Connects, sends the request, and never reads."""
    address = urlsplit(url)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)
    sock.connect((address.hostname, address.port))
    sock.sendall(f"GET /v1/generations/{gen_id}/events HTTP/1.1\r\nHost: fanline\r\n\r\n".encode())
    return sock


def read_to_eof(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    data = bytearray()
    while chunk := sock.recv(1 << 16):
        data += chunk
    return bytes(data)


async def cutoffs(client: httpx.AsyncClient) -> float:
    # Connection: close: a poll must not reuse a pooled connection the pod may be closing as idle
    # (CI pin: "Server disconnected without sending a response" on the reused keep-alive socket).
    metrics = (await client.get("/metrics", headers={"Connection": "close"})).text
    found = re.search(r"^fanline_slow_viewer_cutoffs_total (\S+)$", metrics, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


async def cut_off_since(client: httpx.AsyncClient, before: float) -> bool:
    return await cutoffs(client) > before


async def test_stuck_viewer_is_cut_off_and_100_others_finish_exactly(stack_factory: StackFactory) -> None:
    stack = stack_factory(apis=1, slow_viewer_timeout_s="2", demo_tokens_per_s="0")
    limits = httpx.Limits(max_connections=VIEWERS + 10)
    async with httpx.AsyncClient(base_url=stack.url, timeout=60, limits=limits) as client:
        before = await cutoffs(client)
        gen_id = await create(client, prompt="slow", max_tokens=TOKENS)
        stuck = stuck_viewer(stack.url, gen_id)
        try:

            async def viewer() -> bytes:
                # Raw bytes, parsed afterwards: a reader this busy could itself look stuck.
                async with client.stream("GET", f"/v1/generations/{gen_id}/events") as stream:
                    assert stream.status_code == 200
                    return b"".join([part async for part in stream.aiter_bytes()])

            bodies = await asyncio.wait_for(asyncio.gather(*(viewer() for _ in range(VIEWERS))), 90)
            info = await settled_at(stack.url, gen_id)
            assert info["status"] == "completed"
            first_ids: list[str] | None = None
            for body in bodies:
                ids, chunks, done = ids_chunks_done(body)
                assert done and text_of(chunks) == info["content"]
                assert_strictly_increasing(ids)
                first_ids = first_ids or ids
                assert ids == first_ids
            assert first_ids is not None

            # The stuck viewer is cut off: the pod gives up on it and closes the connection.
            await wait_until(lambda: cut_off_since(client, before), "the pod to cut the stuck viewer off", 15)
            raw = await asyncio.to_thread(read_to_eof, stuck, 10)  # what was buffered, then EOF
        finally:
            stuck.close()

        ids, chunks, done = ids_chunks_done(dechunk(raw))
        assert not done and ids, "the stuck viewer should have been cut off before the end"
        assert ids == first_ids[: len(ids)]
        # It resumes after the last event it got and has exactly the rest.
        rest = await read_sse_at(stack.url, gen_id, Received(), last_event_id=ids[-1])
    assert rest.done and ids + rest.ids == first_ids
    assert text_of(chunks) + rest.text == info["content"]
