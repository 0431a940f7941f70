"""Redis goes away mid-generation (Guarantees 1 and 4).

Stopped and restarted with its data (appendonly): readiness is false meanwhile,
viewers that stayed connected finish with the exact text and no duplicate, and the
worker's interrupted publish is not duplicated. Restarted empty (no persistence):
viewers of the lost generation get a terminal ``generation_lost`` error, not a hang.
Either way, workers and pods outlive the outage and run new generations.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from tests.reliability import private_stack, private_valkey
from tests.support import (
    NdjsonRead,
    Received,
    Stack,
    WsRead,
    assert_strictly_increasing,
    create_at,
    read_ndjson_at,
    read_sse_at,
    read_ws,
    settled_at,
    text_of,
    wait_until,
    ws_url,
)

# How long Redis stays down: "a few seconds", longer than the workers' heartbeat interval.
OUTAGE_S = 3.0


async def wait_readiness(stack: Stack, status: int) -> None:
    """Until every pod's /readyz answers ``status``."""
    for url in stack.api_urls:

        async def answers(url: str = url) -> bool:
            async with httpx.AsyncClient(base_url=url, timeout=5) as client:
                return (await client.get("/readyz")).status_code == status

        await wait_until(answers, f"{url}/readyz to answer {status}")


async def test_redis_restarted_with_its_data_viewers_finish_exactly(tmp_path: Path) -> None:
    # 400 tokens at 40/s: about 10 s, so the generation goes on for a while after Redis is back.
    with (
        private_valkey(tmp_path / "valkey", persistent=True) as valkey,
        private_stack(valkey.url, "redis-restart", apis=2, workers=1, demo_tokens_per_s="40") as stack,
    ):
        api0, api1 = stack.api_urls
        gen_id = await create_at(api0, prompt="outage", max_tokens=400)
        sse0, sse1, ndjson, ws = Received(), Received(), NdjsonRead(), WsRead()
        viewers = [
            asyncio.create_task(read_sse_at(api0, gen_id, sse0)),
            asyncio.create_task(read_sse_at(api1, gen_id, sse1)),
            asyncio.create_task(read_ndjson_at(api1, gen_id, ndjson)),
            asyncio.create_task(read_ws(ws_url(api0, gen_id), ws)),
        ]
        await wait_until(lambda: min(len(sse0.ids), len(sse1.ids), ndjson.events, ws.events) >= 10, "10 events each")

        valkey.stop()  # SIGTERM: Valkey writes its append-only file and exits
        await wait_readiness(stack, 503)
        await asyncio.sleep(OUTAGE_S)  # the fault itself: Redis stays away for a few seconds
        assert not any(viewer.done() for viewer in viewers)  # nobody was dropped
        valkey.start()  # same port, same data directory
        await wait_readiness(stack, 200)

        await asyncio.wait_for(asyncio.gather(*viewers), 60)
        info = await settled_at(api0, gen_id)

    assert info["status"] == "completed", info
    assert len(info["content"].split()) == 400
    for sse in (sse0, sse1):
        assert sse.done and sse.errors == [], sse.errors
        assert_strictly_increasing(sse.ids)  # no duplicate, no reordering
        assert sse.text == info["content"]
    assert ndjson.done and ndjson.errors == [] and text_of(ndjson.chunks) == info["content"]
    assert ws.done and ws.close_code == 1000 and text_of(ws.chunks) == info["content"]
    assert sse0.ids == sse1.ids == ndjson.ids == ws.ids
    assert sse0.ids[-1] == info["last_event_id"]


async def test_workers_and_pods_outlive_a_redis_outage_and_run_new_generations(tmp_path: Path) -> None:
    with (
        private_valkey(tmp_path / "valkey", persistent=True) as valkey,
        private_stack(valkey.url, "redis-idle-outage", apis=1, workers=1, demo_tokens_per_s="0") as stack,
    ):
        valkey.stop()
        await wait_readiness(stack, 503)
        await asyncio.sleep(OUTAGE_S)  # the fault itself
        valkey.start()
        await wait_readiness(stack, 200)
        assert stack.workers[0].poll() is None, f"the worker exited during the outage; see {stack.log_dir}"
        gen_id = await create_at(stack.url, prompt="after the outage", max_tokens=10)
        after = await asyncio.wait_for(read_sse_at(stack.url, gen_id, Received()), 15)
        info = await settled_at(stack.url, gen_id)
    assert after.done and after.errors == [] and after.text == info["content"]
    assert len(after.text.split()) == 10


async def test_redis_restarted_empty_viewers_get_generation_lost_not_a_hang(tmp_path: Path) -> None:
    with (
        private_valkey(tmp_path / "valkey", persistent=False) as valkey,
        private_stack(valkey.url, "redis-lost", apis=1, workers=1, demo_tokens_per_s="20") as stack,
    ):
        api = stack.url
        gen_id = await create_at(api, prompt="lost", max_tokens=2000)
        sse, ndjson, ws = Received(), NdjsonRead(), WsRead()
        viewers = [
            asyncio.create_task(read_sse_at(api, gen_id, sse)),
            asyncio.create_task(read_ndjson_at(api, gen_id, ndjson)),
            asyncio.create_task(read_ws(ws_url(api, gen_id), ws)),
        ]
        await wait_until(lambda: min(len(sse.ids), ndjson.events, ws.events) >= 3, "3 events each")

        valkey.kill()  # SIGKILL, and no append-only file: everything is gone
        valkey.start()
        async with asyncio.timeout(15):
            await asyncio.gather(*viewers)

        assert sse.done and [e["code"] for e in sse.errors] == ["generation_lost"]
        assert_strictly_increasing(sse.ids)
        assert ndjson.done and [e["code"] for e in ndjson.errors] == ["generation_lost"]
        assert ws.done and ws.close_code == 1000 and [e["code"] for e in ws.errors] == ["generation_lost"]
        async with httpx.AsyncClient(base_url=api, timeout=30) as client:
            assert (await client.get(f"/v1/generations/{gen_id}")).status_code == 404

        # The pod reconnected to the empty server, and the lost generation's worker stopped
        # writing: its keys did not come back. (New generations after an outage: the test above.)
        await wait_readiness(stack, 200)
        async with httpx.AsyncClient(base_url=api, timeout=30) as client:
            assert (await client.get(f"/v1/generations/{gen_id}")).status_code == 404
