"""A worker killed or stopped mid-generation: no viewer hangs, nothing ends silently (Guarantees 4 and 5).

One private Valkey and two API pods for the module; each test starts the worker it
will kill or stop, so only one worker is alive at a time.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.reliability import private_stack, private_valkey
from tests.support import (
    NdjsonRead,
    Received,
    Stack,
    WsRead,
    assert_strictly_increasing,
    create_at,
    generation_at,
    read_ndjson_at,
    read_sse_at,
    read_ws,
    settled_at,
    spawn,
    text_of,
    wait_until,
    ws_url,
)

# Long enough that no generation here ends by itself during a test (2000 tokens at 20/s).
LONG = 2000


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with (
        private_valkey(tmp_path_factory.mktemp("worker-faults")) as valkey,
        private_stack(valkey.url, "worker-faults", apis=2, workers=0, demo_tokens_per_s="20") as stack,
    ):
        yield stack


def start_worker(stack: Stack, **env: str) -> subprocess.Popen[bytes]:
    """A worker of the stack with extra settings (lowercase names); stack.stop() stops it."""
    overrides = {f"FANLINE_{k.upper()}": v for k, v in env.items()}
    process = spawn(["worker"], {**stack.env, **overrides}, Path(stack.log_dir) / f"worker{len(stack.workers)}.log")
    stack.workers.append(process)
    return process


async def wait_exit(process: subprocess.Popen[bytes], within: float) -> int:
    await wait_until(lambda: process.poll() is not None, "the worker to exit by itself", within)
    return process.returncode


async def test_worker_sigkill_ends_every_viewer_with_worker_lost_within_15_s(stack: Stack) -> None:
    worker = start_worker(stack)
    api0, api1 = stack.api_urls
    gen_id = await create_at(api0, prompt="watched", max_tokens=LONG)
    unwatched = await create_at(api1, prompt="nobody watches this one", max_tokens=LONG)

    sse0, sse1, ndjson, ws = Received(), Received(), NdjsonRead(), WsRead()
    viewers = [
        asyncio.create_task(read_sse_at(api0, gen_id, sse0)),
        asyncio.create_task(read_sse_at(api1, gen_id, sse1)),
        asyncio.create_task(read_ndjson_at(api0, gen_id, ndjson)),
        asyncio.create_task(read_ws(ws_url(api1, gen_id), ws)),
    ]
    await wait_until(
        lambda: min(len(sse0.ids), len(sse1.ids), ndjson.events, ws.events) >= 3, "every viewer to get 3 events"
    )

    async def unwatched_running() -> bool:
        return bool((await generation_at(api1, unwatched))["status"] == "running")

    await wait_until(unwatched_running, "the unwatched generation to run")

    worker.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    # The contract's bound: every viewer has the terminal error and the end within 15 s of the death.
    async with asyncio.timeout(15):
        await asyncio.gather(*viewers)
    ended_after = time.monotonic() - killed_at

    info = await settled_at(api0, gen_id)
    assert info["status"] == "failed" and info["error"]["code"] == "worker_lost"
    for sse in (sse0, sse1):
        assert sse.done and [e["code"] for e in sse.errors] == ["worker_lost"], sse.errors
        assert_strictly_increasing(sse.ids)
        assert sse.text == info["content"]  # nothing that was published is lost
    assert ndjson.done and [e["code"] for e in ndjson.errors] == ["worker_lost"]
    assert "error" in ndjson.lines[-2]  # the error, then the end
    assert text_of(ndjson.chunks) == info["content"]
    assert ws.done and ws.close_code == 1000 and [e["code"] for e in ws.errors] == ["worker_lost"]
    assert text_of(ws.chunks) == info["content"]
    assert sse0.ids == sse1.ids == ndjson.ids == ws.ids  # the same events, on both pods, on every transport

    # Nobody watches the other generation: the reapers end it all the same.
    async with asyncio.timeout(15 - ended_after):
        lost = await settled_at(api1, unwatched)
    assert lost["status"] == "failed" and lost["error"]["code"] == "worker_lost"


async def test_worker_sigterm_past_its_grace_ends_the_generation_with_worker_shutdown(stack: Stack) -> None:
    worker = start_worker(stack, worker_grace_s="1")
    api0, api1 = stack.api_urls
    gen_id = await create_at(api0, prompt="stopped worker", max_tokens=LONG)
    sse, ws = Received(), WsRead()
    viewers = [
        asyncio.create_task(read_sse_at(api0, gen_id, sse)),
        asyncio.create_task(read_ws(ws_url(api1, gen_id), ws)),
    ]
    await wait_until(lambda: min(len(sse.ids), ws.events) >= 3, "both viewers to get 3 events")

    worker.send_signal(signal.SIGTERM)
    async with asyncio.timeout(15):
        await asyncio.gather(*viewers)
    assert await wait_exit(worker, 15) == 0

    info = await settled_at(api0, gen_id)
    assert info["status"] == "failed" and info["error"]["code"] == "worker_shutdown"
    assert sse.done and [e["code"] for e in sse.errors] == ["worker_shutdown"]
    assert sse.text == info["content"] != ""
    assert ws.done and ws.close_code == 1000 and [e["code"] for e in ws.errors] == ["worker_shutdown"]
    assert ws.ids == sse.ids


async def test_worker_sigterm_within_its_grace_finishes_the_generation_and_takes_no_new_job(stack: Stack) -> None:
    worker = start_worker(stack, worker_grace_s="30", log_level="info")
    log_path = Path(stack.log_dir) / f"worker{len(stack.workers) - 1}.log"
    api0, api1 = stack.api_urls
    gen_id = await create_at(api0, prompt="finish me", max_tokens=60)  # about 3 s at 20 tokens/s
    sse = Received()
    viewer = asyncio.create_task(read_sse_at(api1, gen_id, sse))
    await wait_until(lambda: len(sse.ids) >= 3, "the viewer to get 3 events")

    worker.send_signal(signal.SIGTERM)
    # The worker's line once its handler ran: from then on it takes no job.
    await wait_until(lambda: "SIGTERM: draining" in log_path.read_text(), "the worker to handle SIGTERM")
    later = await create_at(api0, prompt="after the signal", max_tokens=5)
    async with asyncio.timeout(15):
        await viewer
    assert await wait_exit(worker, 15) == 0

    info = await settled_at(api0, gen_id)
    assert info["status"] == "completed" and info["error"] is None
    assert sse.done and sse.errors == [] and sse.finish_reason == "length"
    assert_strictly_increasing(sse.ids)
    assert sse.text == info["content"] and len(sse.text.split()) == 60
    # The draining worker did not take the job enqueued after its signal; the next worker does.
    assert (await generation_at(api1, later))["status"] == "queued"
    start_worker(stack)
    rest = await read_sse_at(api1, later, Received())
    assert rest.done and rest.errors == [] and len(rest.text.split()) == 5


def test_a_worker_whose_redis_is_gone_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    """Regression: arq's close() deletes its health-check key first; with Redis already stopped
    (``fanline up`` on Ctrl-C, where the terminal signalled the embedded server too), it raised,
    skipped the worker's shutdown hook and printed a traceback on every stop."""
    with private_stack("redis://127.0.0.1:1/0", "worker-redis-gone", apis=0, workers=0) as stack:
        with private_valkey(tmp_path / "valkey") as valkey:
            stack.env["FANLINE_REDIS_URL"] = valkey.url
            stack.env["FANLINE_LOG_LEVEL"] = "info"
            worker = stack.start_worker()
            log_path = Path(stack.log_dir) / "worker0.log"
            deadline = time.monotonic() + 15
            while "worker ready" not in log_path.read_text():
                assert time.monotonic() < deadline and worker.poll() is None, log_path.read_text()
                time.sleep(0.05)
        # The server is stopped; now the worker.
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0
        log = log_path.read_text()
        assert "stopping without Redis" in log and "Traceback" not in log, log
