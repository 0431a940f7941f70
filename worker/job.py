"""The generation job: run a generator for one request and publish what it yields.

arq job ``generate(gen_id)``
  ├── reads the request from the generation's metadata
  ├── runs the generator in a task, feeding the Publisher
  ├── a keepalive task: heartbeat, cancel flag, idle-viewer cancel
  └── publishes the final chunk / usage / end, writes the outcome, sets expiry
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import orjson
import redis.asyncio as aioredis

from shared import keys
from shared.errors import GenerationFailed
from shared.keys import Meta
from shared.requests import ChatCompletionRequest
from shared.settings import Settings
from worker.generators import GenerationContext, Generator
from worker.publisher import Publisher

log = logging.getLogger("fanline.worker")

TERMINAL = {b"completed", b"failed", b"cancelled"}


class Running:
    """The generations this worker process is running, so a cancel message can reach them."""

    def __init__(self) -> None:
        self.tasks: dict[str, asyncio.Task[Any]] = {}

    def cancel(self, gen_id: str) -> bool:
        task = self.tasks.get(gen_id)
        if task is None or task.done():
            return False
        task.cancel()
        return True


async def generate(ctx: dict[str, Any], gen_id: str) -> str:
    settings: Settings = ctx["settings"]
    redis: aioredis.Redis = ctx["events_redis"]
    generator: Generator = ctx["generator"]
    running: Running = ctx["running"]

    events_key, meta_key, content_key = keys.generation_keys(gen_id)
    meta = await redis.hgetall(meta_key)  # type: ignore[misc]
    if not meta:
        log.warning("generation %s: no metadata (expired?), skipping", gen_id)
        return "missing"
    status = meta.get(Meta.STATUS.encode(), b"")
    if status in TERMINAL:
        return str(status.decode())

    request = ChatCompletionRequest.model_validate_json(meta[Meta.REQUEST.encode()])
    created = int(meta.get(Meta.CREATED.encode(), b"0"))
    publisher = Publisher(redis, gen_id, request.model, created, max_events=settings.stream_max_events)
    gen_ctx = GenerationContext(gen_id=gen_id, settings=settings)

    await redis.hset(meta_key, mapping={Meta.STATUS: "running", Meta.HEARTBEAT: str(int(time.time()))})  # type: ignore[misc]
    cancelled = meta.get(Meta.CANCEL.encode()) == b"1"
    error: tuple[str, str] | None = None

    async def produce() -> None:
        async for delta in generator(request, gen_ctx):
            publisher.add(delta)
            if publisher.cancel_requested:
                raise asyncio.CancelledError
            # Let the flusher run between tokens of a generator that never awaits.
            await asyncio.sleep(0)

    if not cancelled:
        task = asyncio.create_task(produce(), name=f"generate-{gen_id}")
        running.tasks[gen_id] = task
        keepalive = asyncio.create_task(_keepalive(redis, settings, meta_key, task, publisher))
        try:
            await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # the job itself is being cancelled (worker shutdown), not the generation
            cancelled = True
        except GenerationFailed as exc:
            error = (exc.message, exc.code)
        except Exception as exc:
            log.exception("generation %s failed", gen_id)
            error = (f"generation failed: {type(exc).__name__}", "generation_failed")
        finally:
            running.tasks.pop(gen_id, None)
            keepalive.cancel()
            await asyncio.gather(keepalive, return_exceptions=True)

    if error is not None:
        status, finish_reason = "failed", ""
        last_id = await publisher.fail(*error)
    else:
        status = "cancelled" if cancelled else "completed"
        finish_reason = "cancelled" if cancelled else gen_ctx.finish_reason
        last_id = await publisher.finish(finish_reason, gen_ctx.usage, request.include_usage)

    outcome: dict[str, str] = {Meta.STATUS: status, Meta.LAST_EVENT_ID: last_id, Meta.FINISH_REASON: finish_reason}
    if gen_ctx.usage is not None:
        outcome[Meta.USAGE] = orjson.dumps(gen_ctx.usage).decode()
    if error is not None:
        outcome[Meta.ERROR] = orjson.dumps({"message": error[0], "code": error[1]}).decode()
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hset(meta_key, mapping=outcome)
        for key in (events_key, meta_key, content_key):
            pipe.expire(key, settings.retention_s)
        await pipe.execute()
    log.info("generation %s %s after %d events", gen_id, status, publisher.seq)
    return status


async def _keepalive(
    redis: aioredis.Redis,
    settings: Settings,
    meta_key: str,
    task: asyncio.Task[None],
    publisher: Publisher,
) -> None:
    """Heartbeat for worker-loss detection; the cancel flag and idle-viewer cancel, for a generator that is quiet."""
    while not task.done():
        await asyncio.sleep(settings.worker_heartbeat_s)
        now = int(time.time())
        async with redis.pipeline(transaction=False) as pipe:
            pipe.hset(meta_key, Meta.HEARTBEAT, str(now))
            pipe.hmget(meta_key, [Meta.CANCEL, Meta.VIEWED_AT])
            _, (cancel, viewed_at) = await pipe.execute()
        idle = settings.idle_cancel_s > 0 and viewed_at is not None and now - int(viewed_at) > settings.idle_cancel_s
        if cancel or idle:
            if idle:
                log.info("%s: no viewer for %.0f s, cancelling", meta_key, settings.idle_cancel_s)
            publisher.cancel_requested = True
            task.cancel()
            return
