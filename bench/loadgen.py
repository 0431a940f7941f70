"""A load-generator process: many SSE viewers on raw asyncio sockets (uvloop when present).

    python -m fanline.bench.loadgen        # started by the benchmark (bench/scenarios.py), never by hand

It talks with the run over pipes, one JSON object a line:

    run ── spec ─────────▶ connects the viewers that start at once (waits for their 200 + headers)
        ◀─ {"event": "ready"}
    run ── "go" ─────────▶ late joiners join, resumers drop and resume, all read to [DONE]
        ◀─ {"event": "done"}      (every viewer finished, or the deadline passed)
    run ── "collect" ────▶ reads each stream back (XRANGE) and joins publish times on event ids
        ◀─ {"event": "result", ...}

Parsing is by hand (the HTTP/1.1 head, chunked transfer coding, SSE lines) because a
general-purpose client costs more CPU per event than the server under test. Each
viewer checks what it gets: ids contiguous from 1-0, a CRC of every payload (compared
with the stream's at the end), and [DONE] last. Viewers that only read to the end
(live and late ones) keep each read with its arrival time during the phase and parse
it at "collect", with the same checks and times: the load generators share the
machine's cores with the server, and parsing on arrival cost them more CPU than the
pod spent writing (5,000 viewers: ~11.5 s against ~5.5 s in a 10 s phase).

Roles: ``live`` viewers connect before the generation starts and give the delivery
latency; ``late`` ones join at a random time in a window and replay history first;
``resume`` ones drop their connection after a number of events and reconnect at once
with ``Last-Event-ID`` (all of them at the same event: a reconnect storm); ``ttft``
ones POST a chat completion and time its first content chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import sys
import time
import zlib
from array import array
from collections import Counter
from collections.abc import Coroutine
from typing import Any, cast

import orjson
import redis.asyncio as aioredis

from fanline.bench.stats import bucket
from fanline.shared import keys

HOST = "127.0.0.1"
# Past this many bytes kept unparsed in a process (see Viewer.reads), viewers parse on arrival.
_RECORDED_MAX = 2 << 30
_CONNECT_ATTEMPTS = 4


def now_us() -> int:
    return time.time_ns() // 1000


class Viewer(asyncio.Protocol):
    """One client: its connection(s) to the server and everything it checked."""

    def __init__(
        self,
        run: LoadRun,
        gen: str,
        role: str,
        port: int,
        *,
        drop_after: int = 0,
        resume_port: int = 0,
        witness: bool = False,
        body: bytes = b"",
    ) -> None:
        self.run = run
        self.gen = gen
        self.role = role
        self.port = port
        self.drop_after = drop_after
        self.resume_port = resume_port or port
        self.body = body  # a POST body (ttft), else a GET of the events
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # What it received.
        self.next_seq = 1
        self.last_id = b""
        self.crc = 0
        self.count = 0
        self.times: array[int] | None = array("q") if role == "live" else None
        self.payloads: list[bytes] | None = [] if witness or role == "ttft" else None
        # A viewer that only reads to the end keeps each read with its time, and checks them
        # after the phase (``check``); one that must act on what it reads parses at once.
        self.reads: list[bytes] | None = [] if role in ("live", "late") and not drop_after and not body else None
        self.read_at = array("q")
        self.gaps = 0
        self.dups = 0
        self.error_events = 0
        self.first_recv = 0
        self.last_recv = 0
        self.failure = ""
        self.done = False
        # Timings (unix µs).
        self.connect_started = 0
        self.sent = 0
        self.first_event_after_connect: list[int] = []
        self.dropped_at = 0
        self.resumed_at = 0
        self.first_content = 0
        self.connects = 0
        self.retries = 0
        # Per-connection parser state.
        self.transport: asyncio.Transport | None = None
        self.dropping = False
        self._reset()

    def _reset(self) -> None:
        self.head: bytearray | None = bytearray()
        self.chunked = False
        self.need = 0
        self.skip = 0
        self.raw = b""
        self.buf = b""
        self.body_ended = False
        self.fresh = True  # no event yet on this connection

    # -- connecting --------------------------------------------------------

    def request(self, last_id: bytes) -> bytes:
        if self.body:
            return (
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Accept: text/event-stream\r\nContent-Length: %d\r\n\r\n" % len(self.body)
            ) + self.body
        head = b"GET /v1/generations/%s/events HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n" % (
            self.gen.encode()
        )
        if last_id:
            head += b"Last-Event-ID: " + last_id + b"\r\n"
        return head + b"\r\n"

    async def connect(self, port: int, attempts: int = _CONNECT_ATTEMPTS) -> None:
        loop = asyncio.get_running_loop()
        self._request = self.request(self.last_id)
        for attempt in range(attempts):
            self._reset()
            self.connect_started = now_us()
            try:
                await loop.create_connection(lambda: self, HOST, port)
                self.connects += 1
                return
            except OSError as exc:
                self.retries += 1
                if attempt == attempts - 1 or loop.time() > self.run.deadline:
                    self.fail(f"connect: {type(exc).__name__}: {exc}"[:120])
                    return
                await asyncio.sleep(min(0.05 * 2**attempt, 1.0))

    def join(self) -> None:
        """A late joiner's connect, from a timer."""
        self.run.track(self.connect(self.port))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have the same methods.
        self.transport = cast(asyncio.Transport, transport)
        self.sent = now_us()
        self.transport.write(self._request)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.finished.done():
            self.check()  # reads it kept: did [DONE] come?
        if self.done or self.finished.done():
            return
        if self.dropping:
            self.dropping = False
            self.run.track(self.connect(self.resume_port, attempts=50))
            return
        self.fail("connection closed before [DONE]" + (f": {exc}" if exc else ""))

    def fail(self, reason: str) -> None:
        if not self.failure:
            self.failure = reason
        self._finish()

    def _finish(self) -> None:
        if self.transport is not None:
            self.transport.close()
        if not self.finished.done():
            self.finished.set_result(None)
            self.run.viewer_finished(self)

    # -- receiving ---------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        now = now_us()
        if self.head is not None:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.head[:end])
            data = bytes(self.head[end + 4 :])
            self.head = None
            if not self._on_head(head, data):
                return
            if not data:
                return
        reads = self.reads
        if reads is not None:
            reads.append(data)
            self.read_at.append(now)
            self.run.recorded += len(data)
            if self.run.recorded > _RECORDED_MAX:
                self.check()  # parse at once from now on
            elif self.chunked and data.endswith(b"0\r\n\r\n"):
                # The last chunk: whether [DONE] came before it, ``check`` tells.
                self._finish()
            return
        self._parse(data, now)

    def check(self) -> None:
        """Parses the reads it kept, each with the time it arrived: the same checks and
        figures as parsing each read on arrival."""
        reads, self.reads = self.reads, None
        if not reads:
            return
        earlier, self.failure, self.done = self.failure, "", False
        for data, at in zip(reads, self.read_at, strict=True):
            self._parse(data, at)
            if self.done or self.failure:
                break
        self.failure = self.failure or earlier
        self.read_at = array("q")

    def _parse(self, data: bytes, now: int) -> None:
        if self.chunked:
            data = self._dechunk(data)
        buf = self.buf + data if self.buf else data
        start = 0
        while True:
            end = buf.find(b"\n\n", start)
            if end < 0:
                break
            self._block(buf[start:end], now)
            start = end + 2
            if self.dropping or self.done or self.failure:
                self.buf = b""
                return
        self.buf = buf[start:]
        if self.body_ended and not self.done:
            self.fail("response ended without [DONE]")

    def _on_head(self, head: bytes, rest: bytes) -> bool:
        status = int(head[9:12]) if head[:5] == b"HTTP/" else 0
        if status != 200:
            self.run.http_errors[str(status)] += 1
            self.fail(f"HTTP {status}: {rest[:160]!r}")
            return False
        lower = head.lower()
        self.chunked = b"transfer-encoding: chunked" in lower
        if self.body:
            marker = lower.find(b"x-fanline-generation-id: ")
            if marker >= 0:
                self.gen = head[marker + 25 : head.index(b"\r\n", marker)].decode().strip()
        self.run.headers_seen(self)
        return True

    def _dechunk(self, data: bytes) -> bytes:
        if self.body_ended:
            return b""  # the last chunk's trailer
        if self.raw:
            data = self.raw + data
            self.raw = b""
        out = []
        pos = 0
        n = len(data)
        while pos < n:
            if self.need:
                take = min(self.need, n - pos)
                out.append(data[pos : pos + take])
                pos += take
                self.need -= take
                if not self.need:
                    self.skip = 2
            elif self.skip:
                take = min(self.skip, n - pos)
                pos += take
                self.skip -= take
            else:
                end = data.find(b"\r\n", pos)
                if end < 0:
                    self.raw = data[pos:]
                    break
                size = int(data[pos:end].split(b";", 1)[0], 16)
                pos = end + 2
                if size == 0:
                    self.body_ended = True
                    break
                self.need = size
        return out[0] if len(out) == 1 else b"".join(out)

    def _block(self, block: bytes, now: int) -> None:
        eid = data = None
        if block[:4] == b"id: " and block.count(b"\n") == 1:  # the usual frame: one id line, one data line
            nl = block.index(b"\n")
            eid = block[4:nl]
            if block[nl + 1 : nl + 7] == b"data: ":
                data = block[nl + 7 :]
        else:
            for line in block.split(b"\n"):
                if line[:6] == b"data: ":
                    data = line[6:]
                elif line[:4] == b"id: ":
                    eid = line[4:]
        if data is None:
            return  # a heartbeat or a retry line
        if eid is None:
            # An event without an id is an error fanline writes outside the stream (e.g. history gone).
            self.error_events += 1
            if data == b"[DONE]":
                self.fail("stream ended with an error event")
            return
        seq = int(eid[:-2])
        if seq != self.next_seq:
            if seq < self.next_seq:
                self.dups += 1
            else:
                self.gaps += 1
        self.next_seq = seq + 1
        self.last_id = eid
        self.crc = zlib.crc32(data, self.crc)
        self.count += 1
        if not self.first_recv:
            self.first_recv = now
        self.last_recv = now
        if self.fresh:
            self.fresh = False
            self.first_event_after_connect.append(now - self.connect_started)
            if self.dropped_at and not self.resumed_at:
                self.resumed_at = now
        if self.times is not None:
            self.times.append(now)
        if self.payloads is not None:
            self.payloads.append(data)
        if data[:9] == b'{"error":':
            self.error_events += 1
        if not self.first_content and b'"content":"' in data and b'"content":""' not in data:
            self.first_content = now
        if data == b"[DONE]":
            self.done = True
            self._finish()
        elif self.drop_after and self.count == self.drop_after and not self.dropped_at:
            self.dropped_at = now
            self.dropping = True
            if self.transport is not None:
                self.transport.abort()

    # -- results -----------------------------------------------------------

    def text(self) -> str:
        parts = []
        for data in self.payloads or ():
            if data == b"[DONE]" or data[:9] == b'{"error":':
                continue
            chunk = orjson.loads(data)
            if chunk.get("choices"):
                parts.append(chunk["choices"][0]["delta"].get("content") or "")
        return "".join(parts)


