"""The three transports end to end: NDJSON and WebSocket framing and resume, SSE headers and heartbeats, replay."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import httpx
import orjson
import pytest
import redis.asyncio as aioredis
from websockets.exceptions import InvalidStatus

from fanline.shared import events, keys
from tests.support import (
    Stack,
    assert_strictly_increasing,
    chat_body,
    create,
    generation,
    read_ndjson,
    read_sse,
    read_ws,
    settled,
    text_of,
    ws_url,
)

# -- NDJSON -------------------------------------------------------------------


def check_ndjson(lines: list[dict[str, Any]]) -> None:
    """Every line but the last is ``{"id", "chunk"}``; the last is ``{"id", "done": true}``."""
    *body, last = lines
    assert last == {"id": last["id"], "done": True}
    for line in body:
        assert set(line) == {"id", "chunk"}, line
        assert line["chunk"]["object"] == "chat.completion.chunk"


async def test_ndjson_lines_are_id_chunk_and_end_with_done(client: httpx.AsyncClient) -> None:
    gen_id = await create(client, prompt="transports", max_tokens=40)
    lines = (await read_ndjson(client, gen_id)).lines
    check_ndjson(lines)
    assert_strictly_increasing([line["id"] for line in lines])
    chunks = [line["chunk"] for line in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    info = await generation(client, gen_id)
    assert text_of(chunks) == info["content"] != ""


async def test_ndjson_resume_on_the_second_pod_gives_exactly_the_rest(stack: Stack) -> None:
    async with (
        httpx.AsyncClient(base_url=stack.api_urls[0], timeout=30) as first,
        httpx.AsyncClient(base_url=stack.api_urls[1], timeout=30) as second,
    ):
        gen_id = await create(first, prompt="transports", max_tokens=80)
        head = (await read_ndjson(first, gen_id, stop_after=5)).lines
        assert len(head) == 5 and not head[-1].get("done")
        rest = (await read_ndjson(second, gen_id, last_event_id=head[-1]["id"])).lines
        info = await generation(second, gen_id)
    lines = head + rest
    check_ndjson(lines)
    ids = [line["id"] for line in lines]
    assert_strictly_increasing(ids)  # no duplicate across the two reads
    assert text_of([line["chunk"] for line in lines[:-1]]) == info["content"]
    # Nothing skipped: a full replay has exactly the ids the two reads had together.
    async with httpx.AsyncClient(base_url=stack.api_urls[1], timeout=30) as second:
        assert [line["id"] for line in (await read_ndjson(second, gen_id)).lines] == ids


# -- WebSocket ------------------------------------------------------------------


async def test_websocket_messages_end_with_done_and_close_1000(stack: Stack, client: httpx.AsyncClient) -> None:
    gen_id = await create(client, prompt="transports", max_tokens=40)
    read = await read_ws(ws_url(stack.api_urls[1], gen_id), recv_timeout=30)
    assert read.close_code == 1000
    assert read.replies == []
    check_ndjson(read.messages)
    assert_strictly_increasing(read.ids)
    assert read.chunks[-1]["choices"][0]["finish_reason"] == "length"
    info = await generation(client, gen_id)
    assert text_of(read.chunks) == info["content"] != ""


async def test_websocket_resume_on_the_other_pod_gives_exactly_the_rest(
    stack: Stack, client: httpx.AsyncClient
) -> None:
    gen_id = await create(client, prompt="transports", max_tokens=80)
    head = await read_ws(ws_url(stack.api_urls[0], gen_id), stop_after=5, recv_timeout=30)
    assert len(head.messages) == 5 and head.close_code is None
    rest = await read_ws(ws_url(stack.api_urls[1], gen_id, last_event_id=head.ids[-1]), recv_timeout=30)
    assert rest.close_code == 1000
    messages = head.messages + rest.messages
    check_ndjson(messages)
    assert_strictly_increasing([m["id"] for m in messages])
    info = await generation(client, gen_id)
    assert text_of(head.chunks + rest.chunks) == info["content"]
    full = await read_ws(ws_url(stack.api_urls[1], gen_id), recv_timeout=30)
    assert full.ids == [m["id"] for m in messages]


async def test_websocket_cancel_message_cancels_the_generation(stack: Stack, client: httpx.AsyncClient) -> None:
    gen_id = await create(client, prompt="transports", max_tokens=2000)
    read = await read_ws(ws_url(stack.api_urls[1], gen_id), send=['{"type": "cancel"}'], recv_timeout=30)
    assert read.close_code == 1000
    assert read.replies == []
    check_ndjson(read.messages)
    assert read.chunks[-1]["choices"][0]["finish_reason"] == "cancelled"
    info = await settled(client, gen_id)
    assert info["status"] == "cancelled"
    assert info["finish_reason"] == "cancelled"
    assert text_of(read.chunks) == info["content"]
    assert len(info["content"].split()) < 2000


async def test_websocket_bad_client_messages_get_an_error_and_the_stream_goes_on(
    stack: Stack, client: httpx.AsyncClient
) -> None:
    gen_id = await create(client, prompt="transports", max_tokens=200)
    read = await read_ws(
        ws_url(stack.api_urls[0], gen_id), send=["this is not json", '{"type": "bogus"}'], recv_timeout=30
    )
    assert len(read.replies) == 2
    for message in read.replies:
        error = message["error"]
        assert isinstance(error["message"], str) and error["message"]
        assert isinstance(error["type"], str) and error["type"]
        assert isinstance(error["code"], str) and error["code"]
    assert read.close_code == 1000
    check_ndjson(read.messages)
    assert read.chunks[-1]["choices"][0]["finish_reason"] == "length"
    info = await generation(client, gen_id)
    assert info["status"] != "cancelled"
    assert text_of(read.chunks) == info["content"]
    assert len(info["content"].split()) == 200


async def test_websocket_to_an_unknown_generation_is_refused_with_404(stack: Stack) -> None:
    with pytest.raises(InvalidStatus) as refused:
        await read_ws(ws_url(stack.url, uuid.uuid4().hex))
    assert refused.value.response.status_code == 404
    error = orjson.loads(refused.value.response.body or b"{}")["error"]
    assert error["message"] and error["type"] and error["code"]


# -- SSE --------------------------------------------------------------------------


async def test_sse_sends_heartbeat_comments_and_the_text_is_still_exact(slow_heartbeat_stack: Stack) -> None:
    comments: list[str] = []
    events: list[tuple[str, str]] = []  # (id, data)
    async with httpx.AsyncClient(base_url=slow_heartbeat_stack.url, timeout=30) as client:
        gen_id = await create(client, prompt="transports", max_tokens=4)
        async with client.stream("GET", f"/v1/generations/{gen_id}/events") as response:
            assert response.status_code == 200
            event_id, data = "", ""
            async for line in response.aiter_lines():
                if line.startswith(":"):
                    comments.append(line)
                elif line.startswith("id:"):
                    event_id = line[3:].strip()
                elif line.startswith("data:"):
                    data = line[5:].strip()
                elif line == "" and data:
                    events.append((event_id, data))
                    if data == "[DONE]":
                        break
                    event_id, data = "", ""
        info = await generation(client, gen_id)
    assert ": ping" in comments
    assert events[-1][1] == "[DONE]"
    chunks = [orjson.loads(data) for _, data in events[:-1]]
    assert all(event_id for event_id, _ in events)
    assert_strictly_increasing([event_id for event_id, _ in events])
    assert text_of(chunks) == info["content"]
    assert len(info["content"].split()) == 4


async def test_sse_responses_disable_caching_and_proxy_buffering(client: httpx.AsyncClient) -> None:
    async with client.stream("POST", "/v1/chat/completions", json=chat_body(max_tokens=3)) as posted:
        assert posted.status_code == 200
        gen_id = posted.headers["x-fanline-generation-id"]
        await posted.aread()
    async with client.stream("GET", f"/v1/generations/{gen_id}/events") as watched:
        assert watched.status_code == 200
        await watched.aread()
    for response in (posted, watched):
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-accel-buffering"] == "no"
    assert watched.text.rstrip().endswith("data: [DONE]")


async def test_finished_generation_replays_fully_and_resuming_after_done_gives_done(fast_stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=fast_stack.url, timeout=30) as client:
        live = await read_sse(client, "POST", "/v1/chat/completions", json=chat_body("replay", max_tokens=30))
        assert live.done
        info = await settled(client, live.gen_id)
        assert info["status"] == "completed"
        events_url = f"/v1/generations/{live.gen_id}/events"

        replay = await read_sse(client, "GET", events_url)
        assert replay.done
        assert replay.ids == live.ids
        assert_strictly_increasing(replay.ids)
        assert replay.text == live.text == info["content"]

        done_id = live.ids[-1]
        after_done = await read_sse(client, "GET", events_url, headers={"Last-Event-ID": done_id})
        assert after_done.done and after_done.chunks == [] and after_done.ids == [done_id]
        ndjson = (await read_ndjson(client, live.gen_id, last_event_id=done_id)).lines
        assert ndjson == [{"id": done_id, "done": True}]
    ws = await read_ws(ws_url(fast_stack.api_urls[1], live.gen_id, last_event_id=done_id), recv_timeout=30)
    assert ws.messages == [{"id": done_id, "done": True}] and ws.close_code == 1000


async def test_status_is_final_when_the_stream_ends(fast_stack: Stack) -> None:
    """Regression: the worker wrote the outcome (status, finish_reason, usage) one round trip
    after the end event, so a client reading GET right after [DONE] could see "running".

    Ten clients at once keep the worker busy, which widens that window enough to show it.
    """

    async def client_loop(n: int) -> list[tuple[str, str | None]]:
        seen = []
        async with httpx.AsyncClient(base_url=fast_stack.api_urls[n % 2], timeout=30) as client:
            for m in range(30):
                body = chat_body(f"final {n} {m}", max_tokens=3)
                received = await read_sse(client, "POST", "/v1/chat/completions", json=body)
                assert received.done
                info = await generation(client, received.gen_id)
                seen.append((info["status"], info["finish_reason"]))
        return seen

    outcomes = [o for seen in await asyncio.gather(*(client_loop(n) for n in range(10))) for o in seen]
    assert outcomes == [("completed", "length")] * len(outcomes)


async def test_resuming_at_the_end_event_before_the_status_is_written_does_not_hang(stack: Stack) -> None:
    """Regression: a resume whose Last-Event-ID is the end event was answered with [DONE] only
    when the metadata already said the generation had finished. The worker writes that status
    one round trip after the end event (and a worker that dies in between never writes it), so
    a resume in that window was taken for a live generation and waited forever.

    The state of that window is written to Redis directly: metadata "running", stream ending
    with the end event.
    """
    gen_id = uuid.uuid4().hex
    events_key, meta_key, _ = keys.generation_keys(gen_id)
    created = int(time.time())
    redis = aioredis.Redis.from_url(stack.redis_url)
    try:
        await redis.hset(
            meta_key,
            mapping={
                keys.Meta.STATUS: "running",
                keys.Meta.MODEL: "demo",
                keys.Meta.CREATED: created,
                keys.Meta.REQUEST: orjson.dumps(chat_body("window", max_tokens=1)),
            },
        )
        chunk = events.chunk(events.completion_id(gen_id), created, "demo", {"role": "assistant", "content": "Hi "})
        await redis.xadd(events_key, events.entry_fields(events.CHUNK, chunk), id="1-0")
        await redis.xadd(events_key, events.entry_fields(events.END, b""), id="2-0")
        for key in (events_key, meta_key):
            await redis.expire(key, 60)
        async with httpx.AsyncClient(base_url=stack.url, timeout=httpx.Timeout(30, read=5)) as client:
            events_url = f"/v1/generations/{gen_id}/events"
            replay = await read_sse(client, "GET", events_url)
            assert replay.done and replay.ids == ["1-0", "2-0"]
            resumed = await read_sse(client, "GET", events_url, headers={"Last-Event-ID": "2-0"})
            assert resumed.done and resumed.ids == ["2-0"]
    finally:
        await redis.aclose()
