"""An API pod killed or drained with viewers attached: they resume on another pod, exactly (Guarantees 1 and 5).

One private Valkey, one worker and one surviving pod for the module; each test
starts the pod it kills or drains.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.reliability import RawSse, private_stack, private_valkey, read_raw_sse
from tests.support import (
    NdjsonRead,
    Received,
    Stack,
    WsRead,
    assert_strictly_increasing,
    chat_body,
    create_at,
    finish_reason_of,
    read_ndjson_at,
    read_sse_at,
    read_ws,
    settled_at,
    text_of,
    wait_until,
    ws_url,
)

TOKENS = 150  # 3 s at 50 tokens/s: the fault always lands mid-generation


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with (
        private_valkey(tmp_path_factory.mktemp("api-faults")) as valkey,
        private_stack(valkey.url, "api-faults", apis=1, workers=1, demo_tokens_per_s="50") as stack,
    ):
        yield stack


async def full_replay(base_url: str, gen_id: str) -> Received:
    return await read_sse_at(base_url, gen_id, Received())


def assert_exact(ids: list[str], chunks: list[dict[str, Any]], replay: Received, content: str) -> None:
    """What a viewer got over its reads is the whole generation: no gap, no duplicate, the text exact."""
    assert_strictly_increasing(ids)
    assert ids == replay.ids
    assert text_of(chunks) == content != ""
    assert finish_reason_of(chunks) == "length"


async def test_pod_sigkill_viewers_resume_on_another_pod_with_exactly_the_rest(stack: Stack) -> None:
    survivor = stack.api_urls[0]
    victim_url = stack.start_api()
    victim = stack.apis[-1]
    gen_id = await create_at(survivor, prompt="killed pod", max_tokens=TOKENS)

    sse, ndjson, ws = Received(), NdjsonRead(), WsRead()
    viewers = [
        asyncio.create_task(read_sse_at(victim_url, gen_id, sse)),
        asyncio.create_task(read_ndjson_at(victim_url, gen_id, ndjson)),
        asyncio.create_task(read_ws(ws_url(victim_url, gen_id), ws)),
    ]
    await wait_until(lambda: min(len(sse.ids), ndjson.events, ws.events) >= 3, "every viewer to get 3 events")

    victim.send_signal(signal.SIGKILL)
    outcomes = await asyncio.wait_for(asyncio.gather(*viewers, return_exceptions=True), 15)
    assert isinstance(outcomes[0], httpx.TransportError), outcomes[0]  # the connection broke
    assert isinstance(outcomes[1], httpx.TransportError), outcomes[1]
    assert ws.close_code == 1006  # no close frame: the pod is gone
    assert not (sse.done or ndjson.done or ws.done)

    # Each viewer resumes on the surviving pod after the last id it got.
    sse_rest = await read_sse_at(survivor, gen_id, Received(), last_event_id=sse.ids[-1])
    ndjson_rest = await read_ndjson_at(survivor, gen_id, NdjsonRead(), last_event_id=ndjson.ids[-1])
    ws_rest = await read_ws(ws_url(survivor, gen_id, last_event_id=ws.ids[-1]), WsRead())
    assert sse_rest.done and ndjson_rest.done and ws_rest.done and ws_rest.close_code == 1000

    info = await settled_at(survivor, gen_id)
    replay = await full_replay(survivor, gen_id)
    assert_exact(sse.ids + sse_rest.ids, sse.chunks + sse_rest.chunks, replay, info["content"])
    assert_exact(ndjson.ids + ndjson_rest.ids, ndjson.chunks + ndjson_rest.chunks, replay, info["content"])
    assert_exact(ws.ids + ws_rest.ids, ws.chunks + ws_rest.chunks, replay, info["content"])


async def test_pod_sigterm_hints_every_stream_to_reconnect_and_exits_and_resume_is_exact(stack: Stack) -> None:
    survivor = stack.api_urls[0]
    victim_url = stack.start_api()
    victim = stack.apis[-1]
    gen_id = await create_at(survivor, prompt="drained pod", max_tokens=TOKENS)

    sse, ndjson, ws = RawSse(), NdjsonRead(), WsRead()
    viewers = [
        asyncio.create_task(read_raw_sse(victim_url, gen_id, sse)),
        asyncio.create_task(read_ndjson_at(victim_url, gen_id, ndjson)),
        asyncio.create_task(read_ws(ws_url(victim_url, gen_id), ws)),
    ]
    await wait_until(lambda: min(sse.events, ndjson.events, ws.events) >= 3, "every viewer to get 3 events")

    victim.send_signal(signal.SIGTERM)
    # Readiness turns false (or the pod is already gone) ...
    async with httpx.AsyncClient(base_url=victim_url, timeout=5) as client:

        async def not_ready() -> bool:
            try:
                status = (await client.get("/readyz")).status_code
            except httpx.TransportError:
                return True
            assert status in (200, 503), status  # 200: the signal is not handled yet
            return status == 503

        await wait_until(not_ready, "the drained pod's readiness to turn false")
    # ... every stream gets its reconnect hint and is closed (not broken) ...
    await asyncio.wait_for(asyncio.gather(*viewers), 15)
    assert not sse.done and sse.lines[-2:] == ["retry: 250", ": reconnect and resume"], sse.lines[-4:]
    assert not ndjson.done and ndjson.lines[-1] == {"id": ndjson.ids[-1], "reconnect": True}
    assert ws.close_code == 1012 and not ws.done
    # ... and the process exits by itself, cleanly.
    await wait_until(lambda: victim.poll() is not None, "the drained pod to exit", 15)
    assert victim.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it handled, once drained

    sse_rest = await read_sse_at(survivor, gen_id, Received(), last_event_id=sse.ids[-1])
    ndjson_rest = await read_ndjson_at(survivor, gen_id, NdjsonRead(), last_event_id=ndjson.ids[-1])
    ws_rest = await read_ws(ws_url(survivor, gen_id, last_event_id=ws.ids[-1]), WsRead())
    assert sse_rest.done and ndjson_rest.done and ws_rest.done

    info = await settled_at(survivor, gen_id)
    replay = await full_replay(survivor, gen_id)
    assert_exact(sse.ids + sse_rest.ids, sse.chunks + sse_rest.chunks, replay, info["content"])
    assert_exact(ndjson.ids + ndjson_rest.ids, ndjson.chunks + ndjson_rest.chunks, replay, info["content"])
    assert_exact(ws.ids + ws_rest.ids, ws.chunks + ws_rest.chunks, replay, info["content"])


async def test_draining_pod_refuses_new_requests_and_never_answers_a_waiting_completion_with_a_500(
    stack: Stack,
) -> None:
    """New requests to a draining pod get 503 ``draining`` (or find it gone); a non-streaming
    completion it was waiting on gets the completion or a retryable 503, never a 500."""
    victim_url = stack.start_api()
    victim = stack.apis[-1]
    async with httpx.AsyncClient(base_url=victim_url, timeout=30) as client:
        waiting = asyncio.create_task(
            client.post("/v1/chat/completions", json=chat_body("in flight", stream=False, max_tokens=TOKENS))
        )

        async def accepted() -> bool:
            return "fanline_generations_started_total 1.0" in (await client.get("/metrics")).text

        await wait_until(accepted, "the victim to accept the completion request")
        victim.send_signal(signal.SIGTERM)
        async with httpx.AsyncClient(base_url=victim_url, timeout=5) as fresh:
            draining = False
            while victim.poll() is None:
                try:
                    response = await fresh.get("/v1/generations/" + "0" * 32)
                except httpx.TransportError:
                    break  # the pod stopped accepting
                if not (response.status_code == 404 and not draining):  # 404: the signal is not handled yet
                    assert response.status_code == 503, response.text
                    assert response.json()["error"]["code"] == "draining"
                    draining = True
                await asyncio.sleep(0.01)
        answer = await asyncio.wait_for(waiting, 15)
    assert answer.status_code in (200, 503), answer.text
    error = answer.json().get("error")
    assert answer.status_code == 200 or (error["type"] and error["code"])