class LoadRun:
    """The viewers of this process, and the bookkeeping of the run's phases."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.viewers: list[Viewer] = []
        self.remaining = 0
        self.all_done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.deadline = float("inf")
        self.http_errors: Counter[str] = Counter()
        self.with_headers = 0
        self.recorded = 0  # bytes kept by viewers to parse after the phase
        self.tasks: set[asyncio.Task[None]] = set()

    def track(self, coro: Coroutine[Any, Any, None]) -> None:
        """Runs ``coro`` in a task the run keeps a reference to until it ends."""
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def headers_seen(self, viewer: Viewer) -> None:
        self.with_headers += 1

    def viewer_finished(self, viewer: Viewer) -> None:
        self.remaining -= 1
        if self.remaining <= 0 and not self.all_done.done():
            self.all_done.set_result(None)


async def _connect_all(viewers: list[Viewer], concurrency: int) -> None:
    gate = asyncio.Semaphore(concurrency)

    async def one(viewer: Viewer) -> None:
        async with gate:
            await viewer.connect(viewer.port)

    await asyncio.gather(*(one(v) for v in viewers))


async def _wait_headers(run: LoadRun, viewers: list[Viewer], limit_s: float) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + limit_s
    while loop.time() < end:
        if all(v.head is None or v.finished.done() for v in viewers):
            return
        await asyncio.sleep(0.02)
    for v in viewers:
        if v.head is not None and not v.finished.done():
            v.fail("no response headers")


async def http_get_json(port: int, path: str) -> Any:
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
        raw = await asyncio.wait_for(reader.read(-1), 30)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in head.lower():
        decoder = Viewer.__new__(Viewer)
        decoder.raw, decoder.need, decoder.skip, decoder.body_ended = b"", 0, 0, False
        body = decoder._dechunk(body)
    return orjson.loads(body)


class Commands:
    """The run's commands on stdin, one a line."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader

    async def expect(self, word: str) -> None:
        line = (await self.reader.readline()).decode().strip()
        if line != word:
            # "stop", or the run went away (EOF): leave at once.
            raise SystemExit(0 if line in ("stop", "") else f"loadgen: expected {word!r}, got {line!r}")


