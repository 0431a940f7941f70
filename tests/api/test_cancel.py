"""Cancel: every viewer on every pod sees the end, the outcome is recorded, and a leaving requester cancels nothing."""

from __future__ import annotations

import asyncio

import httpx

from tests.support import Stack, chat_body, create, generation, read_sse, settled, watch_at


async def test_cancel_ends_every_viewer_on_every_pod(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.url, timeout=30) as client:
        gen_id = await create(client, prompt="cancel me", max_tokens=2000)
        streaming = [asyncio.Event() for _ in stack.api_urls]
        viewers = [
            asyncio.ensure_future(watch_at(url, gen_id, started))
            for url, started in zip(stack.api_urls, streaming, strict=True)
        ]
        await asyncio.wait_for(asyncio.gather(*(started.wait() for started in streaming)), 20)

        cancel = await client.post(f"/v1/generations/{gen_id}/cancel")
        assert cancel.status_code == 202, cancel.text
        assert cancel.json()["status"] in ("cancelling", "cancelled")

        results = await asyncio.wait_for(asyncio.gather(*viewers), 20)
        info = await settled(client, gen_id)
        again = await client.post(f"/v1/generations/{gen_id}/cancel")

    assert info["status"] == "cancelled"
    assert info["finish_reason"] == "cancelled"
    assert 0 < len(info["content"].split()) < 2000
    for received in results:
        assert received.done and received.errors == []
        assert received.chunks[-1]["choices"][0]["finish_reason"] == "cancelled"
        assert received.ids == results[0].ids
        assert received.text == info["content"]
    assert again.status_code == 202, again.text
    assert again.json()["status"] == "cancelled"


async def test_cancelling_a_completed_generation_is_409(fast_stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=fast_stack.url, timeout=30) as client:
        received = await read_sse(client, "POST", "/v1/chat/completions", json=chat_body("done", max_tokens=5))
        assert received.done
        assert (await settled(client, received.gen_id))["status"] == "completed"
        response = await client.post(f"/v1/generations/{received.gen_id}/cancel")
        info = await generation(client, received.gen_id)
    assert response.status_code == 409, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] and error["code"]
    assert info["status"] == "completed"  # the refused cancel changed nothing
    assert info["finish_reason"] == "length"


async def test_a_requester_that_disconnects_does_not_cancel(stack: Stack) -> None:
    first, second = stack.api_urls
    async with httpx.AsyncClient(base_url=first, timeout=30) as client:
        # Read a few events of our own chat request, then leave mid-stream.
        left = await read_sse(
            client, "POST", "/v1/chat/completions", json=chat_body("stay", max_tokens=300), stop_after=5
        )
    assert not left.done
    async with httpx.AsyncClient(base_url=second, timeout=30) as client:
        rest = await read_sse(
            client, "GET", f"/v1/generations/{left.gen_id}/events", headers={"Last-Event-ID": left.ids[-1]}
        )
        info = await settled(client, left.gen_id)
    assert rest.done
    assert rest.finish_reason == "length"
    assert info["status"] == "completed"
    assert info["finish_reason"] == "length"
    assert len(info["content"].split()) == 300
    assert info["usage"]["completion_tokens"] == 300
    assert left.text + rest.text == info["content"]
