"""Per-API-key limits on generations: how many may be live at once, and how many may start a minute.

    limits = Limits(redis, settings)
    await limits.admit(owner, gen_id)    # RateLimited (429 + Retry-After) over a limit
    await limits.release(owner, gen_id)  # the creation failed after all

``FANLINE_KEY_MAX_CONCURRENT`` and ``FANLINE_KEY_RATE_PER_MIN`` (0: unlimited) apply
only with auth on: without API keys there is no key to count against. The state is
in the events Redis, so every API pod enforces the same limits, and one Lua script
checks both and records the admission atomically (the two keys of an API key share
the hash tag ``{key:<owner>}``); a refused request records nothing. The script
takes the time from Redis, so API pods with skewed clocks agree.

Concurrency: a sorted set of the key's live (queued or running) generation ids,
scored by the time the entry goes stale (``UNFINISHED_TTL_S`` after admission, when
an unfinished generation's keys expire anyway). The worker removes an id when its
generation ends (worker/job.py ``mark_ended``). A generation that ended without that
removal (its worker was killed and a reaper failed it) is found the moment it
matters: when the key is at its limit, the statuses of its live ids are read, the
finished ones removed, and the request checked again.

Rate: a sliding window log, the ids admitted in the last ``RATE_WINDOW_S`` seconds,
scored by admission time. Exact (the N+1th creation within any 60 s is refused,
never a burst of 2N across a window boundary) and bounded: it holds at most N ids.
"""

from __future__ import annotations

import logging

import redis.asyncio as aioredis

from fanline.shared import keys
from fanline.shared.connections import UNAVAILABLE
from fanline.shared.errors import RateLimited
from fanline.shared.keys import Meta
from fanline.shared.settings import Settings

log = logging.getLogger("fanline.api")

_TERMINAL = (b"completed", b"failed", b"cancelled")

# KEYS: live, recent. ARGV: gen_id, max live, max per window, window s, stale after s.
# Returns {verdict, retry_after_s, now_s}; verdict is ok | live | rate.
_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local max_live, per_window = tonumber(ARGV[2]), tonumber(ARGV[3])
local window, stale_after = tonumber(ARGV[4]), tonumber(ARGV[5])
if max_live > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  if redis.call('ZCARD', KEYS[1]) >= max_live then return {'live', 1, math.floor(now)} end
end
if per_window > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window)
  if redis.call('ZCARD', KEYS[2]) >= per_window then
    local oldest = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
    return {'rate', math.ceil(tonumber(oldest[2]) + window - now), math.floor(now)}
  end
  redis.call('ZADD', KEYS[2], now, ARGV[1])
  redis.call('EXPIRE', KEYS[2], window + 1)
end
if max_live > 0 then
  redis.call('ZADD', KEYS[1], now + stale_after, ARGV[1])
  redis.call('EXPIRE', KEYS[1], stale_after + 1)
end
return {'ok', 0, math.floor(now)}
"""

# A live id whose generation has no metadata yet may be one being created right now
# (admitted, metadata not yet written); only after this long is it taken for lost.
_CREATE_GRACE_S = 60
# When a slot frees up is unknown (it is when one of the key's generations ends).
_LIVE_RETRY_AFTER_S = 1


class Limits:
    def __init__(self, redis: aioredis.Redis, settings: Settings) -> None:
        self._redis = redis
        self._max_live = settings.key_max_concurrent
        self._per_window = settings.key_rate_per_min
        self._enabled = bool(settings.api_key_list) and (self._max_live > 0 or self._per_window > 0)
        self._admit = redis.register_script(_ADMIT)

    async def admit(self, owner: str, gen_id: str) -> None:
        """Records ``gen_id`` against the key's limits, or raises RateLimited and records nothing."""
        if not self._enabled or not owner:
            return
        verdict, retry_after, now = await self._check(owner, gen_id)
        if verdict == b"live" and await self._forget_ended(owner, now):
            verdict, retry_after, now = await self._check(owner, gen_id)
        if verdict == b"live":
            raise RateLimited(
                f"this API key has {self._max_live} generations queued or running, its limit; "
                "retry when one of them has ended",
                retry_after=retry_after,
                code="concurrency_limit_exceeded",
            )
        if verdict == b"rate":
            raise RateLimited(
                f"this API key has started {self._per_window} generations in the last "
                f"{keys.RATE_WINDOW_S} s, its limit; retry in {retry_after} s",
                retry_after=retry_after,
            )

    async def release(self, owner: str, gen_id: str) -> None:
        """Takes back an admission whose generation was never created (best effort)."""
        if not self._enabled or not owner:
            return
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.zrem(keys.key_live_key(owner), gen_id)
                pipe.zrem(keys.key_recent_key(owner), gen_id)
                await pipe.execute()
        except UNAVAILABLE as exc:  # the entries go stale by themselves
            log.warning("could not release the limits entry of generation %s: %s", gen_id, exc)

    async def _check(self, owner: str, gen_id: str) -> tuple[bytes, int, int]:
        verdict, retry_after, now = await self._admit(
            keys=[keys.key_live_key(owner), keys.key_recent_key(owner)],
            args=[gen_id, self._max_live, self._per_window, keys.RATE_WINDOW_S, keys.UNFINISHED_TTL_S],
        )
        return verdict, int(retry_after), int(now)

    async def _forget_ended(self, owner: str, now: int) -> bool:
        """Removes the key's live ids whose generation has ended or is gone; True if there were any."""
        live_key = keys.key_live_key(owner)
        entries: list[tuple[bytes, float]] = await self._redis.zrange(live_key, 0, -1, withscores=True)
        async with self._redis.pipeline(transaction=False) as pipe:
            for member, _ in entries:
                pipe.hget(keys.meta_key(member.decode()), Meta.STATUS)
            statuses: list[bytes | None] = await pipe.execute()
        ended = [
            member
            for (member, stale_at), status in zip(entries, statuses, strict=True)
            if status in _TERMINAL or (status is None and now - (stale_at - keys.UNFINISHED_TTL_S) > _CREATE_GRACE_S)
        ]
        if ended:
            await self._redis.zrem(live_key, *ended)
        return bool(ended)
