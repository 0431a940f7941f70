"""The hub: one per API process, it reads each watched generation from Redis once
and fans the events out to every local viewer.

    Redis stream ──XREAD BLOCK (one reader, all generations)──▶ Topic ring (bounded)
                                                                  │  each Event encoded
                                                                  │  once per transport
                        viewer cursor ◀── batch of events ◀───────┘
                        (behind the ring? XRANGE from Redis at its own pace)

A viewer is a cursor (the seq of the last event it was sent) into its topic's
ring of recent events. There is no per-viewer queue: a viewer that is slow
simply has an older cursor; once that falls out of the ring it reads Redis
history with XRANGE until it catches up. The reader never waits for a viewer.

New topics: the reader is blocked in XREAD on the old key set when a viewer of a
new generation arrives, so adding a topic ends that read at once (CLIENT UNBLOCK,
see _Reader) and the loop reads again with the new set. No event can be lost by
that: a topic's position only advances when events are appended.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from fanline.api import metrics
from fanline.shared import keys
from fanline.shared.connections import UNAVAILABLE
from fanline.shared.errors import Conflict
from fanline.shared.events import END, ERROR, Event, error_payload
from fanline.shared.ids import event_id
from fanline.shared.settings import Settings

log = logging.getLogger("fanline.hub")

_READ_COUNT = 1000  # entries per stream per XREAD
# A topic's sink writes: a burst of this many seconds' budget may go out at once (a whole
# pass to ~1,000 sinks at the default budget), then slices of this many seconds' worth.
_BURST_S = 0.015
_SLICE_S = 0.001
_VIEWED_REFRESH_S = 2.0


def encode(frame: Callable[[Event], bytes], batch: list[Event]) -> bytes:
    """A batch of events in one transport's frames, as one write."""
    return frame(batch[0]) if len(batch) == 1 else b"".join([frame(e) for e in batch])


class Sink:
    """A viewer that is caught up with the live tail and whose socket takes bytes at once:
    the topic writes new events to it directly, with no task of its own woken per event.

    ``frame`` must give the same bytes for an event to every viewer of the transport
    ``name`` (the topic encodes a batch once per transport and position, ``wrap`` frames it
    once for the wire, e.g. an HTTP chunk); ``write`` hands the bytes to the socket and
    says whether the viewer can take more now (False: its socket is backed up or gone).
    ``ready`` says whether it may join (its socket holds nothing unsent).
    """

    __slots__ = ("cursor", "ended", "frame", "heartbeat", "name", "ready", "waiter", "wrap", "write")

    def __init__(
        self,
        name: str,
        heartbeat: bytes,
        frame: Callable[[Event], bytes],
        wrap: Callable[[bytes], bytes],
        write: Callable[[bytes], bool],
        ready: Callable[[], bool],
    ) -> None:
        self.name = name
        self.heartbeat = heartbeat
        self.frame = frame
        self.wrap = wrap
        self.write = write
        self.ready = ready
        self.cursor = 0  # the seq of the last event written to it
        self.ended = False  # the end event was written
        self.waiter: asyncio.Future[None] | None = None  # resolved when it leaves the topic's sinks


