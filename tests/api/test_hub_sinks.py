"""The hub's direct writes (api/hub.py ``Sink``): caught-up SSE and NDJSON viewers are written to
straight from the hub, byte for byte what their own task would write, and with many viewers the
writes are coalesced (``FANLINE_HUB_WRITES_PER_S``) without losing or reordering anything."""

from __future__ import annotations

import asyncio

import httpx

from tests.conftest import StackFactory
from tests.support import (
    NdjsonRead,
    create,
    generation,
    parse_sse,
    read_ndjson,
    wait_until,
)


async def direct_writes(client: httpx.AsyncClient) -> float:
    text = (await client.get("/metrics")).text
    name = "fanline_hub_direct_writes_total "
    return float(next(line.split()[1] for line in text.splitlines() if line.startswith(name)))


async def raw_sse(client: httpx.AsyncClient, gen_id: str, started: asyncio.Event | None = None) -> bytes:
    """The whole SSE body (chunked encoding undone by httpx), as bytes."""
    body = bytearray()
    async with client.stream("GET", f"/v1/generations/{gen_id}/events") as response:
        assert response.status_code == 200
        async for part in response.aiter_raw():
            body += part
            if started is not None:
                started.set()
    return bytes(body)


async def test_caught_up_viewers_get_direct_writes_with_exactly_the_bytes_a_replay_gets(
    stack_factory: StackFactory,
) -> None:
    stack = stack_factory(apis=1, demo_tokens_per_s="100")
    async with httpx.AsyncClient(base_url=stack.url, timeout=60) as client:
        before = await direct_writes(client)
        gen_id = await create(client, max_tokens=150)
        started = asyncio.Event()
        sse = [asyncio.create_task(raw_sse(client, gen_id, started)) for _ in range(20)]
        ndjson = [asyncio.create_task(read_ndjson(client, gen_id)) for _ in range(10)]
        await started.wait()
        live = await asyncio.gather(*sse)
        lines: list[NdjsonRead] = await asyncio.gather(*ndjson)
        info = await generation(client, gen_id)
        replay = await raw_sse(client, gen_id)  # finished: written by its own task from the ring
        after = await direct_writes(client)

    assert info["status"] == "completed"
    # Caught-up viewers were written to by the hub (30 viewers of ~150 events: thousands of writes,
    # where a broken sink path writes none).
    assert after - before > 1000, f"only {after - before:.0f} direct writes"
    frames = parse_sse(replay)
    assert frames[-1][1] == b"[DONE]"
    assert [event_id for event_id, _ in frames] == [f"{n}-0" for n in range(1, len(frames) + 1)]
    for body in live:
        # The same frames in the same order as the replay; only heartbeats may differ.
        assert body.replace(b": ping\n", b"") == replay.replace(b": ping\n", b"")
    for read in lines:
        assert read.done
        assert read.ids == [event_id for event_id, _ in frames]
        assert (
            "".join(c["choices"][0]["delta"].get("content") or "" for c in read.chunks if c["choices"])
            == (info["content"])
        )


async def test_many_viewers_get_coalesced_writes_and_still_every_event_in_order(stack_factory: StackFactory) -> None:
    # 20 sinks at 50 writes a second: a pass every 0.4 s, each carrying every event since the last.
    stack = stack_factory(apis=1, demo_tokens_per_s="100", hub_writes_per_s="50")
    async with httpx.AsyncClient(base_url=stack.url, timeout=60) as client:
        before = await direct_writes(client)
        gen_id = await create(client, max_tokens=200)
        reads = [NdjsonRead() for _ in range(20)]
        tasks = [asyncio.create_task(read_ndjson(client, gen_id, into)) for into in reads]
        await wait_until(lambda: all(r.lines for r in reads), "every viewer's first event")
        await asyncio.gather(*tasks)
        info = await generation(client, gen_id)
        written = await direct_writes(client) - before

    assert info["status"] == "completed"
    events = len(reads[0].ids)
    assert events > 100
    for read in reads:
        assert read.done
        assert read.ids == reads[0].ids
        assert [int(i.split("-")[0]) for i in read.ids] == list(range(1, events + 1))
    # Without coalescing each viewer would get one write per event (20 × ~200); with it, about one
    # per 0.4 s pass (20 × ~5), plus the writes of the viewers' own tasks.
    assert 0 < written < 20 * events / 4, f"{written:.0f} direct writes for {20 * events} deliveries"
