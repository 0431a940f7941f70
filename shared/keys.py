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

# Pub/sub channels on the queue Redis. WAKE tells workers a job was enqueued (so
# job start does not wait on arq's polling); CANCEL carries a generation id.
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
