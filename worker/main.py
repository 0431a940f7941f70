"""``fanline worker``: an arq worker that runs generation jobs.

Prompt job start: arq polls its queue every ``poll_delay`` (0.5 s by default), which
would add up to half a second before the first token. The API publishes on
``fanline:wake`` after enqueueing, naming the queue and the new jobs; every worker
listens on that channel and claims those jobs at once, so a job starts within a few
milliseconds. The normal poll stays as the fallback (a missed message costs at most
one poll delay). Starting the same job twice is impossible: a claim sets the job's
in-progress key only if it is not set, in one script (_CLAIM), as arq's WATCH/MULTI
does; one call claims up to _CLAIM_AT_ONCE of the jobs found together.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from signal import Signals
from typing import Any

import redis.asyncio as aioredis
import uvloop
from arq.connections import RedisSettings
from arq.constants import abort_jobs_ss, in_progress_key_prefix, job_key_prefix, retry_key_prefix
from arq.utils import timestamp_ms
from arq.worker import Worker, func
from prometheus_client import start_http_server
from redis.exceptions import RedisError

from fanline.shared import keys
from fanline.shared.connections import UNAVAILABLE, events_redis, queue_redis
from fanline.shared.reaper import Reaper
from fanline.shared.settings import Settings
from fanline.worker.generators import load_generator
from fanline.worker.job import START_FUNCTION, Running, generate
from fanline.worker.publisher import ScriptBatch

log = logging.getLogger("fanline.worker")


class _Listener:
    """Wake and cancel messages from the API, on one pub/sub connection per worker."""

    def __init__(self, worker: _Worker, redis: aioredis.Redis, running: Running) -> None:
        self._worker = worker
        self.redis = redis
        self._running = running
        self._poll_lock = asyncio.Lock()
        self._poll_again = False
        self._poll_task: asyncio.Task[None] | None = None
        self._starts: set[asyncio.Task[None]] = set()  # claims of woken jobs, short-lived
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
                            self._wake(message["data"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis down: arq's own polling still runs
                log.warning("wake listener: %s; retrying in %.1f s", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    def _wake(self, data: bytes) -> None:
        queue_name, _, job_ids = data.decode().partition(" ")
        if job_ids:  # the API names the queue and its new jobs (api/generations.py ``enqueue``)
            if queue_name == self._worker.queue_name:
                task = asyncio.create_task(self._worker.start_woken(job_ids.split()))
                self._starts.add(task)
                task.add_done_callback(self._starts.discard)
            return
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


# arq's claim of a job (Worker.start_jobs) and its count of tries (Worker.run_job), for several
# jobs in one script: not already in progress, still queued and due, then marked in progress,
# and on the reapers' running list (shared/reaper.py) from this moment: a job id is its
# generation id. A job is tried once (arq's max_tries=1): one tried before, by a worker that
# is gone, leaves the queue instead, and the reaper ends its generation. With the queue and
# the events on one Redis, the same call also marks each claimed generation running and reads
# its metadata (worker/job.py START_FUNCTION), which saves each job a round trip before its
# first token. KEYS: the queue, the running set, then each job's in-progress, retry and job
# keys (and its generation's meta key, when starting too). ARGV: now (ms), the in-progress
# timeout (ms), now (s), now (whole s), '1' to start too, then each job's id. Returns, per
# job, nil where it was not claimed, else {score} or {score, metadata as HGETALL gives it}.
_CLAIM = (
    START_FUNCTION
    + """
