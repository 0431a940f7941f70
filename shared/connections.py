"""Redis connections, made in one place from the settings."""

from __future__ import annotations

from typing import Any, cast

import redis.asyncio as aioredis
from redis.exceptions import RedisClusterException, RedisError

from fanline.shared.cluster import ValkeyCluster
from fanline.shared.settings import Settings

# What an unreachable Redis raises: redis-py's errors, and the cluster client's own
# exception tree, which is not a RedisError ("cannot connect to any startup node",
# "slot not covered") — seen while a Cluster node fails over. Every retry loop catches both.
UNAVAILABLE: tuple[type[Exception], ...] = (RedisError, RedisClusterException)

# Blocking reads (XREAD BLOCK) must finish well inside the socket timeout, or an
# idle reader is cut off by its own client.
_SOCKET_MARGIN_S = 10.0


def _options(settings: Settings) -> dict[str, Any]:
    return {
        "socket_timeout": settings.hub_block_ms / 1000 + _SOCKET_MARGIN_S,
        "socket_connect_timeout": 5.0,
        "health_check_interval": 30,
    }


def events_redis(settings: Settings) -> aioredis.Redis:
    """The Redis (or cluster) holding the event streams and metadata."""
    if settings.redis_cluster:
        # Not redis-py's RedisCluster as is: one failing node would stall every node's commands.
        cluster: Any = ValkeyCluster.from_url(settings.redis_url, **_options(settings))
        return cast(aioredis.Redis, cluster)  # the subset of the API fanline uses is the same
    return cast(aioredis.Redis, aioredis.Redis.from_url(settings.redis_url, **_options(settings)))


def queue_redis(settings: Settings, *, pubsub: bool = False) -> aioredis.Redis:
    """The (non-cluster) Redis holding the arq job queue and the wake/cancel channels.

    A pub/sub listener is idle for as long as nothing is published: it gets no
    socket timeout (a dead server is noticed by the health-check PINGs).
    """
    options = _options(settings)
    if pubsub:
        options["socket_timeout"] = None
    return cast(aioredis.Redis, aioredis.Redis.from_url(settings.queue_url, **options))