class Topic:
    """One generation (or Durable Stream) watched on this pod: its recent events, and its waiting viewers.

    Viewers that are behind, or whose transport cannot share frames, park on a future and
    their task writes (``waiters``). Caught-up viewers of SSE and NDJSON are ``sinks``: new
    events are written to them straight from here, in passes over all of them (``_flush``).
    A pass costs about one socket write per sink, and at most ``writes_per_s`` sink writes
    a second are spent (a token bucket holding ``_BURST_S`` of them): with few sinks a pass
    is written whole as soon as events arrive; with more, the pass goes on in slices of
    ~1 ms worth of writes, so each sink is written about every sinks/writes_per_s seconds
    with every event since its last write (adaptive coalescing). One pod thus keeps up
    with thousands of viewers of one generation at a bounded CPU cost, and an event waits
    at most about one pass, not a pause for the budget and then its place in a long pass.
    """

    def __init__(
        self,
        gen_id: str,
        start_seq: int,
        capacity: int,
        raw: tuple[bytes, str] | None = None,
        *,
        batch: int = 256,
        writes_per_s: float = 0.0,
    ) -> None:
        self.gen_id = gen_id
        # A generation's events key and shard; or, for a Durable Stream (api/streams.py),
        # the raw stream key and shard tag it names.
        self.generation = raw is None
        self.key, self.shard = raw or (keys.events_key(gen_id).encode(), keys.shard(gen_id))
        # The recent events, contiguous; a list (slices are cheap) trimmed to
        # ``capacity`` in halves, so a trim costs O(1) per appended event.
        self.ring: list[Event] = []
        self.capacity = capacity
        self.last_seq = start_seq  # the reader reads strictly after this
        self.finished = False
        self.viewers = 0
        # Each waiting viewer parks on a future of its own (cancelling one viewer
        # cannot disturb the others); whoever has news resolves them all.
        self.waiters: list[asyncio.Future[None]] = []
        self.sinks: dict[Sink, None] = {}  # an ordered set
        self.batch = batch
        self.writes_per_s = writes_per_s  # 0: a whole pass for every append
        self._burst = max(1.0, writes_per_s * _BURST_S)
        self._slice = max(1.0, writes_per_s * _SLICE_S)
        self._tokens = self._burst  # sink writes that may be spent now
        self._tokens_at = 0.0
        self._pass: list[Sink] = []  # the sinks of the pass under way, in order
        self._pass_at = 0  # the next of them to write
        self._pass_seq = 0  # last_seq when the pass began
        self._flush_at: asyncio.Handle | None = None

    def append(self, batch: Iterable[Event]) -> None:
        added = False
        now_us = time.time_ns() // 1000
        ring = self.ring
        for event in batch:
            if event.seq <= self.last_seq:
                continue  # already have it (a read that was interrupted and repeated)
            if ring and event.seq != ring[-1].seq + 1:
                ring.clear()  # a gap (trimmed history): keep the ring contiguous
            ring.append(event)
            self.last_seq = event.seq
            if event.ts_us:
                metrics.HUB_LAG.observe(max(0, now_us - event.ts_us) / 1e6)
            added = True
            if event.is_end:
                self.finished = True
        if len(ring) > 2 * self.capacity:
            del ring[: len(ring) - self.capacity]
        if added:
            self.wake()
            if self.sinks and self._flush_at is None:
                self._schedule_flush()

    def wake(self) -> None:
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def release(self) -> None:
        """Every sink back to its own task (the pod is draining)."""
        for sink in list(self.sinks):
            self._leave(sink)

    def ping(self) -> None:
        """A heartbeat to every sink (the others are woken to send their own)."""
        wrapped: dict[str, bytes] = {}
        for sink in list(self.sinks):
            data = wrapped.get(sink.name)
            if data is None:
                data = wrapped[sink.name] = sink.wrap(sink.heartbeat)
            if not sink.write(data):
                self._leave(sink)

    def join(self, sink: Sink, cursor: int, waiter: asyncio.Future[None]) -> None:
        """A caught-up viewer (``cursor`` is the topic's last event) becomes a sink."""
        sink.cursor = cursor
        sink.waiter = waiter
        self.sinks[sink] = None

    def _leave(self, sink: Sink) -> None:
        if sink in self.sinks:
            del self.sinks[sink]
            if sink.waiter is not None and not sink.waiter.done():
                sink.waiter.set_result(None)

    def _schedule_flush(self) -> None:
        if self._pass_at >= len(self._pass):  # no pass under way: begin one, with the sinks of now
            self._pass = list(self.sinks)
            self._pass_at = 0
            self._pass_seq = self.last_seq
        if not self.writes_per_s or self.finished:
            # The end is here: no event will follow, so the rest of the pass is written at once.
            self._flush(len(self._pass))
            return
        now = asyncio.get_running_loop().time()
        self._tokens = min(self._burst, self._tokens + (now - self._tokens_at) * self.writes_per_s)
        self._tokens_at = now
        if self._tokens >= 1:
            self._flush(int(self._tokens))
        else:
            self._go_on()

    def _go_on(self) -> None:
        """The pass goes on at once if there is budget for a slice (or the end is here), else once there is."""
        delay = 0.0
        if self.writes_per_s and not self.finished:
            delay = (self._slice - self._tokens) / self.writes_per_s
        self._flush_at = asyncio.get_running_loop().call_later(max(0.0, delay), self._on_timer)

    def _on_timer(self) -> None:
        self._flush_at = None
        if self.sinks:
            self._schedule_flush()
        else:
            self._pass = []

    def _flush(self, budget: int) -> None:
        """Go on with the pass: up to ``budget`` sinks get the events after their cursor,
        encoded once per (transport, cursor); then the pass goes on later, or a new one begins
        if events arrived since this one began."""
        encoded: dict[tuple[str, int], tuple[bytes, list[Event]]] = {}
        delivered: dict[str, int] = {}
        ended: list[Sink] = []
        written = 0
        sinks = self.sinks
        todo = self._pass
        at = self._pass_at
        while at < len(todo) and written < budget:
            sink = todo[at]
            at += 1
            if sink not in sinks:
                continue  # it left during the pass
            key = (sink.name, sink.cursor)
            found = encoded.get(key)
            if found is None:
                batch = self.after(sink.cursor, self.batch)
                if not batch:  # nothing new ([]), or no longer in the ring (None): its task takes over
                    if batch is None:
                        self._leave(sink)
                    continue
                found = encoded[key] = (sink.wrap(encode(sink.frame, batch)), batch)
            data, batch = found
            more = sink.write(data)
            written += 1
            sink.cursor = batch[-1].seq
            delivered[sink.name] = delivered.get(sink.name, 0) + len(batch)
            if batch[-1].is_end:
                sink.ended = True
                ended.append(sink)
            elif not more or sink.cursor < self.last_seq:
                self._leave(sink)
        # Ended viewers' tasks (each closes its response) wake only after the writes: at the end
        # of a generation with thousands of viewers, they would otherwise hold back the last ones.
        for sink in ended:
            self._leave(sink)
        self._pass_at = at
        self._tokens -= written
        for name, count in delivered.items():
            metrics.DELIVERED[name] += count
        if written:
            metrics.HUB_DIRECT_WRITES.inc(written)
        if at >= len(todo):
            self._pass = []
            if not (self.sinks and self.last_seq > self._pass_seq):
                return  # every sink has had every event: wait for the next append
        # More to write: the rest of this pass, or a new one for the events that came during it.
        if self._flush_at is None:
            self._go_on()

    def after(self, seq: int, limit: int) -> list[Event] | None:
        """Events after ``seq`` from the ring; [] if there are none yet; None if the ring no longer has them."""
        if seq >= self.last_seq:
            return []
        ring = self.ring
        if not ring or ring[0].seq > seq + 1:
            return None
        start = seq + 1 - ring[0].seq
        return ring[start : start + limit]


