"""The reaper: ends generations whose worker died, so no viewer hangs (Guarantee 4).

Every ``worker_heartbeat_s`` a worker writes, for each of its generations, its
liveness in the ``fanline:running`` sorted set (score: time) on the queue Redis, and
the generation's heartbeat in its metadata on the events Redis. On a Cluster the
liveness therefore goes on while the generation's node fails over; before, a reaper
that never touched that node took the outage for a dead worker. Every API pod and every worker runs a
reaper that looks for entries older than ``worker_lost_after_s`` and, in one Lua
script per generation (atomic; its keys share one hash tag), checks that it is still
running with a stale heartbeat too, appends an error event
(``code: "worker_lost"``) and the end, marks it failed and sets its expiry.
Several reapers racing is harmless: the script acts once.
"""

from __future__ import annotations

import asyncio
import logging
import time

import orjson
import redis.asyncio as aioredis
from prometheus_client import Counter

from fanline.shared import events, keys
from fanline.shared.connections import UNAVAILABLE
from fanline.shared.settings import Settings

log = logging.getLogger("fanline.reaper")

_FAIL_IF_STALE = """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'running' then return 0 end
local heartbeat = tonumber(redis.call('HGET', KEYS[1], 'heartbeat') or '0')
if heartbeat > tonumber(ARGV[1]) then return 0 end
local newest = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
local seq = 0
if #newest > 0 then seq = tonumber(string.match(newest[1][1], '^(%d+)')) end
redis.call('XADD', KEYS[2], (seq + 1) .. '-0', 'k', 'e', 'd', ARGV[2], 't', ARGV[4])
redis.call('XADD', KEYS[2], (seq + 2) .. '-0', 'k', 'd', 'd', '', 't', ARGV[4])
redis.call('HSET', KEYS[1], 'status', 'failed', 'finish_reason', '', 'error', ARGV[3],
           'last_event_id', (seq + 2) .. '-0')
for i = 1, 3 do redis.call('EXPIRE', KEYS[i], tonumber(ARGV[5])) end
return 1
"""

REAPED = Counter("fanline_reaped_generations_total", "Generations this process ended as worker_lost")

WORKER_LOST_MESSAGE = "the worker running this generation stopped responding"


class Reaper:
    def __init__(self, redis: aioredis.Redis, queue: aioredis.Redis, settings: Settings) -> None:
        self._redis = redis  # the events Redis (or cluster)
        self._queue = queue  # the queue Redis, with the running set
        self._settings = settings
        self._script = redis.register_script(_FAIL_IF_STALE)
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self._loop(), name="reaper")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    async def _loop(self) -> None:
        # Reap only after this process has had Redis for a whole worker_lost_after_s:
        # after an outage, workers need that long to get a heartbeat through, and
        # their generations must not be failed for the outage itself.
        healthy_since = time.monotonic()
        while True:
            await asyncio.sleep(self._settings.reap_interval_s)
            try:
                if time.monotonic() - healthy_since >= self._settings.worker_lost_after_s:
                    await self.reap_once()
                else:
                    await asyncio.gather(self._redis.ping(), self._queue.ping())
            except UNAVAILABLE as exc:
                healthy_since = time.monotonic()
                log.warning("reaper: %s", exc)

    async def reap_once(self) -> int:
        """Fails every stale generation; returns how many this call failed."""
        deadline = time.time() - self._settings.worker_lost_after_s
        stale = await self._queue.zrangebyscore(keys.RUNNING, "-inf", deadline, start=0, num=100)
        failed = 0
        for member in stale:
            gen_id = member.decode()
            events_key, meta_key, content_key = keys.generation_keys(gen_id)
            error = events.error_payload(WORKER_LOST_MESSAGE, "worker_lost")
            done = await self._script(
                keys=[meta_key, events_key, content_key],
                args=[
                    int(deadline),
                    error,
                    orjson.dumps({"message": WORKER_LOST_MESSAGE, "code": "worker_lost"}),
                    time.time_ns() // 1000,
                    self._settings.retention_s,
                ],
            )
            await self._queue.zrem(keys.RUNNING, gen_id)
            if done:
                failed += 1
                REAPED.inc()
                log.warning("generation %s: worker lost, ended with an error", gen_id)
        return failed
