"""The generation job: run a generator for one request and publish what it yields.

arq job ``generate(gen_id)``
  ├── reads the request from the generation's metadata and marks it running (one script; on one
  │   Redis, the claim in worker/main.py has done both)
  ├── runs the generator in a task, feeding the Publisher
  ├── a keepalive task: heartbeat (for the reaper), cancel flag, idle-viewer cancel
  └── publishes the final chunk / usage / end (or an error), writes the outcome, sets expiry
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import redis.asyncio as aioredis

from fanline.shared import keys
from fanline.shared.connections import UNAVAILABLE
from fanline.shared.errors import Disowned, GenerationFailed
from fanline.shared.keys import Meta
from fanline.shared.logs import gen_id_var
from fanline.shared.requests import ChatCompletionRequest
from fanline.shared.settings import Settings
from fanline.worker import metrics
from fanline.worker.generators import GenerationContext, Generator
from fanline.worker.publisher import Publisher

log = logging.getLogger("fanline.worker")

TERMINAL = {b"completed", b"failed", b"cancelled"}

# The heartbeat is written only while the generation is still running, so a
# generation that was reaped, or lost by a Redis restart, is not brought back.
_BEAT = """
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'running' then redis.call('HSET', KEYS[1], 'heartbeat', ARGV[1]) end
return {status or false, redis.call('HGET', KEYS[1], 'cancel') or false,
        redis.call('HGET', KEYS[1], 'viewed_at') or false}
"""
# The metadata of a generation about to start, which is marked running with its first
# heartbeat unless it has already ended. Returns HGETALL's reply. The worker's claim of a
# job calls it too, when the queue and the events are on one Redis (worker/main.py).
START_FUNCTION = """
local function start(meta_key, now)
  local meta = redis.call('HGETALL', meta_key)
  local status = redis.call('HGET', meta_key, 'status')
  if #meta > 0 and status ~= 'completed' and status ~= 'failed' and status ~= 'cancelled' then
    redis.call('HSET', meta_key, 'status', 'running', 'heartbeat', now)
  end
  return meta
