"""Per-API-key limits (issue 3, "Access control"): concurrent generations and request rate, 429 with Retry-After.

Each test runs a Valkey and a stack of its own (two API pods, so the limits are seen
to hold across pods: their state is in Redis, not in a pod) and reads that Valkey
to check what a refused request left behind: nothing. Two API keys: alpha is the
one limited, beta shows that another key is unaffected.
"""

from __future__ import annotations

import signal
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import redis.asyncio as aioredis

from fanline.api.auth import Auth
from fanline.shared import keys
from tests.reliability import private_stack, private_valkey
from tests.support import Stack, assert_error, chat_body, create, wait_until

KEY_A = f"fk-alpha-{uuid.uuid4().hex}"
KEY_B = f"fk-beta-{uuid.uuid4().hex}"
# Long enough that no generation here ends by itself during a test (2000 tokens at 20/s).
LONG = 2000


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@asynccontextmanager
async def clients(stack: Stack, key: str | None) -> AsyncIterator[list[httpx.AsyncClient]]:
    """A client for each API pod, sending ``key`` (none: no credentials)."""
    headers = bearer(key) if key else {}
    pods = [httpx.AsyncClient(base_url=url, headers=headers, timeout=30) for url in stack.api_urls]
    try:
        yield pods
    finally:
        for pod in pods:
            await pod.aclose()


def creations(max_tokens: int) -> list[tuple[str, dict[str, Any]]]:
    """One request of each endpoint that starts a generation: (path, body)."""
    ai_sdk = {
        "id": f"chat-{uuid.uuid4().hex[:8]}",
        "messages": [{"role": "user", "parts": [{"type": "text", "text": "hi"}]}],
    }
    return [
        ("/v1/generations", chat_body(stream=False, max_tokens=max_tokens)),
        ("/v1/chat/completions", chat_body(stream=True, max_tokens=max_tokens)),
        ("/v1/ai-sdk/chat", {**ai_sdk, "max_tokens": max_tokens}),
    ]


async def start(client: httpx.AsyncClient, max_tokens: int = LONG) -> str:
    """A generation started with ``POST /v1/generations``; its id."""
    return await create(client, max_tokens=max_tokens)


def assert_limited(response: httpx.Response, code: str) -> int:
    """A 429 in the OpenAI error body, type ``rate_limit_error``, with a Retry-After in seconds; returns it."""
    error = assert_error(response, 429, code)
    assert error["type"] == "rate_limit_error", error
    assert "x-fanline-generation-id" not in response.headers
    retry_after = response.headers["retry-after"]
    assert retry_after.isdigit() and int(retry_after) >= 1, retry_after
    return int(retry_after)


async def generation_count(redis: aioredis.Redis) -> int:
    """Generations in Redis: their metadata hashes."""
    return len([key async for key in redis.scan_iter(match=f"{keys.PREFIX}:*:meta", count=1000)])


async def live(redis: aioredis.Redis, key: str) -> set[str]:
    """The generation ids the limiter holds against ``key``'s concurrency limit."""
    return {member.decode() for member in await redis.zrange(keys.key_live_key(Auth.owner_of(key)), 0, -1)}


async def status(client: httpx.AsyncClient, gen_id: str) -> str:
    response = await client.get(f"/v1/generations/{gen_id}")
    assert response.status_code == 200, response.text
    result: str = response.json()["status"]
    return result


