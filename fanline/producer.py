"""Publish your own app's LLM stream into fanline: the producer library.

    producer = fanline.Producer()          # the FANLINE_* settings (FANLINE_REDIS_URL, ...) unless given
    async with producer:                   # or await producer.start() / producer.close() in a lifespan
        async with producer.generation(model="my-model") as gen:
            async for token in my_model(prompt):
                gen.add(token)             # text, a delta dict, or an OpenAI chunk (dict or SDK object)
        # leaving the block finishes the generation ("stop", or the chunks' finish_reason);
        # an exception fails it; a viewer's cancel makes add() raise Cancelled, and the block
        # ends it as cancelled.

A generation made here is like one a worker made: its id is the capability, viewers watch
and resume it on any API pod over every transport, and it is written the way workers write
(worker/publisher.py: coalesced, idempotent ``<seq>-0`` ids, retried across Redis outages,
so a retried append neither loses nor duplicates). While it is open the producer beats like
a worker (worker/job.py ``beat_until_ended``): if the app's process dies, a reaper on the API
pods ends it with ``worker_lost`` within ``FANLINE_WORKER_LOST_AFTER_S``, and a viewer's
cancel reaches the producer within ``FANLINE_WORKER_HEARTBEAT_S`` (or at its next write).

``stream_response`` wraps an existing endpoint: it turns the app's async iterator of OpenAI
chunks (or text) into a generation fed in the background and returns the resumable stream
response (SSE with ``id:`` lines, NDJSON, or the AI SDK's UI message stream), read through
this process's own hub: one shared Redis reader however many viewers the app serves.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterable, Callable, Coroutine, Iterator, Mapping
from contextlib import contextmanager
from types import TracebackType
from typing import Any, TypeVar, cast

import orjson
import redis.asyncio as aioredis
from starlette.requests import Request

from fanline.api.auth import Auth
from fanline.api.hub import Hub
from fanline.api.transports import EventStreamResponse, Transport, ai_sdk
from fanline.api.transports.ndjson import NDJSON
from fanline.api.transports.sse import SSE
from fanline.shared import keys
from fanline.shared.connections import events_redis, queue_redis
from fanline.shared.errors import Cancelled, Disowned, GenerationFailed
from fanline.shared.events import Delta
from fanline.shared.ids import new_generation_id
from fanline.shared.keys import Meta
from fanline.shared.settings import Settings
from fanline.worker.job import beat_until_ended, mark_ended
from fanline.worker.publisher import Publisher

log = logging.getLogger("fanline.producer")

T = TypeVar("T")

# How long closing the producer waits for its open generations to write their end.
_CLOSE_WRITE_S = 5.0
SHUTDOWN_MESSAGE = "the app producing this generation stopped before it finished"


class Generation:
    """One generation this process produces. Made by :meth:`Producer.create` (or ``generation()``)."""

    def __init__(self, producer: Producer, gen_id: str, model: str, created: int, owner: str) -> None:
        self.id = gen_id
        self.model = model
        self.watch_token: str | None = producer.auth.watch_token(gen_id) if producer.auth.enabled else None
        self.finish_reason: str | None = None  # from the chunks added, if they carried one
        self.usage: dict[str, Any] | None = None  # likewise
        self._producer = producer
        self._owner = owner
        self._publisher = Publisher(
            producer.redis,
            gen_id,
            model,
            created,
            max_events=producer.settings.stream_max_events,
            retention_s=producer.settings.retention_s,
        )
        self._ended = False
        self._on_stop: list[Callable[[], object]] = []
        self._stop_requested = False
        self._beat = asyncio.create_task(
            beat_until_ended(
                producer.redis, producer.queue, producer.settings, gen_id, self._publisher, self._stop, self._stopped
            ),
            name=f"beat-{gen_id}",
        )

    @property
    def cancelled(self) -> bool:
        """A viewer asked to cancel: stop producing (``add`` raises :class:`Cancelled` from now on)."""
        return self._publisher.cancel_requested

    @property
    def ended(self) -> bool:
        return self._ended

    def add(self, item: str | Delta | Mapping[str, Any] | Any) -> None:
        """One step: text (content), a delta dict (``content``, ``reasoning_content``, ``tool_calls``...),
        or an OpenAI ``chat.completion.chunk`` (a dict, or the ``openai`` SDK's object).

        It returns at once: deltas that arrive while a write is in flight are coalesced into the
        next write. Raises :class:`Cancelled` once a viewer has cancelled, :class:`Disowned` once
        the generation is no longer this producer's.
        """
        if self._ended:
            raise RuntimeError(f"generation {self.id} has already ended")
        if self._publisher.disowned:
            raise Disowned(f"generation {self.id} is no longer this producer's (reaped, or lost by Redis)")
        if self._publisher.cancel_requested:
            raise Cancelled(f"generation {self.id} was cancelled")
        delta = self._delta(item)
        if delta:
            self._publisher.add(cast(Delta, delta))

    async def flush(self) -> None:
        """Waits until everything added so far is in Redis (``add`` itself never waits)."""
        await self._publisher.drain()

    async def finish(self, finish_reason: str | None = None, usage: dict[str, Any] | None = None) -> None:
        """The final chunk (``finish_reason``: given, else the chunks', else ``stop``; ``cancelled``
        after a cancel), the usage chunk when there is usage, and the end."""
        if self._ended:
            return
        usage = usage if usage is not None else self.usage
        if self.cancelled:
            status, reason = "cancelled", "cancelled"
        else:
            status, reason = "completed", finish_reason or self.finish_reason or "stop"
        await self._end(status, self._publisher.finish(status, reason, usage, usage is not None))

    async def fail(self, message: str, code: str = "generation_failed") -> None:
        """A terminal error event (``{"error": {"message", "code"}}``) and the end."""
        if self._ended:
            return
        await self._end("failed", self._publisher.fail(message, code, usage=self.usage))

    async def __aenter__(self) -> Generation:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        if self._ended:
            return isinstance(exc, Cancelled)
        if exc is None or isinstance(exc, Cancelled):
            await self.finish()
            return exc is not None
        if isinstance(exc, Disowned) or self._publisher.disowned:
            log.warning("generation %s: no longer ours (reaped or lost by Redis); stopped", self.id)
            await self._close_quietly()
            return isinstance(exc, Disowned)
        if isinstance(exc, asyncio.CancelledError):
            await self._end_bounded(SHUTDOWN_MESSAGE, "producer_shutdown")
            return False
        if isinstance(exc, GenerationFailed):
            await self.fail(exc.message, exc.code)
        else:
            log.error("generation %s failed", self.id, exc_info=exc)
            await self.fail(f"generation failed: {type(exc).__name__}")
        return False

    # -- inside ------------------------------------------------------------

    def _delta(self, item: Any) -> dict[str, Any] | None:
        if isinstance(item, str):
            return {"content": item} if item else None
        if hasattr(item, "model_dump"):  # the openai SDK's ChatCompletionChunk (a pydantic model)
            item = item.model_dump(exclude_none=True)
        if not isinstance(item, Mapping):
            raise TypeError(f"add() takes text, a delta dict or a chat.completion.chunk, not {type(item).__name__}")
        if "choices" in item or item.get("object") == "chat.completion.chunk":
            if item.get("usage"):
                self.usage = dict(item["usage"])
            choices = item.get("choices") or []
            if not choices:
                return None
            choice = choices[0]
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
            delta = dict(choice.get("delta") or {})
            if choice.get("logprobs"):
                delta["logprobs"] = choice["logprobs"]
            item = delta
        delta = {k: v for k, v in item.items() if v is not None and k != "role"}
        return delta if any(v != "" for v in delta.values()) else None

    def _stop(self) -> None:
        """Called by the heartbeat when a viewer cancelled or the generation was disowned."""
        self._stop_requested = True
        for callback in self._on_stop:
            callback()

    def _stopped(self) -> bool:
        return self._ended or self._stop_requested

    async def _end(self, status: str, writing: Coroutine[Any, Any, None]) -> None:
        self._ended = True
        try:
            await writing
        finally:
            await self._close_quietly()
        await mark_ended(self._producer.redis, self._producer.queue, self.id, status, self._owner)

    async def _close_quietly(self) -> None:
        self._ended = True
        self._beat.cancel()
        await asyncio.gather(self._beat, return_exceptions=True)
        self._producer._open.discard(self)

    async def _end_bounded(self, message: str, code: str) -> None:
        try:
            async with asyncio.timeout(_CLOSE_WRITE_S):
                await asyncio.shield(self.fail(message, code))
        except Exception as exc:  # the reaper will end it as worker_lost instead
            log.warning("generation %s: could not write its end: %s", self.id, exc)
            await self._close_quietly()


class Producer:
    """Creates generations on fanline's Redis (Redis, Valkey, or a Valkey/Redis Cluster with
    ``FANLINE_REDIS_CLUSTER=1``), from the ``FANLINE_*`` settings or the ones given:

        producer = Producer(Settings(redis_url="redis://127.0.0.1:6379/0"))
    """

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings if settings is not None else Settings()
        self.auth = Auth(self.settings)
        self._redis: aioredis.Redis | None = None
        self._queue: aioredis.Redis | None = None
        self._hub: Hub | None = None
        self._open: set[Generation] = set()
        self._pumps: set[asyncio.Task[None]] = set()

    @property
    def redis(self) -> aioredis.Redis:
        if self._redis is None:
            raise RuntimeError("the producer is not started: `async with producer:` or `await producer.start()`")
        return self._redis

    @property
    def queue(self) -> aioredis.Redis:
        if self._queue is None:
            raise RuntimeError("the producer is not started: `async with producer:` or `await producer.start()`")
        return self._queue

    async def start(self) -> None:
        if self._redis is None:
            self._redis = events_redis(self.settings)
            self._queue = queue_redis(self.settings)

    async def close(self) -> None:
        """Ends what is still open: background streams are stopped and every open generation
        gets a ``producer_shutdown`` error (bounded), so no viewer waits for a reaper."""
        for task in list(self._pumps):
            task.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        await asyncio.gather(
            *(g._end_bounded(SHUTDOWN_MESSAGE, "producer_shutdown") for g in list(self._open)), return_exceptions=True
        )
        if self._hub is not None:
            await self._hub.stop()
            self._hub = None
        for client in (self._redis, self._queue):
            if client is not None:
                await client.aclose()
        self._redis = self._queue = None

    async def __aenter__(self) -> Producer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def create(
        self, model: str = "fanline", *, request: Mapping[str, Any] | None = None, owner: str = ""
    ) -> Generation:
        """A new generation, running from now on: viewers can watch it at once.

        ``request`` (the Chat Completions body the app answers, if any) is kept with it; ``owner``
        (``Auth.owner_of(api_key)``) is the key allowed to cancel it when auth is on.
        """
        await self.start()
        gen_id = new_generation_id()
        now = int(time.time())
        meta_key = keys.meta_key(gen_id)
        meta: dict[str, str | int] = {
            Meta.STATUS: "running",
            Meta.MODEL: model,
            Meta.CREATED: now,
            Meta.VIEWED_AT: now,
            Meta.HEARTBEAT: now,
            Meta.OWNER: owner,
        }
        if request is not None:
            meta[Meta.REQUEST] = orjson.dumps(request).decode()
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(meta_key, mapping=meta)
            pipe.expire(meta_key, keys.UNFINISHED_TTL_S)
            await pipe.execute()
        await self.queue.zadd(keys.RUNNING, {gen_id: now})  # the reapers' list, as for a worker's job
        generation = Generation(self, gen_id, model, now, owner)
        self._open.add(generation)
        log.info("generation %s started by the app", gen_id)
        return generation

    def generation(
        self, model: str = "fanline", *, request: Mapping[str, Any] | None = None, owner: str = ""
    ) -> _Opening:
        """``async with producer.generation(model=...) as gen:`` — created on entry, ended on exit."""
        return _Opening(self.create(model, request=request, owner=owner))

    async def stream_response(
        self,
        source: AsyncIterable[Any],
        *,
        model: str = "fanline",
        request: Request | None = None,
        transport: str | None = None,
        owner: str = "",
    ) -> EventStreamResponse:
        """The app's stream as a fanline generation, and the response that streams it back.

        ``source`` yields text, delta dicts or OpenAI chunks (see :meth:`Generation.add`); it is
        consumed in the background, so the generation goes on if this client leaves, and a
        viewer's cancel closes it. ``transport``: ``"sse"`` (the default; OpenAI chunks with ids),
        ``"ndjson"`` (also chosen by ``Accept: application/x-ndjson`` on ``request``) or
        ``"ai-sdk"``. The response has the headers ``X-Fanline-Generation-Id`` (and
        ``X-Fanline-Watch-Token`` with auth on): any viewer can resume it on an API pod
        (``GET /v1/generations/{id}/events`` with ``Last-Event-ID``).
        """
        body: Mapping[str, Any] | None = None
        if request is not None and request.method == "POST":
            try:
                parsed = orjson.loads(await request.body())
                body = parsed if isinstance(parsed, dict) else None
            except orjson.JSONDecodeError:
                body = None
        generation = await self.create(model, request=body, owner=owner)
        pump = asyncio.create_task(self._pump(generation, source), name=f"pump-{generation.id}")
        self._pumps.add(pump)
        pump.add_done_callback(self._pumps.discard)
        generation._on_stop.append(pump.cancel)
        accept = request.headers.get("accept", "") if request is not None else ""
        chosen = transport or ("ndjson" if "application/x-ndjson" in accept else "sse")
        headers = self.auth.creation_headers(generation.id) | (ai_sdk.HEADERS if chosen == "ai-sdk" else {})
        return EventStreamResponse(await self.hub(), generation.id, 0, _transport(chosen, generation.id), headers)

    async def hub(self) -> Hub:
        """This process's hub: one shared Redis reader for every response it streams."""
        if self._hub is None:
            await self.start()
            self._hub = Hub(self.redis, self.settings)
            await self._hub.start()
        return self._hub

    async def _pump(self, generation: Generation, source: AsyncIterable[Any]) -> None:
        iterator = aiter(source)
        try:
            async with generation:
                try:
                    async for item in iterator:
                        generation.add(item)
                        await asyncio.sleep(0)  # let the publisher write between items of a source that never waits
                except asyncio.CancelledError:
                    # Our own cancel (the heartbeat saw a viewer's cancel): end as cancelled, not as a shutdown.
                    task = asyncio.current_task()
                    if generation._stop_requested and task is not None and task.uncancel() == 0:
                        if generation._publisher.disowned:
                            raise Disowned(generation.id) from None
                        raise Cancelled(generation.id) from None
                    raise
        except Exception:
            pass  # logged, and written as the generation's error, by the generation's exit
        finally:
            aclose = getattr(iterator, "aclose", None)  # close the app's generator (and its model's stream)
            if aclose is not None:
                await aclose()


