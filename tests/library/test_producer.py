"""The producer library (issue 12): an app's own stream published as a fanline generation,
watched and resumed on real API pods, on each backend (Valkey, Redis; the Cluster in
tests/cluster/test_cluster.py)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator

import httpx
import pytest
import redis.asyncio as aioredis

import fanline
from tests.conftest import OUTPUT
from tests.support import Received, Stack, assert_strictly_increasing, read_sse_at, settled_at, wait_until

WORDS = [f" word{i}" for i in range(40)]


@pytest.fixture
async def producer(stack: Stack) -> AsyncIterator[fanline.Producer]:
    async with fanline.Producer(fanline.Settings(redis_url=stack.redis_url)) as producer:
        yield producer


async def watch_all(url: str | list[str], gen_id: str, last_event_id: str | None = None) -> list[fanline.Update]:
    return [u async for u in fanline.watch(url, gen_id, last_event_id=last_event_id)]


async def test_an_app_generation_is_watched_live_and_resumed_on_another_pod(
    stack: Stack, producer: fanline.Producer
) -> None:
    pod_a, pod_b = stack.api_urls[:2]
    live: list[fanline.Update] = []

    async def follow(gen_id: str) -> None:
        async for update in fanline.watch(pod_a, gen_id):
            live.append(update)

    async with producer.generation(model="my-model") as gen:
        watcher = asyncio.create_task(follow(gen.id))
        gen.add({"reasoning_content": "thinking"})
        for word in WORDS[:20]:
            gen.add(word)
            await gen.flush()
        await wait_until(lambda: len(live) >= 5, "5 live updates on pod A")
        for word in WORDS[20:]:
            gen.add(word)
            await asyncio.sleep(0.002)
        gen.add({"tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "f"}}]})
        gen.add({"tool_calls": [{"index": 0, "function": {"arguments": '{"a": 1}'}}]})
    await asyncio.wait_for(watcher, 30)

    info = await settled_at(pod_b, gen.id)
    assert info["status"] == "completed" and info["finish_reason"] == "stop" and info["model"] == "my-model"
    assert info["content"] == "".join(WORDS)
    assert info["reasoning"] == "thinking"
    assert info["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    ]
    ids = [u.id for u in live]
    assert_strictly_increasing(ids)
    assert "".join(u.content for u in live) == info["content"]
    # A second viewer resumes mid-way on the other pod: exactly the rest, no gap, no duplicate.
    rest = await watch_all(pod_b, gen.id, last_event_id=ids[4])
    assert [u.id for u in rest] == ids[5:]
    replay = await read_sse_at(pod_b, gen.id, Received())
    assert replay.ids[:-1] == ids and replay.done


async def test_openai_chunks_keep_their_finish_reason_and_usage(stack: Stack, producer: fanline.Producer) -> None:
    def chunk(delta: dict[str, object], finish_reason: str | None = None) -> dict[str, object]:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        return {"object": "chat.completion.chunk", "choices": [choice]}

    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    async with producer.generation(model="upstream") as gen:
        gen.add(chunk({"role": "assistant", "content": ""}))
        gen.add(chunk({"content": "Hi"}))
        gen.add(chunk({"content": " there"}))
        gen.add(chunk({}, finish_reason="length"))
        gen.add({"object": "chat.completion.chunk", "choices": [], "usage": usage})
    info = await settled_at(stack.url, gen.id)
    assert (info["content"], info["finish_reason"], info["usage"]) == ("Hi there", "length", usage)
    replay = await read_sse_at(stack.url, gen.id, Received())
    assert replay.chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert replay.chunks[-1]["choices"] == [] and replay.chunks[-1]["usage"] == usage
    with pytest.raises(TypeError, match="not int"):
        async with producer.generation() as bad:
            bad.add(42)
    assert (await settled_at(stack.url, bad.id))["error"]["code"] == "generation_failed"


async def test_a_viewers_cancel_reaches_the_producer(stack: Stack, producer: fanline.Producer) -> None:
    added = 0
    async with producer.generation(model="long") as gen:
        async with httpx.AsyncClient(timeout=30) as client:
            response = await client.post(f"{stack.api_urls[1]}/v1/generations/{gen.id}/cancel")
            assert response.status_code == 202, response.text
        with pytest.raises(fanline.Cancelled):
            for word in WORDS * 1000:  # until the cancel arrives
                gen.add(word)
                added += 1
                await asyncio.sleep(0.005)
        assert gen.cancelled
        raise fanline.Cancelled("the block ends the generation as cancelled")  # and the block swallows it
    info = await settled_at(stack.url, gen.id)
    assert info["status"] == "cancelled" and info["finish_reason"] == "cancelled"
    assert added < len(WORDS) * 1000
    replay = await read_sse_at(stack.url, gen.id, Received())
    assert replay.finish_reason == "cancelled" and replay.done


async def test_an_error_in_the_app_fails_the_generation_with_its_code(stack: Stack, producer: fanline.Producer) -> None:
    with pytest.raises(fanline.GenerationFailed):
        async with producer.generation() as gen:
            gen.add("partial")
            raise fanline.GenerationFailed("the model refused", code="model_refused")
    with pytest.raises(fanline.GenerationError) as raised:
        await watch_all(stack.url, gen.id)
    assert raised.value.code == "model_refused"
    info = await settled_at(stack.url, gen.id)
    assert info["status"] == "failed" and info["content"] == "partial"


async def test_a_dead_producers_viewers_get_worker_lost(stack: Stack) -> None:
    """The app's process is SIGKILLed mid-generation: a reaper on the pods ends it (Guarantee 4)."""
    script = (
        "import asyncio, sys, fanline\n"
        "async def main():\n"
        "    producer = fanline.Producer(fanline.Settings(redis_url=sys.argv[1]))\n"
        "    gen = await producer.create(model='doomed')\n"
        "    gen.add('half an answer')\n"
        "    await gen.flush()\n"
        "    print(gen.id, flush=True)\n"
        "    await asyncio.sleep(3600)\n"
        "asyncio.run(main())\n"
    )
    log = (OUTPUT / "doomed-producer.log").open("wb")
    app = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, stack.redis_url, stdout=subprocess.PIPE, stderr=log
    )
    try:
        assert app.stdout is not None
        gen_id = (await asyncio.wait_for(app.stdout.readline(), 30)).decode().strip()
        updates: list[fanline.Update] = []

        async def follow() -> None:
            async for update in fanline.watch(stack.url, gen_id):
                updates.append(update)

        watcher = asyncio.create_task(follow())
        await wait_until(lambda: bool(updates), "the first update")
        app.send_signal(signal.SIGKILL)
        with pytest.raises(fanline.GenerationError) as raised:
            await asyncio.wait_for(watcher, 15)  # Guarantee 4's bound
        assert raised.value.code == "worker_lost"
        assert "".join(u.content for u in updates) == "half an answer"
    finally:
        if app.returncode is None:
            app.kill()
        await app.wait()
        log.close()


