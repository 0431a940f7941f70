"""Generations as the API sees them: create (per-key limits, metadata + job + wake), look up, cancel."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis
from arq.connections import ArqRedis
from arq.constants import job_key_prefix
from arq.jobs import serialize_job
from arq.utils import timestamp_ms
from pydantic import ValidationError
from redis.asyncio.client import Pipeline

from fanline.api import metrics
from fanline.api.limits import Limits
from fanline.shared import events, keys
from fanline.shared.errors import Conflict, Forbidden, InvalidRequest, NotFound, PayloadTooLarge
from fanline.shared.ids import is_generation_id, new_generation_id
from fanline.shared.keys import Meta
from fanline.shared.logs import gen_id_var
from fanline.shared.requests import ChatCompletionRequest
from fanline.shared.settings import Settings

TERMINAL = ("completed", "failed", "cancelled")


@dataclass
class Generation:
    """What one lookup of a generation found."""

    id: str
    meta: dict[str, str]
    last_seq: int  # seq of the newest event in the stream (0: none yet)
    ended: bool  # the newest event is the end

    @property
    def status(self) -> str:
        return self.meta.get(Meta.STATUS, "queued")

    @property
    def finished(self) -> bool:
        return self.ended or self.status in TERMINAL


def parse_request(body: bytes, settings: Settings) -> ChatCompletionRequest:
    try:
        raw = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(raw, dict):
        raise InvalidRequest("request body must be a JSON object", code="invalid_json")
    try:
        request = ChatCompletionRequest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"])
        raise InvalidRequest(f"{param}: {first['msg']}", code="invalid_value", param=param) from None
    if len(request.messages) > settings.max_messages:
        raise InvalidRequest(
            f"messages: at most {settings.max_messages} messages are accepted", code="invalid_value", param="messages"
        )
    if request.token_limit is not None and request.token_limit > settings.max_tokens_limit:
        raise InvalidRequest(
            f"max_tokens: at most {settings.max_tokens_limit} tokens can be requested",
            code="invalid_value",
            param="max_tokens",
        )
    return request


def check_size(received: int, settings: Settings) -> None:
    if received > settings.max_body_bytes:
        raise PayloadTooLarge(f"request body is larger than {settings.max_body_bytes} bytes")


async def write_queued(redis: aioredis.Redis, gen_id: str, request: ChatCompletionRequest, owner: str = "") -> None:
    """The metadata of a generation that waits for its worker."""
    async with redis.pipeline(transaction=False) as pipe:
        _queued_meta(pipe, gen_id, request, owner)
        await pipe.execute()


def _queued_meta(pipe: Pipeline, gen_id: str, request: ChatCompletionRequest, owner: str) -> None:
    now = int(time.time())
    meta_key = keys.meta_key(gen_id)
    pipe.hset(
        meta_key,
        mapping={
            Meta.STATUS: "queued",
            Meta.MODEL: request.model,
            Meta.CREATED: now,
            Meta.REQUEST: request.model_dump_json(exclude_none=True),
            Meta.VIEWED_AT: now,
            Meta.OWNER: owner,
        },
    )
    pipe.expire(meta_key, keys.UNFINISHED_TTL_S)


async def enqueue(queue: ArqRedis, gen_ids: list[str], queue_name: str) -> None:
    """The generations' jobs (arq's format), then one wake-up for the workers, naming the queue
    and the jobs (see worker/main.py), in one round trip. arq's own ``enqueue_job`` first
    WATCHes the job key to refuse a duplicate id (three round trips); a new generation id is
    128 random bits, so there is none to refuse."""
    async with queue.pipeline(transaction=True) as pipe:
        _jobs(pipe, queue, gen_ids, queue_name)
        await pipe.execute()


def _jobs(pipe: Pipeline, queue: ArqRedis, gen_ids: list[str], queue_name: str) -> None:
    now_ms = timestamp_ms()
    for gen_id in gen_ids:
        job = serialize_job(keys.GENERATE_JOB, (gen_id,), {}, None, now_ms, serializer=queue.job_serializer)
        pipe.psetex(job_key_prefix + gen_id, queue.expires_extra_ms, job)
        pipe.zadd(queue_name, {gen_id: now_ms})
    pipe.publish(keys.WAKE_CHANNEL, " ".join([queue_name, *gen_ids]))


class Generations:
    def __init__(self, redis: aioredis.Redis, queue: ArqRedis, settings: Settings) -> None:
        self._redis = redis
        self._queue = queue
        self._settings = settings
        self._limits = Limits(redis, settings)
        # Creations of this moment (a burst of requests), written together by one task (_write).
        self._batch: list[tuple[str, ChatCompletionRequest, str, asyncio.Future[None]]] = []
        self._writes: set[asyncio.Task[None]] = set()

    async def create(self, request: ChatCompletionRequest, owner: str = "") -> str:
        """Every endpoint that starts a generation comes through here, so the per-key limits hold for all."""
        gen_id = new_generation_id()
        gen_id_var.set(gen_id)
        await self._limits.admit(owner, gen_id)  # over a limit: 429, and nothing is created
        written = asyncio.get_running_loop().create_future()
        self._batch.append((gen_id, request, owner, written))
        if len(self._batch) == 1:  # the first of this moment: write them all once the others have joined
            asyncio.get_running_loop().call_soon(self._start_write)
        try:
            await written
        except Exception:
            await self._limits.release(owner, gen_id)
            raise
        metrics.GENERATIONS_STARTED.inc()
        return gen_id

    def _start_write(self) -> None:
        batch, self._batch = self._batch, []
        task = asyncio.create_task(self._write(batch))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write(self, batch: list[tuple[str, ChatCompletionRequest, str, asyncio.Future[None]]]) -> None:
        """The metadata of every generation in ``batch``, their jobs and one wake-up: 20 requests
        at once cost one round trip, not 40. With the queue on a Redis of its own (or the
        events on a cluster), the metadata goes first, in a round trip of its own: a worker
        woken for a job must find its generation."""
        settings = self._settings
        gen_ids = [gen_id for gen_id, *_ in batch]
        try:
            if settings.one_redis:
                async with self._queue.pipeline(transaction=True) as pipe:
                    for gen_id, request, owner, _ in batch:
                        _queued_meta(pipe, gen_id, request, owner)
                    _jobs(pipe, self._queue, gen_ids, settings.queue_name)
                    await pipe.execute()
            else:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for gen_id, request, owner, _ in batch:
                        _queued_meta(pipe, gen_id, request, owner)
                    await pipe.execute()
                await enqueue(self._queue, gen_ids, settings.queue_name)
        except asyncio.CancelledError:  # the pod is stopping
            for *_, written in batch:
                written.cancel()
            raise
        except Exception as exc:
            for *_, written in batch:
                if not written.done():  # its request may have gone
                    written.set_exception(exc)
        else:
            for *_, written in batch:
                if not written.done():
                    written.set_result(None)

    async def get(self, gen_id: str) -> Generation:
        if not is_generation_id(gen_id):
            raise InvalidRequest(f"malformed generation id {gen_id[:64]!r}", code="invalid_generation_id")
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(keys.meta_key(gen_id))
            pipe.xrevrange(keys.events_key(gen_id), count=1)
            meta, newest = await pipe.execute()
        if not meta:
            raise NotFound(
                f"no generation {gen_id} (unknown, or its retention has passed)", code="generation_not_found"
            )
        last_seq = int(newest[0][0].partition(b"-")[0]) if newest else 0
        ended = bool(newest) and newest[0][1].get(b"k") == events.END
        return Generation(gen_id, {k.decode(): v.decode() for k, v in meta.items()}, last_seq, ended)

    async def content(self, gen_id: str) -> str:
        data = await self._redis.get(keys.content_key(gen_id))
        return data.decode() if data else ""

    async def describe(self, gen_id: str) -> dict[str, Any]:
        generation = await self.get(gen_id)
        meta = generation.meta
        return {
            "id": gen_id,
            "object": "generation",
            "status": generation.status,
            "model": meta.get(Meta.MODEL),
            "created": int(meta.get(Meta.CREATED, 0)),
            "content": await self.content(gen_id),
            "finish_reason": meta.get(Meta.FINISH_REASON) or None,
            "usage": orjson.loads(meta[Meta.USAGE]) if meta.get(Meta.USAGE) else None,
            "error": orjson.loads(meta[Meta.ERROR]) if meta.get(Meta.ERROR) else None,
            "reasoning": meta.get(Meta.REASONING) or None,
            "tool_calls": orjson.loads(meta[Meta.TOOL_CALLS]) if meta.get(Meta.TOOL_CALLS) else None,
            "last_event_id": meta.get(Meta.LAST_EVENT_ID),
        }

    async def cancel(self, gen_id: str, owner: str = "") -> str:
        generation = await self.get(gen_id)
        if generation.meta.get(Meta.OWNER, "") != owner:
            raise Forbidden("only the API key that created a generation can cancel it", code="not_owner")
        if generation.status == "cancelled":
            return "cancelled"
        if generation.finished:
            raise Conflict(f"generation {gen_id} has already {generation.status}", code="generation_finished")
        await self._redis.hset(keys.meta_key(gen_id), Meta.CANCEL, "1")  # type: ignore[misc]
        await self._queue.publish(keys.CANCEL_CHANNEL, gen_id)
        return "cancelling"