local start_too = ARGV[5] == '1'
local stride = start_too and 4 or 3
local claimed = {}
for i = 6, #ARGV do
  local k = stride * (i - 6) + 3
  local found = false
  if redis.call('EXISTS', KEYS[k]) == 0 then
    local queued = redis.call('ZSCORE', KEYS[1], ARGV[i])
    if queued and tonumber(queued) <= tonumber(ARGV[1]) then
      if redis.call('INCR', KEYS[k + 1]) > 1 then
        redis.call('DEL', KEYS[k + 1], KEYS[k + 2])
        redis.call('ZREM', KEYS[1], ARGV[i])
      else
        redis.call('EXPIRE', KEYS[k + 1], 88400)
        redis.call('PSETEX', KEYS[k], ARGV[2], '1')
        redis.call('ZADD', KEYS[2], ARGV[3], ARGV[i])
        found = {tonumber(queued)}
        if start_too then found[2] = start(KEYS[k + 3], ARGV[4]) end
      end
    end
  end
  claimed[#claimed + 1] = found
end
return claimed
"""
)


# Jobs one claim takes at most (see _Worker.start_jobs). 20 requests at once, first token p50
# (`fanline bench --scenarios ttft`, one worker, five alternated runs each): 9.4 ms with
# claims of 4, 8.7 of 10, 7.7 of 20. But with 20, one of two loaded workers woken for 40 jobs
# could take nearly all of them (tests/worker/test_job.py, two workers).
_CLAIM_AT_ONCE = 10


class _Worker(Worker):
    _poll_backoff = 0.1

    def __init__(self, *args: Any, settings: Settings, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.settings = settings
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

    async def start_woken(self, job_ids: list[str]) -> None:
        """Jobs a wake message named, claimed without first reading the queue (arq's poll
        checks the same two things before it reads it)."""
        if not self.allow_pick_jobs or self.job_counter >= self.max_jobs:
            return  # full or draining: the next poll (this worker's or another's) finds them
        try:
            await self.start_jobs([job_id.encode() for job_id in job_ids])
        except (RedisError, OSError) as exc:
            log.warning("starting woken jobs: %s (the next poll retries)", exc)

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        # arq claims the jobs it found one after another, each with WATCH, EXISTS, ZSCORE and
        # MULTI/EXEC (four round trips), so the 20th of 20 concurrent requests waited for 19
        # claims. Here one script call (_CLAIM, the same checks, atomically) claims up to
        # _CLAIM_AT_ONCE of them, then the next ones, in an order of this worker's own: workers
        # woken by the same message take turns at different jobs, so a larger burst is shared
        # rather than taken whole by the fastest. The bookkeeping is arq's own.
        ids = [found.decode() for found in job_ids]
        random.shuffle(ids)
        for start in range(0, len(ids), _CLAIM_AT_ONCE):
            if not await self._claim_some(ids[start : start + _CLAIM_AT_ONCE]):
                return

    async def _claim_some(self, job_ids: list[str]) -> bool:
        """Claims and starts what it can of ``job_ids``; False once this worker is full."""
        ids: list[str] = []
        for job_id in job_ids:
            if self.job_counter >= self.max_jobs:
                break  # full: the rest are left to a later poll
            await self.sem.acquire()  # free while the counter is below max_jobs
            self.job_counter += 1
            ids.append(job_id)
        if not ids:
            return False
        in_progress_ms = int(self.in_progress_timeout_s * 1000)
        start_too = self.settings.one_redis
        job_keys: list[str] = []
        for job_id in ids:
            job_keys += [in_progress_key_prefix + job_id, retry_key_prefix + job_id, job_key_prefix + job_id]
            if start_too:
                job_keys.append(keys.meta_key(job_id))
        now = time.time()
        try:
            claimed = await self._claim(
                keys=[self.queue_name, keys.RUNNING, *job_keys],
                args=[timestamp_ms(), in_progress_ms, now, int(now), int(start_too), *ids],
            )
        except BaseException:
            for _ in ids:
                self._release_sem_dec_counter_on_complete()
            raise
        for job_id, found in zip(ids, claimed, strict=True):
            if found is None:  # started elsewhere, finished, or deferred
                self._release_sem_dec_counter_on_complete()
                continue
            task = self.loop.create_task(self.run_job(job_id, int(found[0]), found[1] if start_too else None))
            task.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
            self.tasks[job_id] = task
        return len(ids) == len(job_ids)

    async def run_job(self, job_id: str, score: int, meta: list[bytes] | None = None) -> None:
        """arq's run_job, for the one job this worker runs: ``generate(gen_id)``, whose job id is
        its generation id. arq's first reads the job's record and counts the try (a round trip),
        then runs the function in a task of its own; the record holds nothing the job needs (the
        request is in the generation's metadata), and _CLAIM has counted the try. ``meta`` is the
        generation's metadata when _CLAIM has also marked it running (generate() then skips that)."""
        ctx = {**self.ctx, "job_id": job_id, "job_try": 1, "score": score, "meta": meta, "finish_unlists": True}
        try:
            async with asyncio.timeout(self.job_timeout_s):
                await generate(ctx, job_id)
            self.jobs_complete += 1
        except asyncio.CancelledError:
            # The worker is stopping, and generate() has ended the generation with an error;
            # as in arq, the job ends here and the cancellation goes no further.
            self.jobs_failed += 1
        except Exception:
            log.exception("generation %s: its job failed", job_id)
            self.jobs_failed += 1
        await asyncio.shield(self._finish(job_id))

    async def _finish(self, job_id: str) -> None:
        """As arq ends every job it finishes (off the queue, with its keys, no result kept),
        and off the reapers' running list, in one transaction: one round trip, not two."""
        async with self.pool.pipeline(transaction=True) as tr:
            tr.delete(in_progress_key_prefix + job_id, retry_key_prefix + job_id, job_key_prefix + job_id)
            tr.zrem(abort_jobs_ss, job_id)
            tr.zrem(self.queue_name, job_id)
            tr.zrem(keys.RUNNING, job_id)
            await tr.execute()

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
        # A cluster pipeline splits by node, and one failing node would fail the whole batch.
        ctx["script_batch"] = None if settings.redis_cluster else ScriptBatch(ctx["events_redis"])
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
        settings=settings,
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
