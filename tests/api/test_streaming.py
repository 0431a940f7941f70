"""SSE end to end: a generation streams, viewers join late, and resume on another pod exactly."""

from __future__ import annotations

import asyncio

import httpx

from tests.support import Received, Stack, chat_body, create, generation, read_sse


async def test_chat_stream_has_ids_role_finish_and_done(client: httpx.AsyncClient) -> None:
    received = await read_sse(client, "POST", "/v1/chat/completions", json=chat_body(max_tokens=12))
    assert received.done
    assert received.chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert received.finish_reason == "length"
    assert len(received.ids) == len(set(received.ids)) == len(received.chunks) + 1
    info = await generation(client, received.gen_id)
    assert info["status"] == "completed"
    assert received.text == info["content"] != ""


async def test_resume_on_second_pod_with_header_and_query(stack: Stack) -> None:
    async with (
        httpx.AsyncClient(base_url=stack.api_urls[0], timeout=30) as first,
        httpx.AsyncClient(base_url=stack.api_urls[1], timeout=30) as second,
    ):
        start = await read_sse(first, "POST", "/v1/chat/completions", json=chat_body(max_tokens=60), stop_after=5)
        gen_id = start.gen_id
        by_header = Received(gen_id=gen_id, ids=list(start.ids), chunks=list(start.chunks))
        await read_sse(
            second, "GET", f"/v1/generations/{gen_id}/events",
            headers={"Last-Event-ID": start.ids[-1]}, received=by_header,
        )  # fmt: skip
        by_query = Received(gen_id=gen_id, ids=list(start.ids), chunks=list(start.chunks))
        await read_sse(
            second,
            "GET",
            f"/v1/generations/{gen_id}/events",
            params={"last_event_id": start.ids[-1]},
            received=by_query,
        )
        info = await generation(second, gen_id)
    for resumed in (by_header, by_query):
        assert resumed.done
        assert len(resumed.ids) == len(set(resumed.ids))
        assert resumed.text == info["content"]


async def test_many_viewers_joining_at_different_times_get_identical_text(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.url, timeout=30) as client:
        gen_id = await create(client, max_tokens=150)

        async def viewer(n: int) -> Received:
            await asyncio.sleep(n * 0.03)  # staggered joins: some from the start, some late
            url = stack.api_urls[n % len(stack.api_urls)]
            async with httpx.AsyncClient(base_url=url, timeout=30) as c:
                return await read_sse(c, "GET", f"/v1/generations/{gen_id}/events")

        results = await asyncio.gather(*(viewer(n) for n in range(24)))
        info = await generation(client, gen_id)
    assert info["status"] == "completed"
    for received in results:
        assert received.done
        assert received.ids == results[0].ids
        assert received.text == info["content"]
