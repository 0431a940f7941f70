"""The FastAPI application: wiring of settings, Redis, the queue, the hub and the routes."""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from arq.connections import RedisSettings, create_pool
from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import errors, web
from api.auth import Auth
from api.errors import error_response
from api.generations import Generations
from api.hub import Hub
from api.routes import router
from shared.connections import events_redis
from shared.errors import Unavailable
from shared.ids import is_generation_id
from shared.logs import gen_id_var, request_id_var
from shared.reaper import Reaper
from shared.settings import Settings

log = logging.getLogger("fanline.api")

_SANE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


class RefuseWhileDraining:
    """New requests to a pod that is shutting down get 503 ``draining`` (pure ASGI:
    BaseHTTPMiddleware would copy every streamed chunk through a memory stream)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] != "/healthz" and getattr(scope["app"].state, "draining", False):
            response = error_response(Unavailable("this pod is shutting down; retry on another", code="draining"))
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


class RequestIds:
    """Gives every request an id (its ``X-Request-Id`` if sane, else a new one), echoed
    in the response and put on every log line, with the generation id from the path."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _SANE_ID.fullmatch(given) else secrets.token_hex(8)
        request_id_var.set(request_id)
        parts = scope["path"].split("/")
        if len(parts) > 3 and parts[1:3] == ["v1", "generations"] and is_generation_id(parts[3]):
            gen_id_var.set(parts[3])

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", request_id.encode())]
            await send(message)

        await self.app(scope, receive, send_with_id)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        redis = events_redis(settings)
        queue = await create_pool(RedisSettings.from_dsn(settings.queue_url), default_queue_name=settings.queue_name)
        hub = Hub(redis, settings)
        await hub.start()
        reaper = Reaper(redis, settings)
        reaper.start()
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
            await reaper.stop()
            await hub.stop()
            await queue.aclose()
            await redis.aclose()

    app = FastAPI(title="fanline", version="0.1.0", lifespan=lifespan)
    errors.install(app)
    app.state.auth = Auth(settings)
    app.add_middleware(RefuseWhileDraining)
    app.add_middleware(RequestIds)
    origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
    if origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["authorization", "content-type", "last-event-id"],
            expose_headers=["x-fanline-generation-id", "x-fanline-watch-token"],
        )

    app.include_router(router)
    app.include_router(web.router)
    return app
