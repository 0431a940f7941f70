"""The FastAPI application: wiring of settings, Redis, the queue, the hub and the routes."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from arq.connections import RedisSettings, create_pool
from fastapi import FastAPI

from api import errors
from api.generations import Generations
from api.hub import Hub
from api.routes import router
from shared.connections import events_redis
from shared.settings import Settings

log = logging.getLogger("fanline.api")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        redis = events_redis(settings)
        queue = await create_pool(RedisSettings.from_dsn(settings.queue_url), default_queue_name=settings.queue_name)
        hub = Hub(redis, settings)
        await hub.start()
        app.state.settings = settings
        app.state.redis = redis
        app.state.queue = queue
        app.state.hub = hub
        app.state.generations = Generations(redis, queue, settings)
        app.state.draining = False
        log.info("API ready (redis %s)", settings.redis_url.rsplit("@", 1)[-1])
        try:
            yield
        finally:
            await hub.stop()
            await queue.aclose()
            await redis.aclose()

    app = FastAPI(title="fanline", version="0.1.0", lifespan=lifespan)
    errors.install(app)
    app.include_router(router)
    return app