def emit(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def _build(run: LoadRun, spec: dict[str, Any]) -> None:
    rng = random.Random(spec.get("seed", 1))
    for group in spec["groups"]:
        for i in range(group["count"]):
            viewer = Viewer(
                run,
                group["gen"],
                group["role"],
                group["port"],
                drop_after=group.get("drop_after", 0),
                resume_port=group.get("resume_port", 0),
                witness=i == 0 and group.get("witness", False),
            )
            if group["role"] == "late":
                low, high = group["join"]
                viewer.join_after = rng.uniform(low, high)  # type: ignore[attr-defined]
            run.viewers.append(viewer)
    run.remaining = len(run.viewers)


async def run_viewers(spec: dict[str, Any], commands: Commands) -> None:
    loop = asyncio.get_running_loop()
    run = LoadRun(spec)
    _build(run, spec)
    at_once = [v for v in run.viewers if v.role != "late"]
    started = time.monotonic()
    run.deadline = loop.time() + spec.get("connect_timeout_s", 120)
    await _connect_all(at_once, spec.get("connect_concurrency", 256))
    await _wait_headers(run, at_once, spec.get("connect_timeout_s", 120))
    failed = sum(1 for v in at_once if v.finished.done())
    emit(
        {
            "event": "ready",
            "connected": len(at_once) - failed,
            "failed": failed,
            "connect_s": time.monotonic() - started,
        }
    )

    await commands.expect("go")
    go_us = now_us()
    cpu0 = time.process_time()
    run.deadline = loop.time() + spec["deadline_s"]
    for viewer in run.viewers:
        if viewer.role == "late":
            delay: float = viewer.join_after  # type: ignore[attr-defined]
            loop.call_later(delay, viewer.join)
    if run.remaining > 0:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(run.all_done), spec["deadline_s"])
    cpu = time.process_time() - cpu0
    wall = (now_us() - go_us) / 1e6
    for viewer in run.viewers:
        if not viewer.finished.done():
            viewer.fail("timed out before [DONE]")
    # Ended with no failure seen: viewers that kept their reads are checked at "collect".
    ended = sum(1 for v in run.viewers if v.finished.done() and not v.failure)
    emit({"event": "done", "finished": ended, "viewers": len(run.viewers)})

    await commands.expect("collect")
    emit({"event": "result", **await _collect(run, spec, cpu, wall, go_us)})


