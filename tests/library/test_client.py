"""``fanline.watch``: the Python consumer that resumes by itself (issue 12), against real pods."""

from __future__ import annotations

import asyncio
import signal

import httpx
import pytest

import fanline
from tests.conftest import StackFactory
from tests.support import Received, Stack, assert_strictly_increasing, create_at, read_sse_at, settled_at, wait_until

TOKENS = 150  # 3 s at 50 tokens/s: a fault lands mid-generation


@pytest.fixture
def stack(stack_factory: StackFactory) -> Stack:
    return stack_factory(demo_tokens_per_s="50")


async def collect(
    updates: list[fanline.Update], url: str | list[str], gen_id: str, last_event_id: str | None = None
) -> None:
    async for update in fanline.watch(url, gen_id, last_event_id=last_event_id):
        updates.append(update)


async def test_watch_yields_the_whole_generation_in_order(stack: Stack) -> None:
    gen_id = await create_at(stack.url, prompt="watch me", max_tokens=20)
    updates: list[fanline.Update] = []
    await collect(updates, stack.url, gen_id)
    info = await settled_at(stack.url, gen_id)
    replay = await read_sse_at(stack.url, gen_id, Received())
    assert [u.id for u in updates] == replay.ids[:-1]  # all but the id of the end ([DONE]) event
    assert updates[0].delta.get("role") == "assistant"
    assert "".join(u.content for u in updates) == info["content"] != ""
    assert [u.finish_reason for u in updates if u.finish_reason] == ["length"]


async def test_watch_resumes_strictly_after_last_event_id(stack: Stack) -> None:
    gen_id = await create_at(stack.url, prompt="resume", max_tokens=20)
    everything: list[fanline.Update] = []
    await collect(everything, stack.url, gen_id)
    rest: list[fanline.Update] = []
    await collect(rest, stack.url, gen_id, last_event_id=everything[4].id)
    assert [u.id for u in rest] == [u.id for u in everything[5:]]


async def test_watch_goes_on_exactly_on_another_pod_when_its_pod_is_killed(stack: Stack) -> None:
    survivor = stack.url
    victim_url = stack.start_api()
    victim = stack.apis[-1]
    gen_id = await create_at(survivor, prompt="killed pod", max_tokens=TOKENS)
    updates: list[fanline.Update] = []
    watcher = asyncio.create_task(collect(updates, [victim_url, survivor], gen_id))
    await wait_until(lambda: len(updates) >= 3, "3 updates from the first pod")
    victim.send_signal(signal.SIGKILL)
    await asyncio.wait_for(watcher, 30)
    info = await settled_at(survivor, gen_id)
    replay = await read_sse_at(survivor, gen_id, Received())
    ids = [u.id for u in updates]
    assert_strictly_increasing(ids)
    assert ids == replay.ids[:-1]  # no gap, no duplicate across the kill (the last id is the end event)
    assert "".join(u.content for u in updates) == info["content"] != ""
    assert len(updates) > 3 + 1  # most of it came after the kill, from the survivor


async def test_watch_raises_clear_errors(stack: Stack) -> None:
    with pytest.raises(fanline.WatchError) as missing:
        await collect([], stack.url, "0" * 32)
    assert missing.value.status == 404
    gen_id = await create_at(stack.url, prompt="bad id", max_tokens=3)
    with pytest.raises(fanline.WatchError) as bad:
        await collect([], stack.url, gen_id, last_event_id="not-an-id")
    assert bad.value.status == 400
    with pytest.raises(fanline.WatchError, match="gave up"):
        async for _ in fanline.watch("http://127.0.0.1:9", gen_id, max_reconnects=2):
            pass
    with pytest.raises(ValueError):
        async for _ in fanline.watch([], gen_id):
            pass


async def test_watch_reports_an_error_event(stack: Stack) -> None:
    """A cancelled generation ends normally (finish_reason cancelled); an error event raises GenerationError."""
    gen_id = await create_at(stack.url, prompt="cancel me", max_tokens=TOKENS)
    updates: list[fanline.Update] = []
    watcher = asyncio.create_task(collect(updates, stack.url, gen_id))
    await wait_until(lambda: len(updates) >= 2, "2 updates")
    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as client:
        assert (await client.post(f"/v1/generations/{gen_id}/cancel")).status_code == 202
    await asyncio.wait_for(watcher, 30)
    assert updates[-1].finish_reason == "cancelled"
    with pytest.raises(fanline.GenerationError) as failed:
        fanline.client.parse_event("9-0", '{"error": {"message": "gone", "code": "worker_lost"}}')
    assert failed.value.code == "worker_lost"