async def test_a_key_at_its_concurrency_limit_gets_429_until_one_of_its_generations_ends(tmp_path: Path) -> None:
    with (
        private_valkey(tmp_path) as valkey,
        private_stack(
            valkey.url,
            "limits-concurrency",
            apis=2,
            api_keys=f"{KEY_A},{KEY_B}",
            key_max_concurrent="2",
            demo_tokens_per_s="20",
            # A killed worker's generations are failed by the reapers within ~1 s.
            worker_heartbeat_s="0.2",
            worker_lost_after_s="1",
            reap_interval_s="0.2",
            worker_grace_s="0",
        ) as stack,
    ):
        redis = aioredis.Redis.from_url(valkey.url)
        async with clients(stack, KEY_A) as (a0, a1), clients(stack, KEY_B) as (b0, b1):
            first, second = await start(a0), await start(a1)
            assert await live(redis, KEY_A) == {first, second}
            existing = await generation_count(redis)

            # A third generation of alpha, by any endpoint on either pod: refused, and nothing is created.
            for n, (path, body) in enumerate(creations(LONG)):
                response = await (a0, a1)[n % 2].post(path, json=body)
                assert_limited(response, "concurrency_limit_exceeded")
            assert await generation_count(redis) == existing
            assert await live(redis, KEY_A) == {first, second}

            # Beta is not alpha: it may have two of its own.
            others = [await start(b0), await start(b1)]

            # One of alpha's ends (cancelled): the worker takes it off alpha's live set, alpha may start one more.
            response = await a1.post(f"/v1/generations/{first}/cancel")
            assert response.status_code == 202, response.text

            async def first_released() -> bool:
                return first not in await live(redis, KEY_A)

            await wait_until(first_released, "the worker to release the cancelled generation's slot")
            assert await status(a0, first) == "cancelled"
            third = await start(a0)
            assert_limited(await a1.post("/v1/generations", json=chat_body(stream=False)), "concurrency_limit_exceeded")

            # A worker killed mid-generation never releases its slots; the reapers fail its generations,
            # and the next request of the key finds them ended and frees their slots.
            async def running() -> bool:
                return {await status(a0, gen_id) for gen_id in (second, third, *others)} == {"running"}

            await wait_until(running, "the worker to run every generation")  # a reaper fails only running ones
            stack.workers[0].send_signal(signal.SIGKILL)
            stack.workers[0].wait()

            async def reaped() -> bool:
                return {await status(a0, gen_id) for gen_id in (second, third, *others)} == {"failed"}

            await wait_until(reaped, "the reapers to fail the killed worker's generations")
            assert await live(redis, KEY_A) == {second, third}
            stack.start_worker()
            fourth = await start(a1)
            assert await live(redis, KEY_A) == {fourth}
        await redis.aclose()


async def test_a_key_over_its_rate_gets_429_with_retry_after(tmp_path: Path) -> None:
    rate = 4
    with (
        private_valkey(tmp_path) as valkey,
        private_stack(
            valkey.url,
            "limits-rate",
            apis=2,
            api_keys=f"{KEY_A},{KEY_B}",
            key_rate_per_min=str(rate),
            demo_tokens_per_s="0",
        ) as stack,
    ):
        redis = aioredis.Redis.from_url(valkey.url)
        async with clients(stack, KEY_A) as (a0, a1), clients(stack, KEY_B) as (b0, b1):
            # Alpha's first `rate` requests, by every endpoint, alternating pods: accepted.
            for n, (path, body) in enumerate(creations(3) + creations(3)[:1]):
                response = await (a0, a1)[n % 2].post(path, json=body)
                assert response.status_code in (200, 201), response.text
                await response.aread()
            existing = await generation_count(redis)
            assert existing == rate

            # The next ones, on either pod, by any endpoint: 429 within the minute, and nothing is created.
            for n, (path, body) in enumerate(creations(3)):
                response = await (a1, a0)[n % 2].post(path, json=body)
                retry_after = assert_limited(response, "rate_limit_exceeded")
                assert retry_after <= keys.RATE_WINDOW_S
            assert await generation_count(redis) == existing

            # Beta has a rate of its own.
            for n in range(rate):
                await start((b0, b1)[n % 2], max_tokens=3)
            assert_limited(await b0.post("/v1/generations", json=chat_body(stream=False)), "rate_limit_exceeded")
        await redis.aclose()


async def test_limits_do_not_apply_with_auth_off(tmp_path: Path) -> None:
    with (
        private_valkey(tmp_path) as valkey,
        private_stack(
            valkey.url,
            "limits-auth-off",
            apis=2,
            key_max_concurrent="1",
            key_rate_per_min="1",
            demo_tokens_per_s="20",
            worker_grace_s="0",
        ) as stack,
    ):
        redis = aioredis.Redis.from_url(valkey.url)
        async with clients(stack, None) as (p0, p1):
            # Three at once, past both limits, by every endpoint: all accepted.
            started = []
            for n, (path, body) in enumerate(creations(LONG)):
                async with (p0, p1)[n % 2].stream("POST", path, json=body) as response:
                    assert response.status_code in (200, 201), await response.aread()
                    started.append(response.headers["x-fanline-generation-id"])
            assert len(set(started)) == 3
            assert {await status(p0, gen_id) for gen_id in started} <= {"queued", "running"}
            assert [key async for key in redis.scan_iter(match=f"{keys.PREFIX}:{{key:*")] == []
            for gen_id in started:
                assert (await p1.post(f"/v1/generations/{gen_id}/cancel")).status_code == 202
        await redis.aclose()
