"""The publisher against a real Redis/Valkey: explicit ids, idempotent retries, coalescing, the closing entries."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from fanline.shared import events, keys
from fanline.shared.ids import new_generation_id
from fanline.worker.publisher import Publisher, ScriptBatch
from tests.support import text_of

USAGE = {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4}
RETENTION_S = 60


@pytest.fixture
async def gen_id(redis: aioredis.Redis) -> AsyncIterator[str]:
    """A generation in the state the job leaves it in before publishing: running."""
    gen_id = new_generation_id()
    await redis.hset(keys.meta_key(gen_id), keys.Meta.STATUS, "running")  # type: ignore[misc]
    yield gen_id
    await redis.delete(*keys.generation_keys(gen_id))


def publisher(redis: aioredis.Redis, gen_id: str) -> Publisher:
    return Publisher(redis, gen_id, "demo", 1700000000, max_events=100_000, retention_s=RETENTION_S)


async def meta(redis: aioredis.Redis, gen_id: str) -> dict[str, str]:
    stored: dict[bytes, bytes] = await redis.hgetall(keys.meta_key(gen_id))  # type: ignore[misc]
    return {k.decode(): v.decode() for k, v in stored.items()}


async def entries(redis: aioredis.Redis, gen_id: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
    result: list[tuple[bytes, dict[bytes, bytes]]] = await redis.xrange(keys.events_key(gen_id))
    return result


def payloads(stored: list[tuple[bytes, dict[bytes, bytes]]]) -> list[Any]:
    return [orjson.loads(fields[b"d"]) if fields[b"k"] != events.END else None for _, fields in stored]


def stored_text(stored: list[tuple[bytes, dict[bytes, bytes]]]) -> str:
    return text_of([p for p in payloads(stored) if p])


async def test_resending_the_same_entries_is_a_no_op(redis: aioredis.Redis, gen_id: str) -> None:
    pub = publisher(redis, gen_id)
    for token in ("one ", "two ", "three "):
        pub.add({"content": token})
        await pub.drain()  # one write per token
    before = await entries(redis, gen_id)
    assert [entry_id for entry_id, _ in before] == [b"1-0", b"2-0", b"3-0"]
    content = await redis.get(keys.content_key(gen_id))
    assert content == b"one two three "

    # A retry after a lost reply: the same ids, the same text at the same offset.
    resent = [(entry_id.decode(), fields) for entry_id, fields in before]
    await pub._send(resent, 0, content)
    await pub._send(resent[1:], len(b"one "), b"two three ")
    assert await redis.xlen(keys.events_key(gen_id)) == 3
    assert await entries(redis, gen_id) == before
    assert await redis.get(keys.content_key(gen_id)) == content


async def test_a_retry_that_partly_succeeded_writes_only_what_is_missing(redis: aioredis.Redis, gen_id: str) -> None:
    pub = publisher(redis, gen_id)
    pub.add({"content": "alpha "})
    await pub.drain()
    stored = await entries(redis, gen_id)
    # The first attempt stored entry 1 and "alpha "; the reply was lost; the retry also carries entry 2.
    batch = [
        ("1-0", stored[0][1]),
        ("2-0", events.entry_fields(events.CHUNK, events.chunk("chatcmpl-x", 1, "demo", {"content": "beta "}))),
    ]
    await pub._send(batch, 0, b"alpha beta ")
    after = await entries(redis, gen_id)
    assert [entry_id for entry_id, _ in after] == [b"1-0", b"2-0"]
    assert after[0] == stored[0]
    assert stored_text(after) == "alpha beta "
    assert await redis.get(keys.content_key(gen_id)) == b"alpha beta "


async def test_tokens_added_without_yielding_are_coalesced(redis: aioredis.Redis, gen_id: str) -> None:
    tokens = [f"t{i} " for i in range(500)]
    pub = publisher(redis, gen_id)
    for token in tokens:  # no await in between: the flusher cannot run until the loop gets control
        pub.add({"content": token})
    await pub.drain()
    stored = await entries(redis, gen_id)
    assert len(stored) < len(tokens) // 10
    assert stored_text(stored) == "".join(tokens)
    assert await redis.get(keys.content_key(gen_id)) == "".join(tokens).encode()
    first = payloads(stored)[0]
    assert first["choices"][0]["delta"]["role"] == "assistant"
    assert all("role" not in p["choices"][0]["delta"] for p in payloads(stored)[1:])
    assert [entry_id for entry_id, _ in stored] == [f"{n}-0".encode() for n in range(1, len(stored) + 1)]


async def test_tokens_interleaved_with_writes_keep_order_and_text(redis: aioredis.Redis, gen_id: str) -> None:
    tokens = [f"w{i} " for i in range(300)]
    pub = publisher(redis, gen_id)
    for i, token in enumerate(tokens):
        pub.add({"content": token})
        if i % 7 == 0:
            await pub.drain()
    await pub.drain()
    stored = await entries(redis, gen_id)
    assert len(stored) < len(tokens)
    assert stored_text(stored) == "".join(tokens)
    assert await redis.get(keys.content_key(gen_id)) == "".join(tokens).encode()
    assert pub.seq == len(stored)


@pytest.mark.parametrize("include_usage", [False, True])
async def test_finish_writes_final_chunk_usage_if_asked_and_end(
    redis: aioredis.Redis, gen_id: str, include_usage: bool
) -> None:
    pub = publisher(redis, gen_id)
    pub.add({"content": "Hello "})
    await pub.drain()
    pub.add({"content": "world"})
    await pub.finish("completed", "length", USAGE, include_usage)
    stored = await entries(redis, gen_id)
    kinds = [fields[b"k"] for _, fields in stored]
    assert stored[-1][0] == f"{len(stored)}-0".encode()
    expected_kinds = [events.CHUNK] * (4 if include_usage else 3) + [events.END]
    assert kinds == expected_kinds
    assert stored[-1][1][b"d"] == b""
    chunks = payloads(stored)[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "Hello "}
    assert chunks[1]["choices"][0] == {
        "index": 0,
        "delta": {"content": "world"},
        "logprobs": None,
        "finish_reason": None,
    }
    assert chunks[2]["choices"][0]["delta"] == {}
    assert chunks[2]["choices"][0]["finish_reason"] == "length"
    if include_usage:
        assert chunks[3]["choices"] == []
        assert chunks[3]["usage"] == USAGE
    for chunk in chunks:
        assert chunk["id"] == f"chatcmpl-{gen_id}"
        assert chunk["object"] == "chat.completion.chunk"
        assert (chunk["model"], chunk["created"]) == ("demo", 1700000000)
    assert await redis.get(keys.content_key(gen_id)) == b"Hello world"
    # The outcome is written with the end event, and from then on every key expires.
    outcome = await meta(redis, gen_id)
    assert outcome["status"] == "completed"
    assert outcome["finish_reason"] == "length"
    assert orjson.loads(outcome["usage"]) == USAGE
    assert outcome["last_event_id"] == stored[-1][0].decode()
    for key in keys.generation_keys(gen_id):
        assert 0 < await redis.ttl(key) <= RETENTION_S, key


async def test_finish_without_any_token_still_sends_the_role(redis: aioredis.Redis, gen_id: str) -> None:
    pub = publisher(redis, gen_id)
    await pub.finish("completed", "stop", None, True)  # no usage known: no usage chunk even when asked
    stored = await entries(redis, gen_id)
    assert [fields[b"k"] for _, fields in stored] == [events.CHUNK, events.END]
    assert payloads(stored)[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert payloads(stored)[0]["choices"][0]["finish_reason"] == "stop"


async def test_fail_writes_an_error_then_the_end(redis: aioredis.Redis, gen_id: str) -> None:
    pub = publisher(redis, gen_id)
    pub.add({"content": "partial"})
    await pub.fail("upstream timed out", "upstream_timeout")
    stored = await entries(redis, gen_id)
    assert [fields[b"k"] for _, fields in stored] == [events.CHUNK, events.ERROR, events.END]
    outcome = await meta(redis, gen_id)
    assert (outcome["status"], outcome["last_event_id"]) == ("failed", "3-0")
    assert orjson.loads(outcome["error"]) == {"message": "upstream timed out", "code": "upstream_timeout"}
    assert payloads(stored)[1] == {
        "error": {"message": "upstream timed out", "type": "server_error", "param": None, "code": "upstream_timeout"}
    }


async def test_cancel_flag_is_seen_by_the_next_write(redis: aioredis.Redis, gen_id: str) -> None:
    pub = publisher(redis, gen_id)
    pub.add({"content": "a"})
    await pub.drain()
    assert not pub.cancel_requested
    await redis.hset(keys.meta_key(gen_id), keys.Meta.CANCEL, "1")  # type: ignore[misc]
    pub.add({"content": "b"})
    await pub.drain()
    assert pub.cancel_requested


async def test_nothing_is_written_once_the_generation_is_no_longer_running(redis: aioredis.Redis, gen_id: str) -> None:
    pub = publisher(redis, gen_id)
    pub.add({"content": "mine "})
    await pub.drain()
    # A reaper declared this worker lost and ended the generation.
    await redis.hset(keys.meta_key(gen_id), keys.Meta.STATUS, "failed")  # type: ignore[misc]
    pub.add({"content": "too late"})
    await pub.drain()
    assert pub.disowned
    assert await redis.xlen(keys.events_key(gen_id)) == 1
    assert await redis.get(keys.content_key(gen_id)) == b"mine "


async def test_resending_the_final_write_is_a_no_op(redis: aioredis.Redis, gen_id: str) -> None:
    pub = publisher(redis, gen_id)
    pub.add({"content": "done"})
    await pub.finish("completed", "stop", USAGE, False)
    before, outcome = await entries(redis, gen_id), await meta(redis, gen_id)
    # The reply to the write that carried the end was lost: the same write again.
    resent = [(entry_id.decode(), fields) for entry_id, fields in before]
    await pub._send(resent, 0, b"done", {"status": "completed", "finish_reason": "stop"})
    assert not pub.disowned  # it finds the status it wrote itself
    assert await entries(redis, gen_id) == before
    assert await meta(redis, gen_id) == outcome
    assert await redis.get(keys.content_key(gen_id)) == b"done"


# -- ScriptBatch: the writes of many generations in one pipeline ---------------------

_ECHO = "if ARGV[1] == 'fail' then return redis.error_reply('asked to fail') end return {KEYS[1], ARGV[1]}"


async def _connections_named(redis: aioredis.Redis, name: str) -> int:
    return sum(1 for client in await redis.client_list() if client.get("name") == name)


async def test_script_calls_made_together_share_one_connection_and_get_their_own_replies(
    redis: aioredis.Redis, redis_url: str
) -> None:
    name = f"batch-{new_generation_id()[:8]}"
    batched = aioredis.Redis.from_url(redis_url, client_name=name)
    alone = aioredis.Redis.from_url(redis_url, client_name=f"{name}-alone")
    try:
        batch = ScriptBatch(batched)
        script = batched.register_script(_ECHO)
        await batched.script_load(_ECHO)
        replies = await asyncio.gather(*(batch.call(script, [f"k{i}"], [str(i)]) for i in range(20)))
        assert replies == [[f"k{i}".encode(), str(i).encode()] for i in range(20)]
        assert await _connections_named(redis, name) == 1  # one pipeline, not 20 round trips in parallel
        # The same 20 calls made directly open a connection each: the count above would see it.
        direct = alone.register_script(_ECHO)
        await asyncio.gather(*(direct(keys=[f"k{i}"], args=[str(i)]) for i in range(20)))
        assert await _connections_named(redis, f"{name}-alone") > 1
    finally:
        await batched.aclose()
        await alone.aclose()


async def test_one_failing_call_in_a_batch_fails_alone(redis: aioredis.Redis) -> None:
    batch = ScriptBatch(redis)
    script = redis.register_script(_ECHO)
    replies = await asyncio.gather(
        batch.call(script, ["a"], ["1"]),
        batch.call(script, ["b"], ["fail"]),
        batch.call(script, ["c"], ["3"]),
        return_exceptions=True,
    )
    assert replies[0] == [b"a", b"1"] and replies[2] == [b"c", b"3"]
    assert isinstance(replies[1], ResponseError) and "asked to fail" in str(replies[1])


async def test_a_batch_loads_its_scripts_again_after_redis_lost_them(redis: aioredis.Redis) -> None:
    """A restarted Redis has no scripts: each call is made again the way that loads it. (A script
    of this test's own stands for one the server lost: no other test's scripts are flushed.)"""
    batch = ScriptBatch(redis)
    script = redis.register_script(f"{_ECHO} -- {new_generation_id()}")
    assert await redis.script_exists(script.sha) == [False]
    replies = await asyncio.gather(*(batch.call(script, [f"k{i}"], [str(i)]) for i in range(3)))
    assert replies == [[f"k{i}".encode(), str(i).encode()] for i in range(3)]


async def test_publishers_sharing_a_batch_write_their_own_streams(redis: aioredis.Redis) -> None:
    batch = ScriptBatch(redis)
    gen_ids = [new_generation_id() for _ in range(5)]
    try:
        for gen_id in gen_ids:
            await redis.hset(keys.meta_key(gen_id), keys.Meta.STATUS, "running")  # type: ignore[misc]
        publishers = [
            Publisher(redis, gen_id, "demo", 1700000000, max_events=100_000, retention_s=RETENTION_S, batch=batch)
            for gen_id in gen_ids
        ]
        for n, pub in enumerate(publishers):
            pub.add({"content": f"gen {n} "})
            pub.add({"content": "says hi"})
        await asyncio.gather(*(pub.finish("completed", "stop", USAGE, False) for pub in publishers))
        for n, gen_id in enumerate(gen_ids):
            stored = [orjson.loads(fields[b"d"]) for _, fields in await entries(redis, gen_id) if fields[b"d"]]
            assert text_of(stored) == f"gen {n} says hi"
            assert (await meta(redis, gen_id))["status"] == "completed"
    finally:
        for gen_id in gen_ids:
            await redis.delete(*keys.generation_keys(gen_id))
