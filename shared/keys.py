"""Every Redis name fanline uses, in one place.

One generation's keys share a hash tag, so they live in one Redis Cluster slot
and can be written by one Lua script. The tag is the generation's *shard* (the
first two hex digits of its id: 256 shards), not the whole id — a deliberate
deviation from the obvious ``{gen_id}`` tag: a blocking XREAD may only name keys
of one slot, so with shard tags one XREAD covers every watched generation of a
shard, and a pod on a cluster needs at most 256 readers however many
generations it serves. The 256 slots spread over the cluster's nodes.

    fanline:{3f}:3f9c…e1:events    the stream (ids <seq>-0)
    fanline:{3f}:3f9c…e1:meta      the metadata hash (fields: Meta below)
    fanline:{3f}:3f9c…e1:content   all content text so far

An API key's limits (api/limits.py) have a tag of their own, the key's owner name:

    fanline:{key:9b1e…}:live       its queued or running generations (sorted set)
    fanline:{key:9b1e…}:recent     its generations started in the last minute (sorted set)
"""

from __future__ import annotations

import hashlib

PREFIX = "fanline"


def shard(gen_id: str) -> str:
    return gen_id[:2]


def _base(gen_id: str) -> str:
    return f"{PREFIX}:{{{shard(gen_id)}}}:{gen_id}"


def events_key(gen_id: str) -> str:
    """The generation's Redis Stream: one entry per event, ids ``<seq>-0``."""
    return f"{_base(gen_id)}:events"


def meta_key(gen_id: str) -> str:
    """The generation's metadata hash (fields below)."""
    return f"{_base(gen_id)}:meta"


def content_key(gen_id: str) -> str:
    """All content text so far: the worker writes it with SETRANGE at known offsets."""
    return f"{_base(gen_id)}:content"


def generation_keys(gen_id: str) -> tuple[str, str, str]:
    return events_key(gen_id), meta_key(gen_id), content_key(gen_id)


def ai_sdk_chat_key(owner: str, chat_id: str) -> str:
    """The generation id of an AI SDK chat's latest answer (for its resume endpoint).

    Chat ids are chosen by clients, so the key includes the API key's owner name:
    one key's holder cannot reach another's chat by guessing its id.
    """
    return f"{PREFIX}:ai-sdk:{{{owner}:{chat_id}}}:latest"


def key_live_key(owner: str) -> str:
    """The API key's generations that are queued or running: a sorted set of ids scored by
    the unix time at which an entry is stale (its worker never ended it). api/limits.py
    adds an id, the worker removes it when the generation ends.

    The per-key keys share a hash tag of their own (``{key:<owner>}``), so one Lua script
    checks and updates both; ``owner`` is ``Auth.owner_of(key)``, never the key itself.
    """
    return f"{PREFIX}:{{key:{owner}}}:live"


def key_recent_key(owner: str) -> str:
    """The API key's generation-creating requests of the last ``RATE_WINDOW_S``: a sorted set
    of generation ids scored by their admission time (a sliding window log)."""
    return f"{PREFIX}:{{key:{owner}}}:recent"


# The window of FANLINE_KEY_RATE_PER_MIN, in seconds.
RATE_WINDOW_S = 60

# Generations being run, scored by their worker's last heartbeat (unix seconds):
# what the reaper (shared/reaper.py) scans for dead workers. On the *queue* Redis,
# apart from the generations' own keys, so a Cluster node's failover does not stop it.
RUNNING = f"{PREFIX}:running"

# Pub/sub channels on the queue Redis. WAKE tells workers jobs were enqueued (so job
# start does not wait on arq's polling): "<queue name> <job id> ...", where a job id is
# its generation id; a message without ids asks for a poll. CANCEL carries a generation id.
WAKE_CHANNEL = f"{PREFIX}:wake"
CANCEL_CHANNEL = f"{PREFIX}:cancel"

# arq job function name.
GENERATE_JOB = "generate"


class Meta:
    """Field names of the metadata hash."""

    STATUS = "status"  # queued | running | completed | failed | cancelled
    MODEL = "model"
    CREATED = "created"  # unix seconds
    REQUEST = "request"  # the validated request body, JSON
    FINISH_REASON = "finish_reason"
    USAGE = "usage"  # JSON
    ERROR = "error"  # JSON {"message", "type", "code"}
    LAST_EVENT_ID = "last_event_id"  # id of the terminal event, once finished
    CANCEL = "cancel"  # "1" once a cancel was requested
    HEARTBEAT = "heartbeat"  # unix seconds, written by the worker running it
    VIEWED_AT = "viewed_at"  # unix seconds, refreshed by API pods with viewers
    REASONING = "reasoning"  # all reasoning text, once finished
    TOOL_CALLS = "tool_calls"  # the assembled tool calls (JSON), once finished
    OWNER = "owner"  # which API key created it (a hash; "" with auth off)


# Time a generation's keys live before it has finished (queued or running): long
# enough for any generation, short enough that an abandoned one goes away.
UNFINISHED_TTL_S = 24 * 3600


# -- Durable Streams (shared/streams.py) --------------------------------------
#
# A Durable Stream is named by its URL path, chosen by clients: its keys are named by
# the path's SHA-256 (no client text in a key name) and tagged with the first two hex
# digits of it, the same 256 shard tags as generations, so the hub's per-shard reader
# follows streams and generations of a shard with one XREAD on a Cluster.
#
#     fanline:{9b}:ds:9b1e…:data       the messages (a Redis Stream, ids <seq>-0)
#     fanline:{9b}:ds:9b1e…:meta       the metadata hash (fields: StreamMeta below)
#     fanline:{9b}:ds:9b1e…:producers  idempotent producers: id → "<epoch>:<last seq>"


def stream_id(path: str) -> str:
    return hashlib.sha256(path.encode()).hexdigest()


def _stream_base(path: str) -> str:
    digest = stream_id(path)
    return f"{PREFIX}:{{{digest[:2]}}}:ds:{digest}"


def stream_keys(path: str) -> tuple[str, str, str]:
    """The stream's meta hash, data stream and producers hash (one slot)."""
    base = _stream_base(path)
    return f"{base}:meta", f"{base}:data", f"{base}:producers"


def stream_shard(path: str) -> str:
    return stream_id(path)[:2]


class StreamMeta:
    """Field names of a Durable Stream's metadata hash."""

    CONTENT_TYPE = "ct"  # as the creator sent it
    TAIL = "tail"  # seq of the newest message (0: none); its offset is the stream's next offset
    CLOSED = "closed"  # "1" once closed
    CLOSED_BY = "closed_by"  # "<producer id>\\n<epoch>\\n<seq>" of a producer's closing append
    TTL = "ttl"  # Stream-TTL, seconds (sliding: from the last read or append)
    EXPIRES_AT = "exp"  # Stream-Expires-At, as sent
    EXPIRES_AT_MS = "exp_ms"  # the same, unix milliseconds
    ACCESSED_MS = "acc"  # last read or append, unix milliseconds
    BYTES = "bytes"  # data appended so far
    LAST_STREAM_SEQ = "lseq"  # the last Stream-Seq (writer coordination)
    REFS = "refs"  # forks reading through this stream
    SOFT_DELETED = "soft"  # "1": deleted (or expired) while forks still read it
    FORKED_FROM = "from"  # the source stream's path
    FORK_SEQ = "fork"  # seq in the source at which the fork starts
    FORK_SUB_OFFSET = "sub"  # Stream-Fork-Sub-Offset, as sent
