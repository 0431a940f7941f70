"""Fixtures of the worker tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A client of the session's Redis, closed after the test."""
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()
