"""``fanline worker``: an arq worker that runs generation jobs.

Prompt job start: arq polls its queue every ``poll_delay`` (0.5 s by default), which
would add up to half a second before the first token. The API publishes on
``fanline:wake`` after enqueueing; every worker listens on that channel and runs
arq's poll at once, so a job starts within a few milliseconds. The normal poll
stays as the fallback (a missed message costs at most one poll delay). Starting
the same job twice is impossible: arq guards each job with a WATCH/MULTI on its
in-progress key.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import redis.asyncio as aioredis
from arq.connections import RedisSettings
from arq.worker import Worker, func
from prometheus_client import start_http_server
from redis.exceptions import RedisError

from shared import keys
from shared.connections import events_redis, queue_redis
from shared.reaper import Reaper
from shared.settings import Settings
from worker.generators import load_generator
from worker.job import Running, generate

log = logging.getLogger("fanline.worker")


class _Listener:
    """Wake and cancel messages from the API, on one pub/sub connection per worker."""

    def __init__(self, worker: Worker, redis: aioredis.Redis, running: Running) -> None:
        self._worker = worker
        self.redis = redis
        self._running = running
        self._poll_lock = asyncio.Lock()
        self._poll_again = False
        self._poll_task: asyncio.Task[None] | None = None
        self.task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        backoff = 0.1
        while True:
            try:
                async with self.redis.pubsub() as pubsub:
                    await pubsub.subscribe(keys.WAKE_CHANNEL, keys.CANCEL_CHANNEL)
                    backoff = 0.1
                    async for message in pubsub.listen():
                        if message["type"] != "message":
                            continue
                        if message["channel"] == keys.CANCEL_CHANNEL.encode():
                            gen_id = message["data"].decode()
                            if self._running.cancel(gen_id):
                                log.info("generation %s: cancel requested", gen_id)
                        else:
                            self._wake()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis down: arq's own polling still runs
                log.warning("wake listener: %s; retrying in %.1f s", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    def _wake(self) -> None:
        if self._poll_lock.locked():
            self._poll_again = True  # one more poll after the current one covers this wake
            return
        self._poll_task = asyncio.create_task(self._poll())

    async def _poll(self) -> None:
        async with self._poll_lock:
            while True:
                self._poll_again = False
                try:
                    await self._worker._poll_iteration()  # arq's own "look at the queue, start jobs"
                except Exception as exc:
                    log.warning("wake poll failed: %s", exc)
                if not self._poll_again:
                    return


class _Worker(Worker):
    _poll_backoff = 0.1

    async def _poll_iteration(self) -> None:
        # arq lets a Redis error out of its poll, which ends the worker; an outage of
        # a few seconds should only pause it.
        try:
            await super()._poll_iteration()
            self._poll_backoff = 0.1
        except (RedisError, OSError) as exc:
            log.warning("polling the queue: %s; retrying in %.1f s", exc, self._poll_backoff)
            await asyncio.sleep(self._poll_backoff)
            self._poll_backoff = min(self._poll_backoff * 2, 5.0)

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        # arq claims the jobs it found one after another (a WATCH/MULTI of ~4 round
        # trips each), so the 20th of 20 concurrent requests waited for 19 claims.
        # Claiming each in its own task is the same code, run side by side.
        await asyncio.gather(*(super(_Worker, self).start_jobs([job_id]) for job_id in job_ids))

    async def _sleep_until_tasks_complete(self) -> None:
        # arq waits until its task table is empty, but finished jobs leave it only at
        # the next poll: an idle worker would wait a whole poll delay on SIGTERM.
        while any(not t.done() for t in self.tasks.values()):  # noqa: ASYNC110 (arq's own loop, made exact)
            await asyncio.sleep(0.1)


def build_worker(settings: Settings) -> Worker:
    generator = load_generator(settings.generator)  # a bad name fails here, with its reason
    running = Running()
    state: dict[str, Any] = {}

    async def startup(ctx: dict[str, Any]) -> None:
        ctx["settings"] = settings
        ctx["events_redis"] = events_redis(settings)
        ctx["generator"] = generator
        ctx["running"] = running
        listener = _Listener(worker, queue_redis(settings, pubsub=True), running)
        listener.task = asyncio.create_task(listener.run(), name="wake-listener")
        state["listener"] = listener
        reaper = Reaper(ctx["events_redis"], settings)
        reaper.start()
        state["reaper"] = reaper
        if settings.worker_metrics_port:
            start_http_server(settings.worker_metrics_port)
        log.info("worker ready: generator=%s max_jobs=%d", settings.generator, settings.worker_max_jobs)

    async def shutdown(ctx: dict[str, Any]) -> None:
        if "reaper" in state:
            await state["reaper"].stop()
        listener: _Listener | None = state.get("listener")
        if listener is not None and listener.task is not None:
            listener.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener.task
            await listener.redis.aclose()
        if "events_redis" in ctx:
            await ctx["events_redis"].aclose()

    worker = _Worker(
        functions=[func(generate, name=keys.GENERATE_JOB, max_tries=1)],
        redis_settings=RedisSettings.from_dsn(settings.queue_url),
        queue_name=settings.queue_name,
        on_startup=startup,
        on_shutdown=shutdown,
        max_jobs=settings.worker_max_jobs,
        poll_delay=settings.worker_poll_delay_s,
        job_timeout=24 * 3600,
        keep_result=0,
        handle_signals=True,
        health_check_interval=60,
        # SIGTERM: take no new jobs, let running generations finish for this long,
        # then cancel them (each ends with a "worker_shutdown" error; see job.py).
        job_completion_wait=int(settings.worker_grace_s),
    )
    return worker


def run(settings: Settings) -> None:
    try:
        worker = build_worker(settings)
    except (ValueError, ImportError, AttributeError) as exc:
        raise SystemExit(f"fanline worker: FANLINE_GENERATOR={settings.generator!r}: {exc}") from None
    worker.run()
