"""The publisher: turns a generator's deltas into stream entries.

Tokens that arrive while a write is in flight are coalesced into one entry, and
each write is one pipeline (XADD…, APPEND content, read the cancel flag), so a
fast generator costs few round trips and a slow one adds no delay: the first
token after an idle moment is written at once. The writes of all the generations
a worker runs, made in one turn of its event loop, go to Redis together in one
pipeline (ScriptBatch): 20 generations starting at once cost one round trip for
their first tokens, not 20.

Entries carry explicit ids ``<seq>-0``. A write that is retried after a lost
reply re-sends the same ids; Redis refuses the ones already stored, so an event
is never duplicated. Each write is one Lua script that first checks the
generation is still running: once a reaper has ended it (shared/reaper.py), or
Redis has lost it, nothing more is written and the worker stops.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisClusterException
from redis.exceptions import TimeoutError as RedisTimeoutError

from fanline.shared import events, keys
from fanline.shared.events import Delta
from fanline.shared.ids import event_id
from fanline.shared.keys import Meta
from fanline.worker import metrics

log = logging.getLogger("fanline.worker")

_COALESCIBLE = ("content", "reasoning_content", "reasoning")

# KEYS: meta, events, content. ARGV: content offset, content bytes, maxlen,
# retention, n, then n outcome args (field, value, ...: written with the end, with
# the keys' expiry), then (id, kind, data, time) per entry. Returns {status, cancel}.
_PUBLISH = """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'running' then return {status or false, false} end
local n = tonumber(ARGV[5])
for i = 6 + n, #ARGV, 4 do
  local added = redis.pcall('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], ARGV[i],
                            'k', ARGV[i + 1], 'd', ARGV[i + 2], 't', ARGV[i + 3])
  if type(added) == 'table' and added.err and not string.find(added.err, 'equal or smaller') then
    return redis.error_reply(added.err)
  end
end
if ARGV[2] ~= '' then redis.call('SETRANGE', KEYS[3], ARGV[1], ARGV[2]) end
local cancel = redis.call('HGET', KEYS[1], 'cancel') or false
if n > 0 then
  redis.call('HSET', KEYS[1], unpack(ARGV, 6, 5 + n))
  for i = 1, 3 do redis.call('EXPIRE', KEYS[i], tonumber(ARGV[4])) end
else
  -- while running, the keys expire like the meta hash does, should nobody end it
  for i = 2, 3 do redis.call('EXPIRE', KEYS[i], UNFINISHED_TTL_S, 'NX') end