class _Opening:
    """The async context manager ``Producer.generation()`` returns."""

    def __init__(self, creating: Coroutine[Any, Any, Generation]) -> None:
        self._creating = creating
        self._generation: Generation | None = None

    async def __aenter__(self) -> Generation:
        self._generation = await self._creating
        return self._generation

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        assert self._generation is not None
        return await self._generation.__aexit__(exc_type, exc, tb)


def _transport(name: str, gen_id: str) -> Transport:
    if name == "sse":
        return SSE()
    if name == "ndjson":
        return NDJSON()
    if name == "ai-sdk":
        return ai_sdk.UIMessageStream(gen_id)
    raise ValueError(f"unknown transport {name!r}: use 'sse', 'ndjson' or 'ai-sdk'")


class SyncProducer:
    """:class:`Producer` for code without an event loop (a thread, a sync framework callback);
    it runs the producer on a loop of its own, on a background thread:

        with fanline.SyncProducer() as producer, producer.generation(model="m") as gen:
            for token in model.stream(prompt):
                gen.add(token)
    """

    def __init__(self, settings: Settings | None = None) -> None:
        self.producer = Producer(settings)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._loop is not None:
            return
        loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=loop.run_forever, name="fanline-producer", daemon=True)
        self._thread.start()
        self._loop = loop
        self.run(self.producer.start())

    def close(self) -> None:
        if self._loop is None:
            return
        try:
            self.run(self.producer.close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            assert self._thread is not None
            self._thread.join(timeout=10)
            self._loop.close()
            self._loop = None

    def __enter__(self) -> SyncProducer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Runs a coroutine on the producer's loop and returns its result (or raises its error)."""
        if self._loop is None:
            coroutine.close()
            raise RuntimeError("the producer is not started: `with SyncProducer() as producer:`")
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def create(
        self, model: str = "fanline", *, request: Mapping[str, Any] | None = None, owner: str = ""
    ) -> SyncGeneration:
        return SyncGeneration(self, self.run(self.producer.create(model, request=request, owner=owner)))

    @contextmanager
    def generation(
        self, model: str = "fanline", *, request: Mapping[str, Any] | None = None, owner: str = ""
    ) -> Iterator[SyncGeneration]:
        """Like :meth:`Producer.generation`: finished on exit, failed on an exception, cancelled on Cancelled."""
        generation = self.create(model, request=request, owner=owner)
        try:
            yield generation
        except BaseException as exc:
            if not self.run(generation.generation.__aexit__(type(exc), exc, exc.__traceback__)):
                raise
        else:
            self.run(generation.generation.__aexit__(None, None, None))


class SyncGeneration:
    """A :class:`Generation` driven from another thread; the same methods, blocking."""

    def __init__(self, producer: SyncProducer, generation: Generation) -> None:
        self._producer = producer
        self.generation = generation
        self.id = generation.id
        self.watch_token = generation.watch_token

    @property
    def cancelled(self) -> bool:
        return self.generation.cancelled

    def add(self, item: str | Delta | Mapping[str, Any] | Any) -> None:
        self._producer.run(_call(self.generation.add, item))

    def flush(self) -> None:
        self._producer.run(self.generation.flush())

    def finish(self, finish_reason: str | None = None, usage: dict[str, Any] | None = None) -> None:
        self._producer.run(self.generation.finish(finish_reason, usage))

    def fail(self, message: str, code: str = "generation_failed") -> None:
        self._producer.run(self.generation.fail(message, code))


async def _call(function: Callable[..., T], *args: Any) -> T:
    return function(*args)
