"""The FastAPI application: wiring of settings, Redis, the queue, the hub and the routes."""

from __future__ import annotations

import gc
import logging
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from arq.connections import RedisSettings, create_pool
from fastapi import FastAPI
from starlette.datastructures import State
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from fanline.api import errors, web
from fanline.api.auth import Auth
from fanline.api.errors import error_response
from fanline.api.generations import Generations
from fanline.api.hub import Hub
from fanline.api.routes import chat_completions, events_response, router
from fanline.api.streams import router as streams_router
from fanline.shared.connections import UNAVAILABLE, events_redis
from fanline.shared.errors import FanlineError, Unavailable
from fanline.shared.logs import gen_id_var, request_id_var
from fanline.shared.reaper import Reaper
from fanline.shared.settings import Settings
from fanline.shared.streams import Streams

log = logging.getLogger("fanline.api")

_SANE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_GENERATION_PATH = re.compile(r"/v1/generations/([0-9a-f]{32})(/[a-z]+)?")


class Edge:
    """The outermost ASGI app: request ids, refusing requests while draining, and the
    hot path.

    Every request gets an id (its ``X-Request-Id`` if sane, else a new one), echoed in
    the response and put on every log line with the generation id from the path. A
    pod that is shutting down answers 503 ``draining`` (but /healthz).

    ``GET /v1/generations/{id}/events`` — where most viewers live — and
    ``POST /v1/chat/completions`` — where the time to first token is spent — are
    served here directly rather than through FastAPI: its middleware and routing put
    eight wrappers around every write, about 15% of a pod's CPU at 1,000 viewers in
    the benchmark. The routes themselves (``routes.events_response``,
    ``routes.chat_completions``) are the same code, and their errors the same bodies.
    Everything else, and everything when CORS is on, goes through FastAPI.
    """

    def __init__(self, app: FastAPI, *, fast_events: bool = True) -> None:
        self.app = app
        self.fast_events = fast_events

    @property
    def state(self) -> State:
        return self.app.state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)  # lifespan
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _SANE_ID.fullmatch(given) else secrets.token_hex(8)
        request_id_var.set(request_id)
        id_header = (b"x-request-id", request_id.encode())
        path = scope["path"]
        match = _GENERATION_PATH.fullmatch(path)
        if match:
            gen_id_var.set(match.group(1))

        response: Response | None = None
        if scope["type"] == "http" and getattr(self.app.state, "draining", False) and path != "/healthz":
            response = error_response(Unavailable("this pod is shutting down; retry on another", code="draining"))
        elif self.fast_events and scope["type"] == "http":
            if match and match.group(2) == "/events" and scope["method"] == "GET":
                response = await self._serve(events_response, scope, receive, match.group(1))
            elif path == "/v1/chat/completions" and scope["method"] == "POST":
                response = await self._serve(chat_completions, scope, receive)
        if response is not None:
            response.raw_headers.append(id_header)
            await response(scope, receive, send)
            return

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), id_header]
            await send(message)

        await self.app(scope, receive, send_with_id)

    async def _serve(
        self, route: Callable[..., Awaitable[Response]], scope: Scope, receive: Receive, *args: str
    ) -> Response:
        """A route's response, or its error as errors.install's handlers would answer it."""
        scope["app"] = self.app
        try:
            return await route(Request(scope, receive), *args)
        except FanlineError as exc:
            return error_response(exc)
        except UNAVAILABLE as exc:
            return errors.redis_unavailable(scope["path"], exc)
        except Exception:
            return errors.internal_error(scope["path"])


def create_app(settings: Settings | None = None) -> Edge:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        redis = events_redis(settings)
        queue = await create_pool(RedisSettings.from_dsn(settings.queue_url), default_queue_name=settings.queue_name)
        hub = Hub(redis, settings)
        await hub.start()
        reaper = Reaper(redis, queue, settings)
        reaper.start()
        app.state.settings = settings
        app.state.redis = redis
        app.state.queue = queue
        app.state.hub = hub
        app.state.generations = Generations(redis, queue, settings)
        app.state.streams = Streams(redis, settings)
        app.state.draining = False
        # Everything made at start-up lives as long as the process: keep it out of the
        # cyclic collector's scans, which otherwise walk it on every collection.
        gc.freeze()
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
    app.state.draining = False
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
    app.include_router(streams_router)
    app.include_router(web.router)
    return Edge(app, fast_events=not origins)