class SendWatch:
    """Cuts off viewers whose socket accepts nothing for ``timeout`` seconds.

    A viewer marks ``sending`` (loop time) around each write; one sweep a second
    cancels the task of any viewer stuck in a write for too long (cheaper than a
    timeout context around every write).
    """

    class Entry:
        __slots__ = ("cut_off", "sending", "task")

        def __init__(self, task: asyncio.Task[Any]) -> None:
            self.task = task
            self.sending = 0.0
            self.cut_off = False

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.entries: set[SendWatch.Entry] = set()

    def watch(self) -> Entry:
        task = asyncio.current_task()
        assert task is not None
        entry = SendWatch.Entry(task)
        self.entries.add(entry)
        return entry

    async def sweep(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(1.0, self.timeout / 2))
            deadline = loop.time() - self.timeout
            for entry in self.entries:
                if 0 < entry.sending < deadline and not entry.cut_off:
                    entry.cut_off = True
                    entry.task.cancel()


class HistoryGone(Conflict):
    """The viewer's position is older than what Redis still retains."""

    code = "event_id_expired"


class Draining(Exception):
    """This pod is shutting down: the viewer should reconnect (to another pod) and resume."""


# What ends a stream with a reconnect hint (the viewer resumes, here or on another pod):
# this pod draining, or Redis unreachable when the viewer needs it (history).
RECONNECT_ON: tuple[type[Exception], ...] = (Draining, *UNAVAILABLE)