async def run_ttft(spec: dict[str, Any], commands: Commands) -> None:
    run = LoadRun(spec)
    emit({"event": "ready", "connected": 0, "failed": 0, "connect_s": 0.0})
    await commands.expect("go")
    go_us = now_us()
    cpu0 = time.process_time()
    run.deadline = asyncio.get_running_loop().time() + spec["deadline_s"]
    sequential: list[Viewer] = []
    concurrent: list[Viewer] = []

    def viewer(i: int) -> Viewer:
        body = orjson.dumps(
            {
                "model": "demo",
                "stream": True,
                "max_tokens": spec["max_tokens"],
                "messages": [{"role": "user", "content": f"time to first token, request {i}"}],
            }
        )
        v = Viewer(run, "", "ttft", spec["port"], body=body)
        run.viewers.append(v)
        run.remaining += 1
        return v

    async def one(v: Viewer) -> None:
        await v.connect(v.port)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.shield(v.finished), max(0.1, run.deadline - asyncio.get_running_loop().time())
            )
        if not v.finished.done():
            v.fail("timed out before [DONE]")

    for i in range(spec["sequential"]):
        v = viewer(i)
        sequential.append(v)
        await one(v)
    for r in range(spec["rounds"]):
        batch = [viewer(10_000 + r * 1000 + i) for i in range(spec["concurrent"])]
        concurrent.extend(batch)
        await asyncio.gather(*(one(v) for v in batch))
    cpu = time.process_time() - cpu0
    wall = (now_us() - go_us) / 1e6
    emit({"event": "done", "finished": sum(1 for v in run.viewers if v.done), "viewers": len(run.viewers)})
    await commands.expect("collect")
    result = await _collect(run, spec, cpu, wall, go_us)

    def ttft(vs: list[Viewer]) -> list[int]:
        return [v.first_content - v.sent for v in vs if v.first_content]

    def split(vs: list[Viewer]) -> dict[str, list[int]]:
        """Where the time went: request sent → first event published (API, queue, job start,
        generator) and published → received (hub and transport)."""
        first = {g: s["first_us"] for g, s in result["streams"].items()}
        timed = [v for v in vs if v.first_content and first.get(v.gen)]
        return {
            "to_publish": [first[v.gen] - v.sent for v in timed],
            "to_client": [v.first_content - first[v.gen] for v in timed],
        }

    result["ttft_sequential_us"] = ttft(sequential)
    result["ttft_concurrent_us"] = ttft(concurrent)
    result["ttft_split_us"] = {"sequential": split(sequential), "concurrent": split(concurrent)}
    result["total_us"] = [v.last_recv - v.sent for v in run.viewers if v.done]
    emit({"event": "result", **result})