async def test_a_retried_append_after_lost_connections_neither_loses_nor_duplicates(stack: Stack) -> None:
    """The producer's connections are killed again and again mid-stream; the publisher retries the
    same ``<seq>-0`` ids, so Redis keeps each event exactly once."""
    name = "fanline-producer-under-test"
    settings = fanline.Settings(redis_url=f"{stack.redis_url.split('?')[0]}?client_name={name}")
    admin = aioredis.Redis.from_url(stack.redis_url)
    kills = 0
    try:
        async with fanline.Producer(settings) as producer, producer.generation() as gen:
            for i, word in enumerate(WORDS * 5):
                gen.add(word)
                if i % 25 == 10:
                    await asyncio.sleep(0)  # let a write start, then cut it off
                    for client in await admin.client_list():
                        if client.get("name") == name:
                            await admin.client_kill_filter(_id=client["id"])
                            kills += 1
                await asyncio.sleep(0.001)
    finally:
        await admin.aclose()
    assert kills >= 5
    info = await settled_at(stack.url, gen.id)
    assert info["status"] == "completed" and info["content"] == "".join(WORDS * 5)
    replay = await read_sse_at(stack.api_urls[1], gen.id, Received())
    assert replay.text == info["content"]
    assert replay.ids == [f"{n}-0" for n in range(1, len(replay.ids) + 1)]  # no gap, no duplicate


async def test_the_sync_producer_publishes_from_a_thread(stack: Stack) -> None:
    def produce() -> str:
        with fanline.SyncProducer(fanline.Settings(redis_url=stack.redis_url)) as producer:
            with producer.generation(model="sync") as gen:
                for word in WORDS:
                    gen.add(word)
            return gen.id

    result: list[str] = []
    thread = threading.Thread(target=lambda: result.append(produce()))
    thread.start()
    await asyncio.to_thread(thread.join, 30)
    info = await settled_at(stack.url, result[0])
    assert info["status"] == "completed" and info["content"] == "".join(WORDS) and info["model"] == "sync"


async def test_closing_the_producer_ends_open_generations(stack: Stack) -> None:
    producer = fanline.Producer(fanline.Settings(redis_url=stack.redis_url))
    gen = await producer.create()
    gen.add("unfinished")
    await producer.close()
    with pytest.raises(fanline.GenerationError) as raised:
        await watch_all(stack.url, gen.id)
    assert raised.value.code == "producer_shutdown"