# KEYS: meta. Refreshes viewed_at only on a generation that still exists (a bare
# HSET would bring back a hash that expired or that a Redis restart lost).
_TOUCH = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'viewed_at', ARGV[1])
return 1
"""
_LOST_MESSAGE = "this generation was lost by Redis (restarted without persistence?)"


class Hub:
    def __init__(self, redis: aioredis.Redis, settings: Settings) -> None:
        self._redis = redis
        self.settings = settings
        self.draining = False
        self._topics: dict[str, Topic] = {}
        self._by_key: dict[bytes, Topic] = {}
        self._readers: dict[str, _Reader] = {}
        self._refresher: asyncio.Task[None] | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self.sends = SendWatch(settings.slow_viewer_timeout_s)
        # Often enough that an idle-cancel deadline never falls between two refreshes.
        idle = settings.idle_cancel_s
        self._viewed_refresh_s = min(_VIEWED_REFRESH_S, idle / 3) if idle else _VIEWED_REFRESH_S

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        self._refresher = asyncio.create_task(self._refresh_viewed(), name="hub-viewed")
        self._ticker = asyncio.create_task(self._tick(), name="hub-heartbeat")
        self._sweeper = asyncio.create_task(self.sends.sweep(), name="hub-send-watch")

    async def stop(self) -> None:
        tasks = [r.task for r in self._readers.values() if r.task is not None]
        tasks += [t for t in (self._refresher, self._ticker, self._sweeper) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._readers.clear()

    def drain(self) -> None:
        """Ask every viewer on this pod to reconnect elsewhere (SIGTERM)."""
        self.draining = True
        for topic in list(self._topics.values()):
            topic.wake()
            topic.release()

    @property
    def viewer_count(self) -> int:
        return sum(t.viewers for t in self._topics.values())

    # -- viewers -----------------------------------------------------------

    async def follow(
        self,
        gen_id: str,
        cursor: int,
        stop: asyncio.Future[Any],
        *,
        drainable: bool = True,
        raw: tuple[bytes, str] | None = None,
        sink: Sink | None = None,
    ) -> AsyncIterator[list[Event] | None]:
        """Batches of events strictly after ``cursor``, ending with the end event.

        ``raw`` (key, shard tag) follows any Redis Stream with ``<seq>-0`` ids instead of a
        generation (a Durable Stream; ``gen_id`` is then its topic name).

        With a ``sink``, whenever the viewer is caught up and its socket is clear, the
        topic writes new events to the sink itself (see Topic) while this generator
        waits; it yields nothing for those, and ``sink.cursor`` tells how far they went.

        Yields None at each heartbeat tick that found nothing new. Returns when
        ``stop`` completes (the client went away); raises Draining when the pod
        is shutting down (unless not ``drainable``: a non-streaming request waits
        for its answer, within the server's graceful-shutdown time), and
        HistoryGone when the cursor is older than Redis keeps.
        """
        topic = self._subscribe(gen_id, cursor, raw)
        limit = self.settings.hub_batch_events
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] | None = None

        def wake(_: object) -> None:
            if sink is not None:
                topic._leave(sink)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

        stop.add_done_callback(wake)
        try:
            while True:
                if self.draining and drainable:
                    raise Draining
                if stop.done():
                    return
                batch = topic.after(cursor, limit)
                if batch is None:
                    batch = await self._history(topic, cursor, limit)
                if batch:
                    yield batch
                    cursor = batch[-1].seq
                    if batch[-1].is_end:
                        return
                    continue
                # Park until the reader appends, the heartbeat ticks, the client leaves
                # or the pod drains. (asyncio.wait on shared futures here cost O(viewers)
                # per wake-up in callback bookkeeping: see the benchmark notes.)
                waiter = loop.create_future()
                if sink is not None and not (self.draining and drainable) and sink.ready():
                    topic.join(sink, cursor, waiter)
                else:
                    topic.waiters.append(waiter)
                await waiter
                waiter = None
                if sink is not None and sink.cursor > cursor:  # it was written to meanwhile
                    cursor = sink.cursor
                    if sink.ended:
                        return
                    continue
                if topic.last_seq <= cursor and not stop.done() and not (self.draining and drainable):
                    yield None  # woken by the heartbeat tick with nothing new
        finally:
            stop.remove_done_callback(wake)
            if sink is not None:
                topic._leave(sink)
            self._unsubscribe(topic)

    async def _history(self, topic: Topic, cursor: int, limit: int) -> list[Event]:
        metrics.HUB_HISTORY_READS.inc()
        entries = await self._redis.xrange(topic.key, min=event_id(cursor + 1), max="+", count=limit)
        batch = [Event.from_entry(entry_id, fields) for entry_id, fields in entries]
        if (batch and batch[0].seq != cursor + 1) or (not batch and cursor < topic.last_seq):
            raise HistoryGone(
                f"events after {event_id(cursor)} are no longer retained; "
                f"GET /v1/generations/{topic.gen_id} has the full content"
            )
        return batch

    def _subscribe(self, gen_id: str, cursor: int, raw: tuple[bytes, str] | None = None) -> Topic:
        topic = self._topics.get(gen_id)
        if topic is None:
            settings = self.settings
            topic = Topic(
                gen_id,
                cursor,
                settings.hub_buffer_events,
                raw,
                batch=settings.hub_batch_events,
                writes_per_s=settings.hub_writes_per_s,
            )
            self._topics[gen_id] = topic
            self._by_key[topic.key] = topic
            self._wake_reader(topic)
            metrics.HUB_TOPICS.set(len(self._topics))
        topic.viewers += 1
        return topic

    def _unsubscribe(self, topic: Topic) -> None:
        topic.viewers -= 1
        if topic.viewers == 0 and self._topics.get(topic.gen_id) is topic:
            del self._topics[topic.gen_id]
            del self._by_key[topic.key]
            metrics.HUB_TOPICS.set(len(self._topics))

    # -- the readers ------------------------------------------------------

    def _group(self, topic: Topic) -> str:
        # One XREAD may only name keys of one cluster slot: on a cluster, one reader
        # per shard tag (shared/keys.py); on a single Redis, one reader for all.
        return topic.shard if self.settings.redis_cluster else ""

    def _wake_reader(self, topic: Topic) -> None:
        group = self._group(topic)
        reader = self._readers.get(group)
        if reader is None:
            reader = _Reader(self, group)
            self._readers[group] = reader
            reader.task = asyncio.create_task(reader.run(), name=f"hub-reader{group and '-' + group}")
        else:
            reader.interrupt()

    def _live(self, group: str) -> list[Topic]:
        return [t for t in self._topics.values() if not t.finished and self._group(t) == group]

    async def _tick(self) -> None:
        """One pod-wide heartbeat: every heartbeat_s, wake every waiting viewer (those with
        nothing new send a heartbeat) — one timer for the pod, not one per viewer."""
        while True:
            await asyncio.sleep(self.settings.heartbeat_s)
            for topic in list(self._topics.values()):
                topic.wake()
                topic.ping()

    async def _refresh_viewed(self) -> None:
        """Tell workers these generations still have viewers (for FANLINE_IDLE_CANCEL_S),
        and end, for the viewers, any generation Redis no longer has."""
        while True:
            await asyncio.sleep(self._viewed_refresh_s)
            watched = [t for t in self._topics.values() if not t.finished and t.generation]
            if not watched:
                continue
            now = time.time()
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for topic in watched:
                        pipe.eval(_TOUCH, 1, keys.meta_key(topic.gen_id), f"{now:.3f}")
                    exists = await pipe.execute()
            except UNAVAILABLE as exc:
                log.warning("refreshing viewed_at: %s", exc)
                continue
            for topic, found in zip(watched, exists, strict=True):
                if not found and not topic.finished:
                    log.warning("generation %s: gone from Redis; ending it for its viewers", topic.gen_id)
                    seq = topic.last_seq
                    topic.append(
                        [
                            Event(seq + 1, ERROR, error_payload(_LOST_MESSAGE, "generation_lost")),
                            Event(seq + 2, END, b""),
                        ]
                    )


class _Reader:
    """The blocking XREAD loop over the live topics of one group (see module docstring).

    When a topic is added while a read is blocked, the read must end now rather than
    after the block time. On a single Redis the reader has a connection of its own
    and ends the read with CLIENT UNBLOCK (it returns at once, as if it had timed
    out) — the connection stays, where cancelling the read would drop it and the
    reconnect would cost round trips to every new generation in a burst. On a
    cluster, where the reading connection is the client's choice, it cancels.
    """

    def __init__(self, hub: Hub, group: str) -> None:
        self.hub = hub
        self.group = group
        self.task: asyncio.Task[None] | None = None
        self._read: asyncio.Future[Any] | None = None
        self._version = 0  # bumped whenever the key set changes
        self._read_version = -1  # the key set of the read in flight
        self._client: aioredis.Redis | None = None
        self._client_id: int | None = None
        self._unblocking: asyncio.Task[None] | None = None

    def interrupt(self) -> None:
        """Re-read with the new key set now, rather than after the block time."""
        self._version += 1
        if self._read is None or self._read.done():
            return  # not reading: the next read takes the new key set
        if self._client is None or self._client_id is None:
            self._read.cancel()
        elif self._unblocking is None or self._unblocking.done():
            self._unblocking = asyncio.create_task(self._unblock())

    async def _unblock(self) -> None:
        for _ in range(40):
            read = self._read
            if read is None or read.done() or self._read_version == self._version:
                return
            try:
                if await self.hub._redis.client_unblock(self._client_id):  # type: ignore[arg-type]
                    return
            except RedisError:
                break
            await asyncio.sleep(0.0005)  # the read has not reached Redis yet: once more
        if self._read is not None and not self._read.done():
            self._read.cancel()

    async def run(self) -> None:
        hub = self.hub
        if not hub.settings.redis_cluster:
            self._client = aioredis.Redis(connection_pool=hub._redis.connection_pool, single_connection_client=True)
        client = self._client or hub._redis
        backoff = 0.05
        try:
            while True:
                live = hub._live(self.group)
                if not live:
                    del hub._readers[self.group]  # the next new topic starts a new reader
                    return
                streams: dict[Any, Any] = {t.key: event_id(t.last_seq) for t in live}
                try:
                    if self._client is not None and self._client_id is None:
                        self._client_id = await self._client.client_id()
                    self._read_version = self._version
                    self._read = asyncio.ensure_future(
                        client.xread(streams, count=_READ_COUNT, block=hub.settings.hub_block_ms)
                    )
                    response = await self._read
                except asyncio.CancelledError:
                    current = asyncio.current_task()
                    if current is not None and current.cancelling():
                        raise  # the hub is stopping
                    self._client_id = None  # the cancelled read dropped its connection
                    continue  # a new topic interrupted the read
                except Exception as exc:
                    # Redis unavailable; or anything else the (cluster) client raises in a state
                    # we did not foresee: the reader must outlive it, or its viewers would get
                    # heartbeats and never another event.
                    self._client_id = None  # a new connection will have a new id
                    metrics.REDIS_ERRORS.labels("hub").inc()
                    unforeseen = not isinstance(exc, UNAVAILABLE)
                    log.warning("hub reader: %r; retrying in %.2f s", exc, backoff, exc_info=unforeseen)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
                    continue
                finally:
                    self._read = None
                backoff = 0.05
                metrics.HUB_READS.inc()
                for key, entries in response or ():
                    topic = hub._by_key.get(key)
                    if topic is not None:
                        topic.append(Event.from_entry(entry_id, fields) for entry_id, fields in entries)
        finally:
            if self._unblocking is not None:
                self._unblocking.cancel()
            if self._client is not None:
                await self._client.aclose()