async def _collect(run: LoadRun, spec: dict[str, Any], cpu: float, wall: float, go_us: int) -> dict[str, Any]:
    """Reads every stream back and checks each viewer against it; the latency histogram of live viewers."""
    check_started = time.process_time()
    for v in run.viewers:
        v.check()
    check_cpu = time.process_time() - check_started
    redis = aioredis.Redis.from_url(spec["redis_url"])
    streams: dict[str, dict[str, Any]] = {}
    published: dict[str, list[int]] = {}
    try:
        for gen in sorted({v.gen for v in run.viewers if v.gen}):
            entries = await redis.xrange(keys.events_key(gen))
            crc = 0
            times = []
            contiguous = True
            for n, (entry_id, fields) in enumerate(entries, 1):
                contiguous &= entry_id == b"%d-0" % n
                payload = b"[DONE]" if fields.get(b"k") == b"d" else fields.get(b"d", b"")
                crc = zlib.crc32(payload, crc)
                times.append(int(fields.get(b"t", b"0")))
            published[gen] = times
            streams[gen] = {
                "events": len(entries),
                "crc": crc,
                "contiguous": contiguous,
                "first_us": times[0] if times else 0,
                "last_us": times[-1] if times else 0,
            }
    finally:
        await redis.aclose()

    failures: Counter[str] = Counter()
    hist: Counter[int] = Counter()
    late_first: list[int] = []
    resume_gap: list[int] = []
    drops: list[int] = []
    resumes: list[int] = []
    exact = complete = bad_crc = wrong_count = 0
    negative = 0
    for v in run.viewers:
        stream = streams.get(v.gen)
        if v.done:
            complete += 1
        if v.failure:
            failures[v.failure.split(":")[0] if v.failure.startswith("connect") else v.failure[:80]] += 1
        ok = v.done and not v.failure and not v.gaps and not v.dups and not v.error_events and stream is not None
        if stream is not None and v.done:
            if v.crc != stream["crc"]:
                bad_crc += 1
                ok = False
            if v.next_seq != stream["events"] + 1:
                wrong_count += 1
                ok = False
        exact += ok
        if v.times is not None and v.gen in published:
            lat = [r - t for r, t in zip(v.times, published[v.gen], strict=False)]
            negative += sum(1 for x in lat if x < 0)
            hist.update(map(bucket, lat))
        if v.role == "late" and v.first_event_after_connect:
            late_first.append(v.first_event_after_connect[0])
        if v.role == "resume" and v.dropped_at:
            drops.append(v.dropped_at)
            if v.resumed_at:
                resumes.append(v.resumed_at)
                resume_gap.append(v.resumed_at - v.dropped_at)

    # The witnesses' text (one viewer per generation, every ttft request) against GET content.
    witness_ok = True
    witness_problems: list[str] = []
    content_port = spec.get("content_port")
    for v in run.viewers:
        if v.payloads is None or not v.done or not content_port:
            continue
        info = await http_get_json(content_port, f"/v1/generations/{v.gen}")
        if v.text() != info.get("content"):
            witness_ok = False
            witness_problems.append(f"{v.gen}: text differs from GET content")
    return {
        "viewers": len(run.viewers),
        "complete": complete,
        "exact": exact,
        "failures": dict(failures.most_common(8)),
        "http_errors": dict(run.http_errors),
        "gaps": sum(v.gaps for v in run.viewers),
        "dups": sum(v.dups for v in run.viewers),
        "error_events": sum(v.error_events for v in run.viewers),
        "bad_crc": bad_crc,
        "wrong_count": wrong_count,
        "retries": sum(v.retries for v in run.viewers),
        "delivered": sum(v.count for v in run.viewers),
        "first_recv_us": min((v.first_recv for v in run.viewers if v.first_recv), default=0),
        "last_recv_us": max((v.last_recv for v in run.viewers), default=0),
        "go_us": go_us,
        "hist": dict(hist),
        "negative_latencies": negative,
        "late_first_event_us": late_first,
        "resume_gap_us": resume_gap,
        "drop_first_us": min(drops, default=0),
        "resume_last_us": max(resumes, default=0),
        "resumed": len(resumes),
        "dropped": len(drops),
        "streams": {g: {k: s[k] for k in ("events", "contiguous", "first_us", "last_us")} for g, s in streams.items()},
        "witness_ok": witness_ok,
        "witness_problems": witness_problems[:5],
        "cpu_s": cpu,
        "check_cpu_s": check_cpu,
        "wall_s": wall,
    }


async def main_async() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    spec = json.loads(await reader.readline())
    commands = Commands(reader)
    if spec["mode"] == "ttft":
        await run_ttft(spec, commands)
    else:
        await run_viewers(spec, commands)


def main() -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(main_async())
    else:
        uvloop.run(main_async())


if __name__ == "__main__":
    main()
