"""The generation job on real workers: prompt start, claims, deterministic demo, idle cancel, key expiry."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from typing import Any

import httpx
import orjson
import redis.asyncio as aioredis
from arq.connections import RedisSettings, create_pool
from arq.constants import in_progress_key_prefix, job_key_prefix, retry_key_prefix

from fanline.api.generations import enqueue, write_queued
from fanline.shared import keys
from fanline.shared.ids import new_generation_id
from fanline.shared.requests import ChatCompletionRequest
from fanline.shared.settings import Settings
from fanline.worker.generators.demo import demo_tokens
from tests.conftest import StackFactory
from tests.support import Stack, chat_body, create, generation, read_sse, wait_finished, wait_until


async def test_jobs_start_on_the_wake_message_not_on_arq_polling(stack_factory: StackFactory) -> None:
    # arq polls its queue only every 30 s here; each request below would wait for that poll
    # (and time out: the client gives up after 15 s) if the wake message did not start the job.
    # (worker_grace_s=0: this stack's worker need not wait for anything when the session ends.)
    stack = stack_factory(apis=1, worker_poll_delay_s="30", worker_grace_s="0", demo_tokens_per_s="0")
    async with httpx.AsyncClient(base_url=stack.url, timeout=15) as client:
        for n in range(3):
            response = await client.post("/v1/chat/completions", json=chat_body(f"prompt {n}", stream=False))
            assert response.status_code == 200, response.text
            gen_id = response.headers["x-fanline-generation-id"]
            message = response.json()["choices"][0]["message"]["content"]
            assert message == (await generation(client, gen_id))["content"] != ""
        streamed = await read_sse(client, "POST", "/v1/chat/completions", json=chat_body("streamed", max_tokens=5))
        assert streamed.done and streamed.finish_reason == "length"
        assert streamed.text == (await generation(client, streamed.gen_id))["content"]


async def test_an_idle_worker_stops_on_sigterm_without_waiting_for_arq_polling(stack_factory: StackFactory) -> None:
    """Pins a bug: after SIGTERM, arq waits until its task table is empty, and finished jobs leave that
    table only at the next poll, so an idle worker took min(poll delay, grace) to stop."""
    stack = stack_factory(shared=False, apis=1, worker_poll_delay_s="30", demo_tokens_per_s="0")
    worker = stack.workers[0]
    try:
        async with httpx.AsyncClient(base_url=stack.url, timeout=15) as client:
            response = await client.post("/v1/chat/completions", json=chat_body(stream=False, max_tokens=3))
            assert response.status_code == 200, response.text
        worker.send_signal(signal.SIGTERM)
        try:
            # Nothing is running: the worker has nothing to wait for (its next poll is ~30 s away).
            code = await asyncio.to_thread(worker.wait, 10)
        except subprocess.TimeoutExpired:
            code = None
        assert code == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        stack.stop()


async def test_demo_is_deterministic_for_a_prompt_and_seed(fast_stack: Stack) -> None:
    prompt = "determinism"

    async def complete(**extra: Any) -> dict[str, Any]:
        async with httpx.AsyncClient(base_url=fast_stack.url, timeout=30) as client:
            response = await client.post("/v1/chat/completions", json=chat_body(prompt, stream=False, **extra))
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result

    first, again, other_seed = await asyncio.gather(
        complete(seed=7, max_tokens=20), complete(seed=7, max_tokens=20), complete(seed=8, max_tokens=20)
    )
    text = first["choices"][0]["message"]["content"]
    assert text == "".join(demo_tokens(prompt, 7, 20))
    assert again["choices"][0]["message"]["content"] == text
    assert other_seed["choices"][0]["message"]["content"] != text

    natural, natural_again = await asyncio.gather(complete(seed=3), complete(seed=3))
    assert natural["choices"][0]["message"]["content"] == natural_again["choices"][0]["message"]["content"]
    natural_tokens = len(natural["choices"][0]["message"]["content"].split())
    assert 24 <= natural_tokens <= 63
    assert natural["choices"][0]["message"]["content"] == "".join(demo_tokens(prompt, 3, natural_tokens))


async def test_the_outcome_is_written_before_viewers_see_the_end(fast_stack: Stack) -> None:
    """Pins a race: the job published the end event before writing status, finish_reason and usage to the
    metadata, so a non-streaming completion (built from the metadata once the end arrives) often had
    ``finish_reason: null`` and ``usage: null``, and GET right after [DONE] could still say "running"."""
    async with httpx.AsyncClient(base_url=fast_stack.url, timeout=30) as client:
        for n in range(10):
            response = await client.post(
                "/v1/chat/completions", json=chat_body(f"outcome {n}", stream=False, max_tokens=8)
            )
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["choices"][0]["finish_reason"] == "length", body
            assert body["usage"]["completion_tokens"] == 8, body

            streamed = await read_sse(client, "POST", "/v1/chat/completions", json=chat_body(f"seen {n}", max_tokens=8))
            assert streamed.done and streamed.finish_reason == "length"
            info = await generation(client, streamed.gen_id)
            assert (info["status"], info["finish_reason"]) == ("completed", "length"), info
            assert info["usage"]["completion_tokens"] == 8


async def test_a_generation_nobody_watches_is_cancelled_when_idle(stack_factory: StackFactory) -> None:
    stack = stack_factory(idle_cancel_s="1", demo_tokens_per_s="10")
    prompt = "nobody is watching"
    async with httpx.AsyncClient(base_url=stack.url, timeout=30) as client:
        gen_id = await create(client, prompt=prompt, max_tokens=300)  # 30 s of tokens if nobody stopped it
        info = await wait_finished(client, gen_id)
        replay = await read_sse(client, "GET", f"/v1/generations/{gen_id}/events")
    full = "".join(demo_tokens(prompt, None, 300))
    assert info["status"] == "cancelled"
    assert info["finish_reason"] == "cancelled"
    assert len(info["content"]) < len(full)
    assert full.startswith(info["content"])
    assert replay.done and replay.finish_reason == "cancelled"
    assert replay.text == info["content"]


async def test_a_watched_generation_is_not_idle_cancelled(stack_factory: StackFactory) -> None:
    stack = stack_factory(idle_cancel_s="1", demo_tokens_per_s="10")
    async with httpx.AsyncClient(base_url=stack.url, timeout=30) as client:
        gen_id = await create(client, prompt="someone is watching", max_tokens=40)  # 4 s at 10 tokens/s
        watched = await read_sse(client, "GET", f"/v1/generations/{gen_id}/events")
        info = await generation(client, gen_id)
    assert watched.done
    assert (info["status"], watched.finish_reason) == ("completed", "length")
    assert watched.text == info["content"] == "".join(demo_tokens("someone is watching", None, 40))


async def test_keys_expire_after_the_retention_period(stack_factory: StackFactory, redis: aioredis.Redis) -> None:
    stack = stack_factory(retention_s="60", demo_tokens_per_s="20")
    async with httpx.AsyncClient(base_url=stack.url, timeout=30) as client:
        gen_id = await create(client, max_tokens=20)  # about 1 s
        # Before it finishes: the metadata is not immortal either.
        before = await redis.ttl(keys.meta_key(gen_id))
        assert 0 < before <= keys.UNFINISHED_TTL_S
        assert (await generation(client, gen_id))["status"] in ("queued", "running")
        info = await wait_finished(client, gen_id)
    assert info["status"] == "completed"
    for key in keys.generation_keys(gen_id):
        assert await redis.exists(key) == 1, key
        assert 0 < await redis.ttl(key) <= 60, key


async def create_together(stack: Stack, prompt: str, count: int, max_tokens: int) -> list[str]:
    """``count`` generations (POST /v1/generations, prompts "<prompt> <n>") that reach the API at
    once: on connections it has accepted, while it is stopped, so that when it goes on it finds
    them all in one turn of its loop. (Sent to a running API on a loaded machine, each could be
    read in a turn of its own, and the tests of bursts failed in CI that way.)"""
    port = int(stack.url.rsplit(":", 1)[1])
    connections = [await asyncio.open_connection("127.0.0.1", port) for _ in range(count)]
    for reader, writer in connections:  # a first request on each: the API has accepted them all
        writer.write(b"GET /healthz HTTP/1.1\r\nhost: fanline\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
        await reader.readexactly(length)
    api = stack.apis[0]
    api.send_signal(signal.SIGSTOP)
    try:
        for n, (_, writer) in enumerate(connections):  # on loopback, each write lands in the API's socket at once
            body = orjson.dumps(chat_body(f"{prompt} {n}", stream=False, max_tokens=max_tokens))
            writer.write(
                b"POST /v1/generations HTTP/1.1\r\nhost: fanline\r\ncontent-type: application/json\r\n"
                b"connection: close\r\ncontent-length: %d\r\n\r\n%b" % (len(body), body)
            )
    finally:
        api.send_signal(signal.SIGCONT)
    answers = await asyncio.gather(*(reader.read() for reader, _ in connections))
    for _, writer in connections:
        writer.close()
    return [orjson.loads(answer.partition(b"\r\n\r\n")[2])["id"] for answer in answers]


async def test_two_workers_woken_together_run_each_of_40_jobs_exactly_once(stack_factory: StackFactory) -> None:
    """The claim (worker/main.py, one script for the jobs found together) replaced arq's
    WATCH/MULTI: both workers get every wake message and claim the jobs it names at once, and
    still no job runs twice."""
    stack = stack_factory(apis=1, workers=2, demo_tokens_per_s="200", log_level="info")
    gen_ids = await create_together(stack, "claim", 40, max_tokens=5)
    async with httpx.AsyncClient(base_url=stack.url, timeout=30) as client:
        for gen_id in gen_ids:
            info = await wait_finished(client, gen_id)
            assert info["status"] == "completed" and len(info["content"].split()) == 5
    logs = [(stack.log_dir / f"worker{n}.log").read_text() for n in range(2)]
    starts = {gen_id: sum(log.count(f"generation {gen_id} started") for log in logs) for gen_id in gen_ids}
    assert set(starts.values()) == {1}, starts
    taken = [log.count(" started") for log in logs]
    assert all(n >= 5 for n in taken), f"both workers should have taken jobs: {taken}"
    assert not [line for log in logs for line in log.splitlines() if "its job failed" in line]


async def test_requests_that_arrive_together_share_their_writes_and_one_wake_message(
    stack_factory: StackFactory, redis: aioredis.Redis
) -> None:
    """api/generations.py writes the generations created in one moment together, and one wake
    message names the queue and all of their jobs; the worker starts them from that message
    alone (arq would poll only every 30 s here)."""
    stack = stack_factory(apis=1, worker_poll_delay_s="30", worker_grace_s="0", demo_tokens_per_s="0")
    queue_name = stack.env["FANLINE_QUEUE_NAME"]
    async with redis.pubsub() as pubsub:
        await pubsub.subscribe(keys.WAKE_CHANNEL)
        subscribed = await pubsub.get_message(timeout=10)  # subscribed before the requests go out
        assert subscribed is not None and subscribed["type"] == "subscribe"
        gen_ids = await create_together(stack, "together", 20, max_tokens=3)
        named: list[str] = []
        messages = 0
        while len(named) < len(gen_ids):
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=10)
            assert message is not None, f"the wake messages named {len(named)} of the 20 jobs"
            queue, *jobs = message["data"].decode().split()
            if queue == queue_name:
                named += jobs
                messages += 1
    assert sorted(named) == sorted(gen_ids)
    assert messages < len(gen_ids), "requests that arrived together should share a wake message"
    async with httpx.AsyncClient(base_url=stack.url, timeout=15) as client:
        for gen_id in gen_ids:
            assert (await wait_finished(client, gen_id))["status"] == "completed"


async def test_a_job_tried_before_leaves_the_queue_without_running(
    stack_factory: StackFactory, redis: aioredis.Redis, redis_url: str
) -> None:
    """A job runs at most once (arq's max_tries=1, counted by the claim in worker/main.py): one
    whose try was counted before, by a worker that is gone, is taken off the queue, not run."""
    stack = stack_factory(apis=1, worker_poll_delay_s="30", worker_grace_s="0", demo_tokens_per_s="0")
    queue_name = stack.env["FANLINE_QUEUE_NAME"]
    queue = await create_pool(RedisSettings.from_dsn(redis_url))
    try:
        tried, fresh = new_generation_id(), new_generation_id()
        for gen_id in (tried, fresh):
            await write_queued(redis, gen_id, ChatCompletionRequest.model_validate(chat_body(max_tokens=3)))
        await redis.set(retry_key_prefix + tried, 1)
        await enqueue(queue, [tried, fresh], queue_name)
        async with httpx.AsyncClient(base_url=stack.url, timeout=15) as client:
            assert (await wait_finished(client, fresh))["status"] == "completed"

        async def left() -> bool:
            return await redis.zscore(queue_name, tried) is None

        await wait_until(left, "the job tried before to leave the queue")
        assert await redis.exists(*(prefix + tried for prefix in (in_progress_key_prefix, retry_key_prefix))) == 0
        assert await redis.hget(keys.meta_key(tried), "status") == b"queued"  # type: ignore[misc]  # never started
        assert await redis.exists(keys.events_key(tried)) == 0
        assert await redis.zscore(keys.RUNNING, tried) is None
    finally:
        await queue.aclose()


async def test_a_finished_job_leaves_the_queue_and_the_running_list_with_its_keys(
    fast_stack: Stack, redis: aioredis.Redis
) -> None:
    """The worker ends a job in one transaction of its own (worker/main.py ``_finish``), where
    arq's finish and the running list's removal were two round trips: nothing may be left."""
    async with httpx.AsyncClient(base_url=fast_stack.url, timeout=15) as client:
        gen_id = await create(client, max_tokens=3)
        assert (await wait_finished(client, gen_id))["status"] == "completed"

    async def finished() -> bool:
        return await redis.zscore(keys.RUNNING, gen_id) is None

    await wait_until(finished, "the generation to leave the running list")
    job_keys = (prefix + gen_id for prefix in (in_progress_key_prefix, retry_key_prefix, job_key_prefix))
    assert await redis.exists(*job_keys) == 0
    assert await redis.zscore(fast_stack.env["FANLINE_QUEUE_NAME"], gen_id) is None


async def test_a_queue_on_another_database_than_the_events(stack_factory: StackFactory, redis_url: str) -> None:
    """With the queue on a Redis (here: a database) of its own, the API writes a generation's
    metadata before its job, and the worker marks it running in a call of its own: the claim
    that does both at once on one Redis cannot reach the events there."""
    server = redis_url.rstrip("/").removesuffix("/0")
    queue_url = f"{server}/1"
    assert not Settings(redis_url=redis_url, queue_redis_url=queue_url).one_redis
    stack = stack_factory(apis=1, queue_redis_url=queue_url, demo_tokens_per_s="0")
    queue_db = aioredis.Redis.from_url(queue_url)
    try:
        async with httpx.AsyncClient(base_url=stack.url, timeout=15) as client:
            streamed = await read_sse(client, "POST", "/v1/chat/completions", json=chat_body("elsewhere", max_tokens=5))
            assert streamed.done and streamed.finish_reason == "length"
            assert streamed.text == (await generation(client, streamed.gen_id))["content"] != ""
        assert await queue_db.exists(keys.meta_key(streamed.gen_id)) == 0  # the metadata is with the events

        async def unlisted() -> bool:
            return await queue_db.zscore(keys.RUNNING, streamed.gen_id) is None

        await wait_until(unlisted, "the generation to leave the running list on the queue's database")
    finally:
        await queue_db.aclose()