end
return {status, cancel}
""".replace("UNFINISHED_TTL_S", str(keys.UNFINISHED_TTL_S))
_RETRY_FOR_S = 30.0


class ScriptBatch:
    """Script calls made in one turn of the event loop, sent to one (non-cluster) Redis in
    one pipeline; each caller gets its own reply or error, as if it had called alone.

        batch = ScriptBatch(redis)
        reply = await batch.call(script, keys, args)   # instead of: await script(keys, args)
    """

    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis
        self._calls: list[tuple[AsyncScript, list[Any], list[Any], asyncio.Future[Any]]] = []
        self._sending: set[asyncio.Task[None]] = set()  # pipelines in flight, each short-lived

    async def call(self, script: AsyncScript, keys: list[Any], args: list[Any]) -> Any:
        future = asyncio.get_running_loop().create_future()
        self._calls.append((script, keys, args, future))
        if len(self._calls) == 1:  # the first of this turn: send them all once the others have joined
            asyncio.get_running_loop().call_soon(self._send)
        return await future

    def _send(self) -> None:
        calls, self._calls = self._calls, []
        task = asyncio.create_task(self._execute(calls))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _execute(self, calls: list[tuple[AsyncScript, list[Any], list[Any], asyncio.Future[Any]]]) -> None:
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for script, keys, args, _ in calls:
                    pipe.evalsha(script.sha, len(keys), *keys, *args)
                replies = await pipe.execute(raise_on_error=False)
        except asyncio.CancelledError:
            for *_, future in calls:
                future.cancel()
            raise
        except Exception as exc:  # Redis away: every caller retries its own write
            for *_, future in calls:
                if not future.done():
                    future.set_exception(exc)
            return
        for (script, keys, args, future), reply in zip(calls, replies, strict=True):
            if future.done():  # its caller has gone
                continue
            if isinstance(reply, NoScriptError):  # Redis restarted: the script's own call loads it
                try:
                    reply = await script(keys=keys, args=args)
                except Exception as exc:
                    reply = exc
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)


class Publisher:
    def __init__(
        self,
        redis: aioredis.Redis,
        gen_id: str,
        model: str,
        created: int,
        *,
        max_events: int,
        retention_s: int = 3600,
        batch: ScriptBatch | None = None,
    ) -> None:
        self._redis = redis
        self._script = redis.register_script(_PUBLISH)
        self._batch = batch  # shared with the worker's other generations, to write with theirs
        self._gen_id = gen_id
        self._events_key, self._meta_key, self._content_key = keys.generation_keys(gen_id)
        self._completion_id = events.completion_id(gen_id)
        self._model = model
        self._created = created
        self._max_events = max_events
        self._retention_s = retention_s
        self.final_status = b""  # the status the end's write sets
        self.reasoning: list[str] = []
        self.tool_calls: dict[int, dict[str, Any]] = {}
        self.seq = 0  # id of the last entry handed to Redis
        self._pending: list[tuple[bytes, Any]] = []  # (kind, a _Chunk, payload bytes, or the end's outcome)
        self._role_sent = False
        self._content_bytes = 0  # length of the content key, for idempotent SETRANGE
        self._flusher: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None
        self.cancel_requested = False
        # Set when the generation is no longer ours: a reaper declared this worker
        # lost, or Redis lost the generation. Nothing more is written then.
        self.disowned = False

    # -- producing ---------------------------------------------------------

    def add(self, delta: Delta) -> None:
        """One delta; a choice-level ``logprobs`` may ride along under that key."""
        if self._failure is not None:
            raise self._failure
        d: dict[str, Any] = dict(delta)
        logprobs = d.pop("logprobs", None)
        self._assemble(d)
        if not self._role_sent:
            d = {"role": "assistant", **d}
            self._role_sent = True
        last = self._pending[-1] if self._pending else None
        if logprobs is None and last is not None and isinstance(last[1], _Chunk) and last[1].merges(d):
            for name, text in d.items():
                last[1].delta[name] += text
        else:
            self._pending.append((events.CHUNK, _Chunk(d, logprobs=logprobs)))
        self._kick()

    def _assemble(self, delta: dict[str, Any]) -> None:
        """Keep the whole reasoning and tool calls, for the generation's final record."""
        for name in ("reasoning_content", "reasoning"):
            if isinstance(delta.get(name), str):
                self.reasoning.append(delta[name])
        for call in delta.get("tool_calls") or ():
            whole = self.tool_calls.setdefault(
                call.get("index", 0), {"id": None, "type": "function", "function": {"name": "", "arguments": ""}}
            )
            if call.get("id"):
                whole["id"] = call["id"]
            if call.get("type"):
                whole["type"] = call["type"]
            function = call.get("function") or {}
            whole["function"]["name"] += function.get("name") or ""
            whole["function"]["arguments"] += function.get("arguments") or ""

    def add_raw(self, kind: bytes, payload: bytes) -> None:
        self._pending.append((kind, payload))
        self._kick()

    async def finish(self, status: str, finish_reason: str, usage: dict[str, int] | None, include_usage: bool) -> None:
        """Publish the final chunk, the usage chunk if asked for, and the end.

        The outcome (status, finish_reason, usage, last_event_id) and the keys'
        expiry are written by the same script call as the end event, so whoever
        sees the end also sees the final status.
        """
        final: dict[str, Any] = {} if self._role_sent else {"role": "assistant", "content": ""}
        self._role_sent = True
        self._pending.append((events.CHUNK, _Chunk(final, finish_reason=finish_reason)))
        if include_usage and usage is not None:
            self.add_raw(events.CHUNK, events.usage_chunk(self._completion_id, self._created, self._model, usage))
        self._end({Meta.STATUS: status, Meta.FINISH_REASON: finish_reason, Meta.USAGE: _json(usage)})
        await self.drain()

    async def fail(self, message: str, code: str, usage: dict[str, int] | None = None) -> None:
        """Publish a terminal error and the end, with the outcome as in finish()."""
        self.add_raw(events.ERROR, events.error_payload(message, code))
        error = _json({"message": message, "code": code})
        self._end({Meta.STATUS: "failed", Meta.FINISH_REASON: "", Meta.USAGE: _json(usage), Meta.ERROR: error})
        await self.drain()

    def _end(self, outcome: dict[str, str]) -> None:
        self.final_status = outcome[Meta.STATUS].encode()
        outcome[Meta.REASONING] = "".join(self.reasoning)
        outcome[Meta.TOOL_CALLS] = _json([self.tool_calls[i] for i in sorted(self.tool_calls)] or None)
        self._pending.append((events.END, outcome))
        self._kick()

    async def drain(self) -> None:
        while self._flusher is not None:
            await asyncio.shield(self._flusher)
        if self._failure is not None:
            raise self._failure

    # -- writing -----------------------------------------------------------

    def _kick(self) -> None:
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush_loop(), name=f"publish-{self._gen_id}")

    async def _flush_loop(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                await self._write(batch)
        except BaseException as exc:  # surfaced to the producer by add()/drain()
            self._failure = exc
        finally:
            self._flusher = None

    def _encode(self, kind: bytes, item: Any) -> bytes:
        if kind == events.END:
            return b""
        if isinstance(item, _Chunk):
            return events.chunk(
                self._completion_id, self._created, self._model, item.delta, item.finish_reason, item.logprobs
            )
        return bytes(item)

    async def _write(self, batch: list[tuple[bytes, Any]]) -> None:
        entries = []
        text = ""
        outcome: dict[str, str] = {}
        for kind, item in batch:
            self.seq += 1
            entries.append((event_id(self.seq), events.entry_fields(kind, self._encode(kind, item))))
            if isinstance(item, _Chunk):
                text += item.delta.get("content") or ""
            elif kind == events.END:
                outcome = {**item, Meta.LAST_EVENT_ID: event_id(self.seq)}
        offset = self._content_bytes
        encoded = text.encode()
        self._content_bytes += len(encoded)
        # Redis may be away for a few seconds (a restart, a failover): retry the same
        # write, which is safe (see the module docstring), until it is back.
        deadline = time.monotonic() + _RETRY_FOR_S
        delay = 0.05
        while True:
            try:
                await self._send(entries, offset, encoded, outcome)
                metrics.PUBLISH_WRITES.inc()
                metrics.EVENTS_PUBLISHED.inc(len(entries))
                return
            except (RedisConnectionError, RedisTimeoutError, RedisClusterException) as exc:
                metrics.REDIS_ERRORS.labels("publish").inc()
                if time.monotonic() > deadline:
                    raise
                log.warning("publishing %s: %s; retrying in %.2f s", self._gen_id, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def _send(
        self,
        entries: list[tuple[str, dict[bytes, bytes]]],
        offset: int,
        text: bytes,
        outcome: dict[str, str] | None = None,
    ) -> None:
        fields = [x for pair in (outcome or {}).items() for x in pair]
        args: list[Any] = [offset, text, self._max_events, self._retention_s, len(fields), *fields]
        for entry_id, entry in entries:
            args += [entry_id, entry[b"k"], entry[b"d"], entry[b"t"]]
        script_keys = [self._meta_key, self._events_key, self._content_key]
        if self._batch is None:
            status, cancel = await self._script(keys=script_keys, args=args)
        else:
            status, cancel = await self._batch.call(self._script, script_keys, args)
        if cancel:
            self.cancel_requested = True
        # A retry of the final write finds the status it wrote itself: still ours.
        if status not in (b"running", self.final_status):
            self.disowned = True


def _json(value: Any) -> str:
    return "" if value is None else orjson.dumps(value).decode()


@dataclass
class _Chunk:
    """A chat.completion.chunk waiting to be written."""

    delta: dict[str, Any]
    finish_reason: str | None = None
    logprobs: Any = None

    def merges(self, delta: dict[str, Any]) -> bool:
        """Text deltas of the same kind(s) coalesce into one; anything else stays apart."""
        return (
            self.finish_reason is None
            and self.logprobs is None
            and bool(delta)
            and set(delta) == set(self.delta) - {"role"}
            and all(k in _COALESCIBLE and isinstance(delta[k], str) for k in delta)
        )
