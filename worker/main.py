"""``fanline worker``: an arq worker that runs generation jobs.

Prompt job start: arq polls its queue every ``poll_delay`` (0.5 s by default), which
would add up to half a second before the first token. The API publishes on
``fanline:wake`` after enqueueing; every worker listens on that channel and runs
arq's poll at once, so a job starts within a few milliseconds. The normal poll
stays as the fallback (a missed message costs at most one poll delay). Starting
the same job twice is impossible: a claim sets the job's in-progress key only if
it is not set, in one script (_CLAIM), as arq's WATCH/MULTI does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from signal import Signals
from typing import Any

import redis.asyncio as aioredis
import uvloop
from arq.connections import RedisSettings
from arq.constants import in_progress_key_prefix
from arq.utils import timestamp_ms
from arq.worker import Worker, func
from prometheus_client import start_http_server
from redis.exceptions import RedisError

from fanline.shared import keys
from fanline.shared.connections import UNAVAILABLE, events_redis, queue_redis
from fanline.shared.reaper import Reaper
from fanline.shared.settings import Settings
from fanline.worker.generators import load_generator
from fanline.worker.job import Running, generate

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


# arq's claim of one job (Worker.start_jobs), as one script: not already in progress, still
# queued and due, then marked in progress. Returns the job's score, or nil.
_CLAIM = """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local score = redis.call('ZSCORE', KEYS[2], ARGV[1])
if not score or tonumber(score) > tonumber(ARGV[2]) then return false end
redis.call('PSETEX', KEYS[1], ARGV[3], '1')
return tonumber(score)
"""


class _Worker(Worker):
    _poll_backoff = 0.1

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._claim_script: Any = None

    @property
    def _claim(self) -> Any:
        if self._claim_script is None:  # arq connects its pool in main(), after __init__
            self._claim_script = self.pool.register_script(_CLAIM)
        return self._claim_script

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
        # arq claims the jobs it found one after another, each with WATCH, EXISTS, ZSCORE and
        # MULTI/EXEC (four round trips), so the 20th of 20 concurrent requests waited for 19
        # claims. Here each claim is one script call (_CLAIM, the same checks, atomically),
        # and the claims run side by side; the bookkeeping is arq's own.
        await asyncio.gather(*(self._start_job(job_id.decode()) for job_id in job_ids))

    async def _start_job(self, job_id: str) -> None:
        await self.sem.acquire()
        if self.job_counter >= self.max_jobs:
            self.sem.release()
            return
        self.job_counter += 1
        in_progress_ms = int(self.in_progress_timeout_s * 1000)
        keys_ = [in_progress_key_prefix + job_id, self.queue_name]
        try:
            score = await self._claim(keys=keys_, args=[job_id, timestamp_ms(), in_progress_ms])
        except BaseException:
            self._release_sem_dec_counter_on_complete()
            raise
        if score is None:  # started elsewhere, finished, or deferred
            self._release_sem_dec_counter_on_complete()
            return
        task = self.loop.create_task(self.run_job(job_id, int(score)))
        task.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
        self.tasks[job_id] = task

    def handle_sig_wait_for_completion(self, signum: Signals) -> None:
        # arq's own lines are at debug level (shared/logs.py); this one an operator wants.
        log.info(
            "%s: draining: no new jobs; %d generation(s) have up to %d s to finish",
            Signals(signum).name,
            sum(not t.done() for t in self.tasks.values()),
            self._job_completion_wait,
        )
        super().handle_sig_wait_for_completion(signum)

    async def close(self) -> None:
        # arq deletes its health-check key first; with Redis already gone (stopped before
        # the worker, or unreachable) that raised, skipping our shutdown hook and printing a
        # traceback on every stop. Stop cleanly without it.
        try:
            await super().close()
        except UNAVAILABLE as exc:
            log.warning("stopping without Redis: %s", exc)
            if self.on_shutdown:
                await self.on_shutdown(self.ctx)
            with contextlib.suppress(*UNAVAILABLE):
                await self.pool.close(close_connection_pool=True)
            self._pool = None

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
        reaper = Reaper(ctx["events_redis"], ctx["redis"], settings)
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
    # arq makes its own loop; uvloop's (as under uvicorn) cuts the CPU of each Redis round trip.
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    try:
        worker = build_worker(settings)
    except (ValueError, ImportError, AttributeError) as exc:
        raise SystemExit(f"fanline worker: FANLINE_GENERATOR={settings.generator!r}: {exc}") from None
    worker.run()
