"""Durable Streams storage on Redis/Valkey: create, append, close, read, fork, delete.

A stream is a Redis Stream of messages with explicit ids ``<seq>-0`` (seq 1, 2, 3…),
a metadata hash and a producers hash, all in one slot (shared/keys.py). Creating,
appending and closing are Lua scripts, so each is atomic on any number of API pods.

Offsets are ``<16 digits>_<16 digits>``: ``0000000000000000_<seq, 16 digits>``, the
offset *after* message ``seq`` (``…_0000000000000000`` is the start). They sort as
strings the way the messages sort. Message ``seq`` is stream entry ``<seq>-0``.

Closing writes one more entry, ``<tail + 1>-0`` with kind END (shared/events.py), which
carries no message and no offset: it is how the hub's shared reader learns that a
stream closed, and live readers end at it.

A fork (``Stream-Forked-From``) has its own keys; its messages start at the source's
seq where it forked, so offsets run on across the fork point, and reads stitch the
source chain's messages up to the fork point with the fork's own. Forks count
references on their source: a source deleted (or expired) while forks read it is
soft-deleted (410) and removed with its last fork.

Expiry (``Stream-TTL``, sliding from the last read or append; ``Stream-Expires-At``) is
checked on every access; Redis key expiry (``FANLINE_DS_RETENTION_S`` after the last
access, or just after the stream's own expiry) removes what nobody touches again.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis

from fanline.shared import events, keys
from fanline.shared.errors import Conflict, FanlineError, Gone, InvalidRequest, NotFound, PayloadTooLarge
from fanline.shared.keys import StreamMeta as M
from fanline.shared.settings import Settings

ZERO_OFFSET = "0000000000000000_0000000000000000"
_OFFSET = re.compile(r"([0-9]{1,16})_([0-9]{1,16})")
_BEYOND = 10**16  # a seq past any stream's tail
DEFAULT_CONTENT_TYPE = "application/octet-stream"

STREAM_CLOSED = "Stream-Closed"
NEXT_OFFSET = "Stream-Next-Offset"


def offset_of(seq: int) -> str:
    """The offset after message ``seq`` (``seq`` 0: the start)."""
    return f"0000000000000000_{seq:016d}"


def seq_of_offset(offset: str) -> int:
    """The seq an offset of ours stands after; an offset past every stream maps past any tail."""
    match = _OFFSET.fullmatch(offset)
    if match is None:
        raise InvalidRequest(f"malformed offset {offset[:64]!r}", code="invalid_offset", param="offset")
    return _BEYOND if int(match.group(1)) else int(match.group(2))


def normalize_content_type(value: str | None) -> str:
    return (value or "").split(";")[0].strip().lower()


def is_json(content_type: str | None) -> bool:
    return normalize_content_type(content_type) == "application/json"


def json_values(body: bytes, *, creating: bool) -> bytes:
    """A JSON-mode body as stored: its values (an array's elements) compact, comma-joined.

    b"" for an empty array on create; an empty array on append is a 400.
    """
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidRequest("Invalid JSON: the body is not valid JSON", code="invalid_json") from None
    if isinstance(parsed, list):
        if not parsed:
            if creating:
                return b""
            raise InvalidRequest("Empty arrays are not allowed: an append needs a value", code="empty_json_array")
        return b",".join(orjson.dumps(v) for v in parsed)
    return orjson.dumps(parsed)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class Info:
    """What one lookup of a stream's metadata found."""

    path: str
    meta: dict[str, str]

    @property
    def content_type(self) -> str:
        return self.meta.get(M.CONTENT_TYPE, DEFAULT_CONTENT_TYPE)

    @property
    def tail(self) -> int:
        return int(self.meta.get(M.TAIL, "0"))

    @property
    def next_offset(self) -> str:
        return offset_of(self.tail)

    @property
    def closed(self) -> bool:
        return self.meta.get(M.CLOSED) == "1"

    @property
    def soft_deleted(self) -> bool:
        return self.meta.get(M.SOFT_DELETED) == "1"

    @property
    def ttl(self) -> int | None:
        value = self.meta.get(M.TTL)
        return int(value) if value else None

    @property
    def expires_at(self) -> str | None:
        return self.meta.get(M.EXPIRES_AT) or None

    @property
    def data_key(self) -> str:
        """The Redis Stream of its messages (a generation's events, for a generation seen as a stream)."""
        return self.meta.get("_key") or keys.stream_keys(self.path)[1]

    @property
    def json(self) -> bool:
        return is_json(self.content_type)

    @property
    def forked_from(self) -> str | None:
        return self.meta.get(M.FORKED_FROM) or None

    @property
    def fork_seq(self) -> int:
        return int(self.meta.get(M.FORK_SEQ, "0"))

    @property
    def refs(self) -> int:
        return int(self.meta.get(M.REFS, "0"))

    def expired(self, now_ms: int) -> bool:
        exp_ms = self.meta.get(M.EXPIRES_AT_MS)
        if exp_ms and now_ms >= int(exp_ms):
            return True
        ttl = self.ttl
        return ttl is not None and now_ms >= int(self.meta.get(M.ACCESSED_MS, "0")) + ttl * 1000


@dataclass
class Message:
    seq: int
    data: bytes

    @property
    def offset(self) -> str:
        return offset_of(self.seq)


# The Redis-side expiry of a stream's keys (ARGV tail, shared by the scripts): the
# stream's own expiry plus a minute, else the retention after this access; never
# while forks read it (refs > 0: their reads need its messages).
_EXPIRE_KEYS = """
local function expire_keys(now)
  if tonumber(redis.call('HGET', KEYS[1], 'refs') or '0') > 0 then
    for i = 1, 3 do redis.call('PERSIST', KEYS[i]) end
    return
  end
  local at = now + tonumber(ARGV[1]) * 1000
  local exp_ms = redis.call('HGET', KEYS[1], 'exp_ms')
  local ttl = redis.call('HGET', KEYS[1], 'ttl')
  if exp_ms then at = math.min(at, tonumber(exp_ms) + 60000) end
  if ttl then at = math.min(at, now + tonumber(ttl) * 1000 + 60000) end
  for i = 1, 3 do redis.call('PEXPIREAT', KEYS[i], at) end
end
"""

# KEYS: meta, data, producers. ARGV: retention_s, now_ms, content type, ttl, expires-at,
# expires-at ms, closed (0/1), forked from, fork seq, fork offset given (0/1), sub-offset,
# then the messages. Returns {'created'|'exists'|'conflict'|'soft', tail, closed}.
_CREATE = (
    _EXPIRE_KEYS
    + """
local now = tonumber(ARGV[2])
local function norm(ct)
  ct = string.lower(string.match(ct or '', '^[^;]*') or '')
  ct = string.match(ct, '^%s*(.-)%s*$')
  if ct == '' then return 'application/octet-stream' end
  return ct
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  local m = redis.call('HMGET', KEYS[1], 'ct', 'ttl', 'exp', 'closed', 'from', 'fork', 'sub', 'soft', 'tail')
  if m[8] == '1' then return {'soft', 0, 0} end
  local same = norm(ARGV[3]) == norm(m[1]) and (ARGV[4] == (m[2] or '')) and (ARGV[5] == (m[3] or ''))
    and (ARGV[7] == (m[4] or '0')) and (ARGV[8] == (m[5] or ''))
    and (ARGV[10] == '0' or ARGV[9] == (m[6] or ''))
    and ((ARGV[11] == '' and '0' or ARGV[11]) == (m[7] or '0'))
  if same then return {'exists', tonumber(m[9]), tonumber(m[4] or '0')} end
  return {'conflict', 0, 0}
end
local tail = tonumber(ARGV[9] ~= '' and ARGV[9] or '0')
local fields = {'ct', ARGV[3], 'acc', now, 'bytes', 0, 'refs', 0}
local function add(k, v) if v ~= '' then fields[#fields + 1] = k; fields[#fields + 1] = v end end
add('ttl', ARGV[4]); add('exp', ARGV[5]); add('exp_ms', ARGV[6]); add('from', ARGV[8])
if ARGV[8] ~= '' then add('fork', ARGV[9]); add('sub', ARGV[11]) end
local bytes = 0
for i = 12, #ARGV do
  tail = tail + 1
  redis.call('XADD', KEYS[2], tail .. '-0', 'd', ARGV[i])
  bytes = bytes + #ARGV[i]
end
fields[6] = bytes
add('tail', tostring(tail))
if ARGV[7] == '1' then
  add('closed', '1')
  redis.call('XADD', KEYS[2], (tail + 1) .. '-0', 'k', 'd')
end
redis.call('HSET', KEYS[1], unpack(fields))
expire_keys(now)
return {'created', tail, tonumber(ARGV[7])}
"""
)

# KEYS: meta, data, producers. ARGV: retention_s, now_ms, content type (normalized; '' for
# close-only), Stream-Seq, producer id ('' for none), epoch, seq, close (0/1), max stream
# bytes (0: unlimited), then the messages (none: close-only).
# Returns {verdict, tail, a, b}; verdicts:
#   missing | soft | closed (409) | duplicate_closed (a: seq) | content_type | stale_epoch (a: epoch)
#   | bad_epoch_seq | gap (a: expected, b: received) | duplicate (a: last seq, b: closed)
#   | stream_seq | full | ok (a: closed)
_APPEND = (
    _EXPIRE_KEYS
    + """
local now = tonumber(ARGV[2])
if redis.call('EXISTS', KEYS[1]) == 0 then return {'missing', 0, 0, 0} end
local m = redis.call('HMGET', KEYS[1], 'ct', 'tail', 'closed', 'closed_by', 'lseq', 'bytes', 'soft')
if m[7] == '1' then return {'soft', 0, 0, 0} end
local tail = tonumber(m[2])
local pid, close = ARGV[5], ARGV[8] == '1'
local tuple = pid .. '\\n' .. ARGV[6] .. '\\n' .. ARGV[7]
local data_count = #ARGV - 9
if m[3] == '1' then
  if pid ~= '' and m[4] == tuple then return {'duplicate_closed', tail, tonumber(ARGV[7]), 0} end
  if pid == '' and data_count == 0 then return {'ok', tail, 1, 0} end  -- closing again: idempotent
  return {'closed', tail, 0, 0}
end
if data_count > 0 then
  local ct = string.lower(string.match(m[1] or '', '^[^;]*') or '')
  ct = string.match(ct, '^%s*(.-)%s*$')
  if ARGV[3] ~= ct then return {'content_type', tail, 0, 0} end
end
local state
if pid ~= '' then
  local epoch, seq = tonumber(ARGV[6]), tonumber(ARGV[7])
  local current = redis.call('HGET', KEYS[3], pid)
  if not current then
    if seq ~= 0 then return {'gap', tail, 0, seq} end
  else
    local e, s = string.match(current, '^(%d+):(%d+)$')
    e, s = tonumber(e), tonumber(s)
    if epoch < e then return {'stale_epoch', tail, e, 0} end
    if epoch > e then
      if seq ~= 0 then return {'bad_epoch_seq', tail, 0, 0} end
    elseif seq <= s then
      return {'duplicate', tail, s, 0}
    elseif seq ~= s + 1 then
      return {'gap', tail, s + 1, seq}
    end
  end
  state = ARGV[6] .. ':' .. ARGV[7]
end
if ARGV[4] ~= '' and m[5] and ARGV[4] <= m[5] then return {'stream_seq', tail, 0, 0} end
local bytes = tonumber(m[6] or '0')
for i = 10, #ARGV do bytes = bytes + #ARGV[i] end
if tonumber(ARGV[9]) > 0 and bytes > tonumber(ARGV[9]) then return {'full', tail, 0, 0} end
for i = 10, #ARGV do
  tail = tail + 1
  redis.call('XADD', KEYS[2], tail .. '-0', 'd', ARGV[i])
end
local fields = {'tail', tail, 'bytes', bytes, 'acc', now}
if ARGV[4] ~= '' then fields[#fields + 1] = 'lseq'; fields[#fields + 1] = ARGV[4] end
if close then
  fields[#fields + 1] = 'closed'; fields[#fields + 1] = '1'
  if pid ~= '' then fields[#fields + 1] = 'closed_by'; fields[#fields + 1] = tuple end
  redis.call('XADD', KEYS[2], (tail + 1) .. '-0', 'k', 'd')
end
redis.call('HSET', KEYS[1], unpack(fields))
if state then redis.call('HSET', KEYS[3], pid, state) end
expire_keys(now)
return {'ok', tail, close and 1 or 0, 0}
"""
)

# KEYS: meta, data, producers. ARGV: retention_s, now_ms. Refreshes the access time of a
# stream that exists (a bare HSET would bring back an expired one).
_TOUCH = (
    _EXPIRE_KEYS
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'acc', ARGV[2])
expire_keys(tonumber(ARGV[2]))
return 1
"""
)

# KEYS: meta, data, producers. ARGV: soft-delete only (0/1). Returns {'missing'|'soft'|'deleted', from}.
_DELETE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'missing', ''} end
local m = redis.call('HMGET', KEYS[1], 'refs', 'from', 'soft')
if tonumber(m[1] or '0') > 0 or ARGV[1] == '1' then
  redis.call('HSET', KEYS[1], 'soft', '1')
  for i = 1, 3 do redis.call('PERSIST', KEYS[i]) end
  return {'soft', m[2] or ''}
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
return {'deleted', m[2] or ''}
"""

# KEYS: meta, data, producers of a source. ARGV: retention_s, now_ms, delta. Changes its
# fork count; returns {refs, soft}.
_REFS = (
    _EXPIRE_KEYS
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, 0} end
local refs = redis.call('HINCRBY', KEYS[1], 'refs', ARGV[3])
if refs < 0 then redis.call('HSET', KEYS[1], 'refs', 0); refs = 0 end
expire_keys(tonumber(ARGV[2]))
return {refs, redis.call('HGET', KEYS[1], 'soft') == '1' and 1 or 0}
"""
)


def _decode(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Streams:
    """The Durable Streams of one Redis (or Cluster)."""

    def __init__(self, redis: aioredis.Redis, settings: Settings) -> None:
        self._redis = redis
        self.settings = settings
        self._create = redis.register_script(_CREATE)
        self._append = redis.register_script(_APPEND)
        self._touch = redis.register_script(_TOUCH)
        self._delete = redis.register_script(_DELETE)
        self._refs = redis.register_script(_REFS)

    # -- lookups -----------------------------------------------------------

    async def info(self, path: str) -> Info | None:
        """The stream's metadata; None if there is none (or it expired, then it is removed)."""
        raw = await self._redis.hgetall(keys.stream_keys(path)[0])  # type: ignore[misc]
        if not raw:
            return None
        info = Info(path, {_decode(k): _decode(v) for k, v in raw.items()})
        if not info.soft_deleted and info.expired(_now_ms()):
            await self._remove(path, soft=True)  # soft if forks read it; else gone
            return await self.info(path) if info.refs > 0 else None
        return info

    async def get(self, path: str) -> Info:
        """The stream, or NotFound (404) / Gone (410, soft-deleted while forks read it)."""
        info = await self.info(path)
        if info is None:
            raise NotFound(f"Stream not found: no stream at {path}", code="stream_not_found")
        if info.soft_deleted:
            raise Gone(f"Stream is gone: {path} was deleted; its forks still read it", code="stream_gone")
        return info

    async def touch(self, path: str) -> None:
        await self._touch(keys=list(keys.stream_keys(path)), args=[self.settings.ds_retention_s, _now_ms()])

    # -- create ------------------------------------------------------------

    async def create(
        self,
        path: str,
        *,
        content_type: str | None,
        ttl: int | None,
        expires_at: str | None,
        expires_at_ms: int | None,
        body: bytes,
        closed: bool,
        forked_from: str | None = None,
        fork_offset: str | None = None,
        fork_sub_offset: int | None = None,
    ) -> tuple[bool, Info]:
        """Creates the stream, or finds it made with the same settings; (created, info)."""
        prefix: bytes = b""
        fork_seq = ""
        source: Info | None = None
        if forked_from is not None:
            source = await self.info(forked_from)
            if source is None:
                raise NotFound(f"Source stream not found: {forked_from}", code="source_not_found")
            if source.soft_deleted:
                raise Conflict(
                    f"source stream {forked_from} was deleted but still has active forks", code="source_gone"
                )
            if content_type and normalize_content_type(content_type) != normalize_content_type(source.content_type):
                raise Conflict("Content type mismatch with source stream", code="content_type_mismatch")
            seq = source.tail if fork_offset is None else seq_of_offset(fork_offset)
            if seq > source.tail:
                raise InvalidRequest("Fork offset beyond source stream length", code="invalid_fork_offset")
            fork_seq = str(seq)
            if fork_sub_offset:
                prefix = await self._sub_offset_prefix(source, seq, fork_sub_offset)
            if not content_type:
                content_type = source.content_type
            if ttl is None and expires_at is None:
                ttl, expires_at = source.ttl, source.expires_at
                expires_at_ms = int(source.meta[M.EXPIRES_AT_MS]) if source.meta.get(M.EXPIRES_AT_MS) else None
        content_type = content_type or DEFAULT_CONTENT_TYPE
        messages = [prefix] if prefix else []
        if body:
            data = json_values(body, creating=True) if is_json(content_type) else body
            if data:
                messages.append(data)
        self._check_size(sum(len(m) for m in messages))
        verdict, _, _ = await self._create(
            keys=list(keys.stream_keys(path)),
            args=[
                self.settings.ds_retention_s,
                _now_ms(),
                content_type,
                "" if ttl is None else str(ttl),
                expires_at or "",
                "" if expires_at_ms is None else str(expires_at_ms),
                "1" if closed else "0",
                forked_from or "",
                fork_seq,
                "0" if fork_offset is None else "1",
                str(fork_sub_offset) if fork_sub_offset else "",
                *messages,
            ],
        )
        verdict = _decode(verdict)
        if verdict == "soft":
            raise Conflict(
                f"stream {path} was deleted but still has active forks: the path cannot be reused yet",
                code="stream_has_forks",
            )
        if verdict == "conflict":
            raise Conflict(f"Stream already exists with different configuration: {path}", code="stream_exists")
        if verdict == "created" and forked_from is not None:
            await self._refs(
                keys=list(keys.stream_keys(forked_from)), args=[self.settings.ds_retention_s, _now_ms(), 1]
            )
        return verdict == "created", await self.get(path)

    async def _sub_offset_prefix(self, source: Info, fork_seq: int, sub: int) -> bytes:
        following = await self.read(source, fork_seq, max_bytes=1)
        if not following:
            raise InvalidRequest("Invalid fork sub-offset: no data past the fork offset", code="invalid_fork_offset")
        first = following[0].data
        if source.json:
            values = orjson.loads(b"[" + first + b"]")
            if sub > len(values):
                raise InvalidRequest("Invalid fork sub-offset: past the message's values", code="invalid_fork_offset")
            return b",".join(orjson.dumps(v) for v in values[:sub])
        if sub > len(first):
            raise InvalidRequest("Invalid fork sub-offset: past the message's bytes", code="invalid_fork_offset")
        return first[:sub]

    def _check_size(self, size: int) -> None:
        limit = self.settings.ds_max_stream_bytes
        if limit and size > limit:
            raise PayloadTooLarge(f"a stream holds at most {limit} bytes", code="stream_too_large")

    # -- append and close -----------------------------------------------------

    async def append(
        self,
        info: Info,
        data: bytes | None,
        *,
        content_type: str,
        stream_seq: str | None,
        producer: tuple[str, int, int] | None,
        close: bool,
    ) -> dict[str, str]:
        """Appends ``data`` (None: close only) as one message; the response headers of a success.

        Raises the protocol's errors (409 closed / content type / Stream-Seq, 403 stale epoch,
        409 producer gap, 400 new epoch not at 0, 413 stream full); a duplicate of an
        accepted producer append succeeds without appending (``dup`` header set to "1").
        """
        pid, epoch, pseq = producer or ("", 0, 0)
        messages: list[bytes] = []
        if data is not None:
            # JSON is checked only where the script would accept it (open, same type): a closed
            # stream or a mismatched type is the script's 409, whatever the body.
            as_json = info.json and not info.closed and is_json(content_type)
            messages = [json_values(data, creating=False) if as_json else data]
        verdict, tail, a, b = await self._append(
            keys=list(keys.stream_keys(info.path)),
            args=[
                self.settings.ds_retention_s,
                _now_ms(),
                normalize_content_type(content_type) if data is not None else "",
                stream_seq or "",
                pid,
                epoch,
                pseq,
                "1" if close else "0",
                self.settings.ds_max_stream_bytes,
                *messages,
            ],
        )
        verdict, tail, a, b = _decode(verdict), int(tail), int(a), int(b)
        offset = offset_of(tail)
        if verdict == "missing":
            raise NotFound(f"Stream not found: no stream at {info.path}", code="stream_not_found")
        if verdict == "soft":
            raise Gone(f"Stream is gone: {info.path} was deleted; its forks still read it", code="stream_gone")
        if verdict == "closed":
            raise Conflict(
                "Stream is closed: nothing more can be appended",
                code="stream_closed",
                headers={STREAM_CLOSED: "true", NEXT_OFFSET: offset},
            )
        if verdict == "content_type":
            raise Conflict(
                f"Content-type mismatch: the stream is {info.content_type}, the body {content_type}",
                code="content_type_mismatch",
            )
        if verdict == "stale_epoch":
            raise _Fenced(f"Stale producer epoch: the producer's epoch is now {a}", headers={"Producer-Epoch": str(a)})
        if verdict == "bad_epoch_seq":
            raise InvalidRequest("New epoch must start with sequence 0", code="invalid_producer_seq")
        if verdict == "gap":
            raise Conflict(
                f"Producer sequence gap: expected {a}, received {b}",
                code="producer_sequence_gap",
                headers={"Producer-Expected-Seq": str(a), "Producer-Received-Seq": str(b)},
            )
        if verdict == "stream_seq":
            raise Conflict("Sequence conflict: Stream-Seq must increase", code="stream_seq_conflict")
        if verdict == "full":
            raise PayloadTooLarge(
                f"a stream holds at most {self.settings.ds_max_stream_bytes} bytes", code="stream_too_large"
            )
        headers = {NEXT_OFFSET: offset}
        if pid:
            headers["Producer-Epoch"] = str(epoch)
            headers["Producer-Seq"] = str(a if verdict in ("duplicate", "duplicate_closed") else pseq)
        if verdict == "duplicate_closed" or (verdict == "ok" and a) or (verdict == "duplicate" and info.closed):
            headers[STREAM_CLOSED] = "true"
        if verdict in ("duplicate", "duplicate_closed"):
            headers["dup"] = "1"
        return headers

    # -- read -------------------------------------------------------------------

    async def read(self, info: Info, after: int, *, max_bytes: int | None = None) -> list[Message]:
        """Messages after seq ``after``, the fork's source chain stitched in, up to about ``max_bytes``."""
        budget = max_bytes if max_bytes is not None else self.settings.ds_max_read_bytes
        messages: list[Message] = []
        if info.forked_from and after < info.fork_seq:
            messages = await self._read_chain(info.forked_from, after, info.fork_seq, budget)
            if len(messages) and sum(len(m.data) for m in messages) >= budget:
                return messages
            after = info.fork_seq
        messages += await self._read_own(info.data_key, max(after, info.fork_seq), info.tail, budget)
        return messages

    async def _read_chain(self, path: str, after: int, cap: int, budget: int) -> list[Message]:
        # Soft-deleted sources are read through: their forks still need them.
        raw = await self._redis.hgetall(keys.stream_keys(path)[0])  # type: ignore[misc]
        if not raw:
            return []
        source = Info(path, {_decode(k): _decode(v) for k, v in raw.items()})
        messages: list[Message] = []
        if source.forked_from and after < source.fork_seq:
            messages = await self._read_chain(source.forked_from, after, min(source.fork_seq, cap), budget)
            after = source.fork_seq
        if after < cap:
            messages += await self._read_own(source.data_key, after, cap, budget)
        return messages

    async def _read_own(self, data_key: str, after: int, cap: int, budget: int) -> list[Message]:
        messages: list[Message] = []
        if after >= cap:
            return messages
        size = 0
        while after < cap:
            entries = await self._redis.xrange(data_key, min=f"{after + 1}-0", max=f"{cap}-0", count=1000)
            if not entries:
                break
            for entry_id, fields in entries:
                event = events.Event.from_entry(entry_id, fields)
                after = event.seq
                if event.is_end:
                    continue
                messages.append(Message(event.seq, event.data))
                size += len(event.data)
                if size >= budget:
                    return messages
            if len(entries) < 1000:
                break
        return messages

    # -- delete -----------------------------------------------------------------

    async def delete(self, path: str) -> None:
        await self.get(path)  # 404 / 410 as for any request to it
        await self._remove(path, soft=False)

    async def _remove(self, path: str, *, soft: bool) -> None:
        """Deletes the stream (soft while forks read it) and, when it was a fork, releases its source."""
        verdict, source = await self._delete(keys=list(keys.stream_keys(path)), args=["0"])
        verdict, source = _decode(verdict), _decode(source)
        if verdict == "deleted" and source:
            refs, soft_source = await self._refs(
                keys=list(keys.stream_keys(source)), args=[self.settings.ds_retention_s, _now_ms(), -1]
            )
            if int(refs) == 0 and int(soft_source):
                await self._remove(source, soft=False)  # the last fork of a deleted source: it goes too


class _Fenced(FanlineError):
    """A stale producer epoch: a newer producer took over (zombie fencing)."""

    status = 403
    type = "permission_error"
    code = "stale_producer_epoch"
