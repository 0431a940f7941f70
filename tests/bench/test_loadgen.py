"""The load generator's hand-written parser (HTTP head, chunked coding, SSE) and its checks.

The benchmark's exactness verdict rests on these: a parser that missed a gap or a
duplicate would report a broken stream as exact. A live viewer keeps its reads and
parses them after the phase (``check``); every check here runs both ways.
"""

from __future__ import annotations

import zlib

import pytest

from fanline.bench import loadgen
from fanline.bench.loadgen import LoadRun, Viewer

HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


class FakeTransport:
    def write(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


def chunked(*pieces: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces)


def frame(seq: int, data: bytes) -> bytes:
    return b"id: %d-0\ndata: %s\n\n" % (seq, data)


def viewer(keep: bool = True) -> Viewer:
    run = LoadRun({})
    run.remaining = 1
    v = Viewer(run, "gen", "live", 0, witness=True)
    assert v.reads is not None  # a live viewer keeps its reads...
    if not keep:
        v.reads = None  # ... unless told to parse each on arrival
    v.transport = FakeTransport()  # type: ignore[assignment]
    return v


def feed(v: Viewer, wire: bytes, step: int) -> None:
    for i in range(0, len(wire), step):
        v.data_received(wire[i : i + step])
    v.check()


both = pytest.mark.parametrize("keep", [True, False], ids=["kept", "on-arrival"])


CHUNK = b'{"choices":[{"index":0,"delta":{"content":"hi "}}]}'


@both
async def test_a_stream_split_at_every_byte_boundary_is_read_exactly(keep: bool) -> None:
    # retry and heartbeat lines come without a blank line (see api/transports/sse.py).
    body = chunked(b"retry: 1000\n", frame(1, CHUNK), b": ping\n" + frame(2, CHUNK) + frame(3, b"[DONE]"))
    for step in (1, 2, 3, 7, 64, len(HEAD + body)):
        v = viewer(keep)
        feed(v, HEAD + body, step)
        assert v.done and not v.failure
        assert (v.count, v.next_seq, v.gaps, v.dups, v.error_events) == (3, 4, 0, 0, 0)
        assert v.crc == zlib.crc32(b"[DONE]", zlib.crc32(CHUNK, zlib.crc32(CHUNK)))
        assert v.text() == "hi hi "
        assert v.times is not None and len(v.times) == 3


@both
async def test_gaps_and_duplicates_are_counted(keep: bool) -> None:
    v = viewer(keep)
    feed(v, HEAD + chunked(frame(1, CHUNK), frame(3, CHUNK), frame(3, CHUNK), frame(4, b"[DONE]")), 5)
    assert v.done
    assert (v.gaps, v.dups) == (1, 1)


@both
async def test_a_refused_request_and_an_error_event_are_failures(keep: bool) -> None:
    v = viewer(keep)
    feed(v, b"HTTP/1.1 404 Not Found\r\ncontent-length: 2\r\n\r\n{}", 100)
    assert v.finished.done() and v.failure.startswith("HTTP 404")
    assert v.run.http_errors["404"] == 1

    v = viewer(keep)
    error = b'{"error":{"message":"x","type":"server_error","code":"worker_lost"}}'
    feed(v, HEAD + chunked(frame(1, CHUNK), frame(2, error), frame(3, b"[DONE]")), 9)
    assert v.done and v.error_events == 1


@both
async def test_a_response_that_ends_without_done_is_a_failure(keep: bool) -> None:
    v = viewer(keep)
    feed(v, HEAD + chunked(frame(1, CHUNK)) + b"0\r\n\r\n", 4)
    assert v.failure == "response ended without [DONE]"


async def test_kept_reads_keep_their_arrival_times_and_the_last_chunk_ends_the_viewer() -> None:
    v = viewer()
    reads = [HEAD + chunked(frame(1, CHUNK)), chunked(frame(2, CHUNK) + frame(3, b"[DONE]")) + b"0\r\n\r\n"]
    arrivals = []
    for data in reads:
        v.data_received(data)
        arrivals.append(v.read_at[-1])
    # The response is over: the viewer is finished, but not parsed yet.
    assert v.finished.done() and not v.done and v.count == 0
    v.check()
    assert v.done and not v.failure and v.count == 3
    assert list(v.times or ()) == [arrivals[0], arrivals[1], arrivals[1]]


async def test_a_kept_stream_cut_off_before_done_fails_when_the_connection_closes() -> None:
    v = viewer()
    v.data_received(HEAD + chunked(frame(1, CHUNK)))
    v.connection_lost(None)
    assert v.failure == "connection closed before [DONE]" and v.count == 1


async def test_past_the_byte_cap_a_kept_viewer_parses_on_arrival(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loadgen, "_RECORDED_MAX", 100)
    v = viewer()
    v.data_received(HEAD + chunked(frame(1, CHUNK)))
    assert v.reads is not None and v.count == 0  # under the cap: kept
    v.data_received(chunked(frame(2, CHUNK) + frame(3, b"[DONE]")))
    assert v.reads is None and v.done and v.count == 3


async def test_a_resumer_drops_right_after_its_event() -> None:
    run = LoadRun({})
    run.remaining = 1
    v = Viewer(run, "gen", "resume", 0, drop_after=2)
    v.transport = FakeTransport()  # type: ignore[assignment]
    feed(v, HEAD + chunked(frame(1, CHUNK) + frame(2, CHUNK) + frame(3, CHUNK)), 1000)
    # Event 3 arrived in the same read but must not count: the resume asks for it again.
    assert (v.count, v.last_id, v.dropping, v.done) == (2, b"2-0", True, False)