end
"""
# KEYS: meta. ARGV: now (s).
_START = START_FUNCTION + "return start(KEYS[1], ARGV[1])"
# How long a worker that is being stopped may take to write the error it ends a generation with.
_SHUTDOWN_WRITE_S = 5.0


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
    queue: aioredis.Redis = ctx["redis"]  # arq's pool on the queue Redis: the running set lives there
    generator: Generator = ctx["generator"]
    running: Running = ctx["running"]

    gen_id_var.set(gen_id)
    meta_key = keys.meta_key(gen_id)
    # The claim (worker/main.py) has put it on the running list; this marks it running,
    # unless the claim did that too (then ``ctx["meta"]`` is what it read).
    flat = ctx.get("meta")
    if flat is None:
        flat = await redis.register_script(_START)(keys=[meta_key], args=[int(time.time())])
    meta: dict[bytes, bytes] = dict(zip(flat[::2], flat[1::2], strict=True))
    found = meta.get(Meta.STATUS.encode(), b"")
    # The worker's job finish takes the generation off the running list with the job's own keys.
    unlist = None if ctx.get("finish_unlists") else queue
    if not meta or found in TERMINAL:
        if unlist is not None:
            await unlist.zrem(keys.RUNNING, gen_id)
        if not meta:
            log.warning("generation %s: no metadata (expired?), skipping", gen_id)
        return found.decode() if meta else "missing"

    request = ChatCompletionRequest.model_validate_json(meta[Meta.REQUEST.encode()])
    if settings.log_content:
        log.debug("generation %s prompt: %r", gen_id, request.prompt_text())
    created = int(meta.get(Meta.CREATED.encode(), b"0"))
    owner = meta.get(Meta.OWNER.encode(), b"").decode()
    publisher = Publisher(
        redis,
        gen_id,
        request.model,
        created,
        max_events=settings.stream_max_events,
        retention_s=settings.retention_s,
        batch=ctx.get("script_batch"),
    )
    gen_ctx = GenerationContext(gen_id=gen_id, settings=settings)

    log.info("generation %s started", gen_id)

    started = time.monotonic()

    async def produce() -> None:
        deltas = generator(request, gen_ctx)
        # Close the generator (and, for an upstream, its HTTP stream) as soon as we stop.
        try:
            await _consume(deltas)
        finally:
            aclose = getattr(deltas, "aclose", None)  # a plugin may return a plain async iterator
            if aclose is not None:
                await aclose()

    async def _consume(deltas: AsyncIterator[Any]) -> None:
        first = True
        async for delta in deltas:
            if first:
                metrics.FIRST_TOKEN.observe(time.monotonic() - started)
                first = False
            publisher.add(delta)
            if publisher.disowned:
                raise Disowned
            if publisher.cancel_requested:
                raise asyncio.CancelledError
            # Let the flusher run between tokens of a generator that never awaits.
            await asyncio.sleep(0)

    cancelled = meta.get(Meta.CANCEL.encode()) == b"1"
    error: tuple[str, str] | None = None
    keepalive: asyncio.Task[None] | None = None
    try:
        if not cancelled:
            task = asyncio.create_task(produce(), name=f"generate-{gen_id}")
            running.tasks[gen_id] = task
            # Until the generation has ended, not just its producer: the last writes may
            # wait for Redis (an outage, a failover), and a generation without a heartbeat
            # meanwhile would be failed as worker_lost the moment Redis is back.
            keepalive = asyncio.create_task(
                beat_until_ended(
                    redis, queue, settings, gen_id, publisher, task.cancel, task.done, settings.idle_cancel_s
                )
            )
            try:
                await task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if publisher.disowned:
                    log.warning("generation %s: no longer ours (reaped or lost by Redis); stopping", gen_id)
                    return "disowned"
                if current is not None and current.cancelling():
                    # The worker is stopping and its grace period is over: say so to the viewers.
                    await _end_on_shutdown(publisher, redis, queue, gen_id, owner)
                    raise
                cancelled = True
            except Disowned:
                log.warning("generation %s: no longer ours (reaped or lost by Redis); stopping", gen_id)
                return "disowned"
            except GenerationFailed as exc:
                error = (exc.message, exc.code)
            except Exception as exc:
                log.exception("generation %s failed", gen_id)
                error = (f"generation failed: {type(exc).__name__}", "generation_failed")
            finally:
                running.tasks.pop(gen_id, None)

        if error is not None:
            status = "failed"
            await publisher.fail(*error, usage=gen_ctx.usage)
        else:
            status = "cancelled" if cancelled else "completed"
            finish_reason = "cancelled" if cancelled else gen_ctx.finish_reason
            await publisher.finish(status, finish_reason, gen_ctx.usage, request.include_usage)
    finally:
        if keepalive is not None:
            keepalive.cancel()
            await asyncio.gather(keepalive, return_exceptions=True)
    await mark_ended(redis, unlist, gen_id, status, owner)
    metrics.GENERATION_DURATION.observe(time.monotonic() - started)
    log.info("generation %s %s after %d events", gen_id, status, publisher.seq)
    return status


async def mark_ended(
    redis: aioredis.Redis, queue: aioredis.Redis | None, gen_id: str, status: str, owner: str = ""
) -> None:
    """After the end (whose write also set the outcome and the expiry): off the reaper's list
    (unless ``queue`` is None: the caller does that), and off its API key's live generations
    (the per-key concurrency limit, api/limits.py)."""
    if queue is not None:
        await queue.zrem(keys.RUNNING, gen_id)
    if owner:
        await redis.zrem(keys.key_live_key(owner), gen_id)
    metrics.GENERATIONS.labels(status).inc()


async def _end_on_shutdown(
    publisher: Publisher, redis: aioredis.Redis, queue: aioredis.Redis, gen_id: str, owner: str
) -> None:
    message = "the worker was stopped before this generation finished"
    try:
        async with asyncio.timeout(_SHUTDOWN_WRITE_S):
            await asyncio.shield(publisher.fail(message, "worker_shutdown"))
            await mark_ended(redis, queue, gen_id, "failed", owner)
    except Exception as exc:  # the reaper will end it as worker_lost instead
        log.warning("generation %s: could not write its shutdown error: %s", gen_id, exc)


async def beat_until_ended(
    redis: aioredis.Redis,
    queue: aioredis.Redis,
    settings: Settings,
    gen_id: str,
    publisher: Publisher,
    stop: Callable[[], object],
    stopped: Callable[[], bool],
    idle_cancel_s: float = 0.0,
) -> None:
    """Heartbeat for the reaper until the generation has ended (its last writes included); the
    cancel flag and idle-viewer cancel, for a producer that is quiet.

    ``stop`` stops the producer (the worker cancels its generator's task) once the publisher's
    ``cancel_requested`` or ``disowned`` is set; ``stopped`` tells whether it already has.
    The producer library (fanline/producer.py) beats the same way for an app's generations.
    """
    meta_key = keys.meta_key(gen_id)
    beat = redis.register_script(_BEAT)
    while True:  # until the generation has ended: generate() cancels it
        await asyncio.sleep(settings.worker_heartbeat_s)
        now = time.time()
        # Two writes, independent: the worker's liveness in the running set on the queue
        # Redis (what reapers read), and the generation's own heartbeat on the events Redis.
        # On a Cluster, a failover of the generation's node must not stop the liveness: a
        # reaper that never talked to that node cannot tell the outage from a dead worker.
        # Each is bounded: during a failover redis-py's cluster client can keep a command
        # waiting for seconds, and the next liveness write must not wait for it.
        bound = settings.worker_heartbeat_s
        results: tuple[Any, ...] = await asyncio.gather(
            asyncio.wait_for(queue.zadd(keys.RUNNING, {gen_id: now}), bound),
            asyncio.wait_for(beat(keys=[meta_key], args=[int(now)]), bound),
            return_exceptions=True,
        )
        alive, beaten = results
        for result in (alive, beaten):
            if isinstance(result, (TimeoutError, *UNAVAILABLE)):
                metrics.REDIS_ERRORS.labels("heartbeat").inc()
                log.warning("generation %s: heartbeat failed: %r", gen_id, result)
            elif isinstance(result, BaseException):
                raise result
        if isinstance(beaten, BaseException):
            continue  # Redis away for a moment: beat again next time
        status, cancel, viewed_at = beaten
        if stopped():
            continue  # the producer has finished; only the last writes are left
        if status != b"running":
            publisher.disowned = True
            stop()
            return
        idle = idle_cancel_s > 0 and viewed_at is not None and now - float(viewed_at) > idle_cancel_s
        if cancel or idle:
            if idle:
                log.info("generation %s: no viewer for %.0f s, cancelling", gen_id, idle_cancel_s)
            publisher.cancel_requested = True
            stop()  # and beat on while the cancelled generation's end is written
