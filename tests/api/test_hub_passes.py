"""A topic's passes over its sinks (api/hub.py ``Topic``), in process on hand-made events and sinks:
the budget slices a pass, events that arrive during a pass reach everyone exactly once and in
order, and at the end of a generation no viewer's task wakes before every sink has the end.
Over real sockets and servers: tests/api/test_hub_sinks.py."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from fanline.api.hub import Sink, Topic
from fanline.shared import events
from fanline.shared.events import Event
from tests.support import wait_until


class Viewer:
    """A sink that records the seqs written to it; ``check`` runs at every write."""

    def __init__(self, topic: Topic, check: Callable[[], None] | None = None) -> None:
        self.seqs: list[int] = []
        self.writes = 0
        self.waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.check = check
        self.sink = Sink("sse", b":\n\n", lambda e: b"%d;" % e.seq, lambda b: b, self.write, lambda: True)
        topic.join(self.sink, topic.last_seq, self.waiter)

    def write(self, data: bytes) -> bool:
        if self.check is not None:
            self.check()
        self.seqs += [int(s) for s in data.split(b";") if s]
        self.writes += 1
        return True


def chunk(seq: int) -> Event:
    return Event(seq, events.CHUNK, b"{}")


async def test_a_pass_past_the_burst_goes_on_in_slices_and_reaches_every_sink_once() -> None:
    # 10,000 writes a second: a burst of 150 at once, then slices of ~10 a millisecond.
    topic = Topic("g", 0, 100, writes_per_s=10_000)
    viewers = [Viewer(topic) for _ in range(600)]
    topic.append([chunk(1)])
    assert sum(1 for v in viewers if v.seqs) == 150  # the burst, written within append()
    await wait_until(lambda: all(v.seqs for v in viewers), "every sink written")
    assert all(v.seqs == [1] for v in viewers)


async def test_events_arriving_during_a_pass_reach_every_sink_exactly_once_in_order() -> None:
    topic = Topic("g", 0, 100, writes_per_s=10_000)
    viewers = [Viewer(topic) for _ in range(600)]
    for seq in range(1, 11):
        topic.append([chunk(seq)])  # each while the pass for the ones before is under way
        await asyncio.sleep(0.005)
    await wait_until(lambda: all(v.seqs[-1:] == [10] for v in viewers), "every sink has event 10")
    for v in viewers:
        assert v.seqs == list(range(1, 11))
    # A pass takes ~45 ms and events come every ~5 ms: sinks late in a pass get several in one write.
    assert min(v.writes for v in viewers) < 10


async def test_at_the_end_no_viewer_wakes_before_every_sink_has_the_end() -> None:
    # Pins a bug: the end event woke each ended viewer's task as its sink was written, so at a
    # generation's end thousands of tasks closing their responses held back the sinks still to write.
    topic = Topic("g", 0, 100, writes_per_s=10_000)
    viewers: list[Viewer] = []

    def none_woken() -> None:
        assert not any(v.waiter.done() for v in viewers), "a viewer woke before every sink had the end"

    viewers += [Viewer(topic, none_woken) for _ in range(600)]
    topic.append([chunk(1)])
    await wait_until(lambda: all(v.seqs for v in viewers), "event 1 everywhere")
    topic.append([chunk(2), Event(3, events.END, b"")])
    # The end is written to all 600 at once (no more events can follow), beyond the burst of 150.
    assert all(v.seqs == [1, 2, 3] for v in viewers)
    assert all(v.waiter.done() and v.sink.ended for v in viewers)
    assert not topic.sinks


async def test_the_end_arriving_during_a_pass_is_written_to_everyone_without_waiting_for_budget() -> None:
    # 100 writes a second: paced, the 600 sinks would take 6 s for each event.
    topic = Topic("g", 0, 100, writes_per_s=100)
    viewers = [Viewer(topic) for _ in range(600)]
    topic.append([chunk(1)])
    assert sum(1 for v in viewers if v.seqs) == 1  # the burst: one write
    topic.append([Event(2, events.END, b"")])
    # The rest of this pass, then a second one for the sinks it had already passed, at once.
    await wait_until(lambda: all(v.seqs == [1, 2] for v in viewers), "the end everywhere", within=2.0)
    assert not topic.sinks
