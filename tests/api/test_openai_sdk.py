"""The official ``openai`` Python SDK, unchanged, against a real stack: streaming, usage, non-streaming, errors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import openai
import pytest
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionChunk

from tests.support import Stack, generation, text_of

MODEL = "fanline-test-model"


def sdk(stack: Stack) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=stack.url + "/v1", api_key="x", max_retries=0, timeout=30)


@pytest.fixture
async def api(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.url, timeout=30) as client:
        yield client


async def stream_chunks(
    client: AsyncOpenAI, max_tokens: int, include_usage: bool = False
) -> tuple[str, list[ChatCompletionChunk]]:
    """The generation id (from the response header) and every chunk the SDK parsed."""
    raw = await client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[{"role": "user", "content": "the sdk streams"}],
        stream=True,
        max_tokens=max_tokens,
        stream_options={"include_usage": include_usage},
    )
    gen_id = raw.headers["x-fanline-generation-id"]
    stream = raw.parse()
    return gen_id, [chunk async for chunk in stream]


async def test_sdk_consumes_the_stream(stack: Stack, api: httpx.AsyncClient) -> None:
    async with sdk(stack) as client:
        gen_id, chunks = await stream_chunks(client, max_tokens=25)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert {c.model for c in chunks} == {MODEL}
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert len({c.id for c in chunks}) == 1  # one completion id for the whole stream
    info = await generation(api, gen_id)
    assert text_of([c.model_dump() for c in chunks]) == info["content"]
    assert len(info["content"].split()) == 25


async def test_sdk_include_usage_ends_with_a_usage_chunk(stack: Stack, api: httpx.AsyncClient) -> None:
    async with sdk(stack) as client:
        gen_id, chunks = await stream_chunks(client, max_tokens=12, include_usage=True)
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens == 12
    assert last.usage.total_tokens == last.usage.prompt_tokens + 12
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-2].choices[0].finish_reason == "length"
    info = await generation(api, gen_id)
    assert text_of([c.model_dump() for c in chunks]) == info["content"]


async def test_sdk_non_streaming_create_returns_the_completion(stack: Stack, api: httpx.AsyncClient) -> None:
    async with sdk(stack) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "no stream"}], max_tokens=15
        )
        completion = raw.parse()
    assert completion.object == "chat.completion"
    assert completion.model == MODEL
    message = completion.choices[0].message
    assert message.role == "assistant"
    info = await generation(api, raw.headers["x-fanline-generation-id"])
    assert message.content == info["content"]
    assert len(info["content"].split()) == 15
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 15


async def test_sdk_non_streaming_finish_reason_and_usage_are_always_set(fast_stack: Stack) -> None:
    """Regression: the non-streaming answer read finish_reason and usage from the metadata,
    which the worker writes one round trip after the end event, so they were sometimes null."""
    async with sdk(fast_stack) as client:

        async def ask(n: int) -> tuple[str | None, int | None]:
            completion = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": f"race {n}"}], max_tokens=3
            )
            usage = completion.usage.completion_tokens if completion.usage else None
            return completion.choices[0].finish_reason, usage

        outcomes = await asyncio.gather(*(ask(n) for n in range(40)))
    assert outcomes == [("length", 3)] * len(outcomes)


async def test_sdk_is_not_broken_by_heartbeats(slow_heartbeat_stack: Stack) -> None:
    async with (
        sdk(slow_heartbeat_stack) as client,
        httpx.AsyncClient(base_url=slow_heartbeat_stack.url, timeout=30) as api,
    ):
        raw = await client.chat.completions.with_raw_response.create(
            model=MODEL,
            messages=[{"role": "user", "content": "slow"}],
            stream=True,
            max_tokens=4,
            stream_options={"include_usage": True},
        )
        gen_id = raw.headers["x-fanline-generation-id"]

        async def raw_lines() -> list[str]:
            # A second viewer, read raw alongside the SDK: shows pings were on the wire meanwhile.
            async with api.stream("GET", f"/v1/generations/{gen_id}/events") as response:
                return [line async for line in response.aiter_lines()]

        watcher = asyncio.ensure_future(raw_lines())
        chunks = [chunk async for chunk in raw.parse()]
        lines = await watcher
        info = await generation(api, gen_id)
    assert ": ping" in lines
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-2].choices[0].finish_reason == "length"
    assert {c.model for c in chunks} == {MODEL}
    assert text_of([c.model_dump() for c in chunks]) == info["content"]
    assert len(info["content"].split()) == 4


async def test_sdk_raises_its_typed_errors_from_our_error_bodies(stack: Stack) -> None:
    async with sdk(stack) as client:
        with pytest.raises(openai.BadRequestError) as bad:
            await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], n=2)
        with pytest.raises(openai.NotFoundError) as missing:
            await client.models.retrieve("no-such-model")
    assert bad.value.status_code == 400
    assert isinstance(bad.value.body, dict) and bad.value.body["message"]
    assert bad.value.code is not None
    assert missing.value.status_code == 404
