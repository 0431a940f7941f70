"""Event ids (what a client may send back as Last-Event-ID) and the exact bytes of each transport's frame."""

from __future__ import annotations

import orjson
import pytest

from fanline.shared import events
from fanline.shared.errors import InvalidRequest
from fanline.shared.events import Event
from fanline.shared.ids import event_id, is_generation_id, new_generation_id, parse_event_id

CHUNK = events.chunk("chatcmpl-x", 1700000000, "demo", {"content": "hi"})
ERROR = events.error_payload("the worker went away", "worker_lost")


@pytest.mark.parametrize(
    ("value", "seq"), [("12-0", 12), ("0-0", 0), (" 7-0 ", 7), ("999999999999999999-0", 10**18 - 1)]
)
def test_parse_event_id_accepts_ids_this_api_hands_out(value: str, seq: int) -> None:
    assert parse_event_id(value) == seq
    assert parse_event_id(event_id(seq)) == seq


@pytest.mark.parametrize(
    "value",
    [
        "",
        " ",
        "garbage",
        "12",
        "12-1",  # a real Redis id, but not one of ours: ours always end in -0
        "12-0-0",
        "-12-0",
        "+12-0",
        "12-0x",
        "0x12-0",
        "1" * 19 + "-0",  # more digits than a stream sequence can have
        "9" * 200 + "-0",
        "1.5-0",
        "\u0661\u0662-0",  # Arabic-Indic digits: int() would read them as 12
    ],
)
def test_parse_event_id_refuses_anything_else_with_invalid_request(value: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_event_id(value)
    assert caught.value.status == 400
    assert caught.value.code == "invalid_last_event_id"
    assert caught.value.body()["error"]["type"] == "invalid_request_error"


def test_generation_ids_are_128_bit_lowercase_hex() -> None:
    ids = {new_generation_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(is_generation_id(i) and len(i) == 32 for i in ids)
    for bad in ("", "g" * 32, "A" * 32, "a" * 31, "a" * 33, "../" + "a" * 29):
        assert not is_generation_id(bad)


def test_chunk_event_frames_are_exact() -> None:
    event = Event(3, events.CHUNK, CHUNK)
    assert event.id == b"3-0"
    assert event.sse == b"id: 3-0\ndata: " + CHUNK + b"\n\n"
    assert event.ndjson == b'{"id":"3-0","chunk":' + CHUNK + b"}\n"
    assert event.ws == '{"id":"3-0","chunk":' + CHUNK.decode() + "}"
    assert orjson.loads(event.ndjson) == {"id": "3-0", "chunk": orjson.loads(CHUNK)}
    assert not event.is_end


def test_error_event_frames_are_exact() -> None:
    event = Event(41, events.ERROR, ERROR)
    assert event.sse == b"id: 41-0\ndata: " + ERROR + b"\n\n"
    body = orjson.loads(ERROR)
    assert body == {
        "error": {"message": "the worker went away", "type": "server_error", "param": None, "code": "worker_lost"}
    }
    assert orjson.loads(event.ndjson) == {"id": "41-0", **body}
    assert event.ndjson.endswith(b"}\n") and event.ndjson.count(b"\n") == 1
    assert event.ws == event.ndjson[:-1].decode()


def test_end_event_frames_are_exact() -> None:
    event = Event(42, events.END, b"")
    assert event.is_end
    assert event.sse == b"id: 42-0\ndata: [DONE]\n\n"
    assert event.ndjson == b'{"id":"42-0","done":true}\n'
    assert event.ws == '{"id":"42-0","done":true}'


def test_frames_are_built_once_and_shared() -> None:
    event = Event(5, events.CHUNK, CHUNK)
    assert event.sse is event.sse
    assert event.ndjson is event.ndjson
    assert event.ws is event.ws


def test_event_from_stream_entry_round_trips() -> None:
    fields = events.entry_fields(events.CHUNK, CHUNK)
    event = Event.from_entry(b"17-0", fields)
    assert (event.seq, event.id, event.kind, event.data) == (17, b"17-0", events.CHUNK, CHUNK)
    assert event.ts_us > 1_600_000_000 * 10**6
    end = Event.from_entry(b"18-0", events.entry_fields(events.END, b""))
    assert end.is_end and end.sse == b"id: 18-0\ndata: [DONE]\n\n"
