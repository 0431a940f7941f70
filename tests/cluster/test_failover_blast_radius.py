"""Regression (issue 13, point 2): one dead Cluster master paused the streams of every master.

redis-py's cluster client answered a connection error to one node by closing the
connections of all nodes and re-reading the slot map from the startup nodes, replaced
every node object on each refresh (tearing down blocking XREADs on live nodes), and
asked a node (maybe the dead one) for the keys of each XREAD. So while one master was
down and not yet failed over, the generations on the live masters paused as long as the
outage (6 s here). This test holds the failover of one master for 6 s after the cluster
marks it failed and checks that viewers of the other masters' generations see no pause,
while the dead master's generation pauses and then goes on exactly after the promotion.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest
import redis

from fanline.cli.valkey import EmbeddedCluster
from tests.cluster.test_cluster import OUTPUT, ClusterStack, _cluster_stack, _owner_port, _wait_for_promotion, command
from tests.support import Received, create, generation, read_sse, wait_until

_HOLD_S = 6.0  # how long the failed master stays failed before its replica takes over
_LIVE_MAX_GAP_S = 1.0  # the live generations' cadence is 20 ms (50 tokens/s)
_DEAD_MIN_GAP_S = 3.0


@pytest.fixture
def held_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterStack]:
    """Three masters with a replica each that never fails over by itself; two API pods, one worker; 50 tokens/s."""
    data_dir = tmp_path_factory.mktemp("blast")
    with _cluster_stack(data_dir, OUTPUT / f"cluster-blast-{data_dir.name}", 1, "50") as started:
        for node in started.cluster.nodes[started.cluster.masters :]:
            with redis.Redis(port=node.port) as client:
                client.config_set("cluster-replica-no-failover", "yes")
        yield started


def _wait_for_fail_flag(cluster: EmbeddedCluster, dead_port: int, timeout: float = 30.0) -> None:
    """Until a live node flags the killed master ``fail`` (not just ``fail?``)."""
    witness = next(node for node in cluster.nodes if node.port != dead_port)
    deadline = time.monotonic() + timeout
    with redis.Redis(port=witness.port) as client:
        while True:
            lines = command(client, "CLUSTER", "NODES").decode().splitlines()
            flags = next(line for line in lines if f":{dead_port}@" in line).split()[2].split(",")
            if "fail" in flags:
                return
            assert time.monotonic() < deadline, f"the killed master was not marked failed within {timeout} s"
            time.sleep(0.05)


def _largest_gap(received: Received) -> float:
    return max((b - a for a, b in zip(received.times, received.times[1:], strict=False)), default=0.0)


async def test_a_held_failover_of_one_master_does_not_pause_the_others(held_stack: ClusterStack) -> None:
    cluster = held_stack.cluster
    first_pod, second_pod = held_stack.stack.api_urls
    async with (
        httpx.AsyncClient(base_url=first_pod, timeout=90) as first,
        httpx.AsyncClient(base_url=second_pod, timeout=90) as second,
    ):
        # Generations until one is on the master to be killed (the first one's) and one on another.
        gens = [await create(first, prompt=f"prompt {n}", max_tokens=1200) for n in range(4)]
        owners = {gen_id: _owner_port(cluster, gen_id) for gen_id in gens}
        while len(set(owners.values())) < 2:
            gen_id = await create(first, prompt=f"prompt {len(gens)}", max_tokens=1200)
            gens.append(gen_id)
            owners[gen_id] = _owner_port(cluster, gen_id)
        dead_port = owners[gens[0]]
        index = next(i for i, node in enumerate(cluster.nodes) if node.port == dead_port)
        assert index < cluster.masters, "the generation's node is a master"
        replica = cluster.nodes[cluster.masters + index]  # EmbeddedCluster: replica of master i

        # One viewer of each generation on each pod, recording when each event arrives.
        viewers = {gen_id: [Received(gen_id=gen_id), Received(gen_id=gen_id)] for gen_id in gens}
        tasks = [
            asyncio.create_task(read_sse(client, "GET", f"/v1/generations/{gen_id}/events", received=received))
            for gen_id, pair in viewers.items()
            for client, received in zip((first, second), pair, strict=True)
        ]
        await wait_until(
            lambda: all(len(r.ids) >= 10 for pair in viewers.values() for r in pair), "every viewer streaming"
        )

        cluster.nodes[index].kill()
        killed_at = time.monotonic()
        await asyncio.to_thread(_wait_for_fail_flag, cluster, dead_port)
        failed_at = time.monotonic()
        await asyncio.sleep(_HOLD_S)  # the viewers read on meanwhile
        with redis.Redis(port=replica.port) as client:
            command(client, "CLUSTER", "FAILOVER", "FORCE")
        await asyncio.to_thread(_wait_for_promotion, cluster, dead_port)
        promoted_at = time.monotonic()

        await asyncio.gather(*tasks)
        infos = {gen_id: await generation(second, gen_id) for gen_id in gens}

    live = [r for gen_id, pair in viewers.items() if owners[gen_id] != dead_port for r in pair]
    dead = [r for gen_id, pair in viewers.items() if owners[gen_id] == dead_port for r in pair]
    live_gap = max(_largest_gap(r) for r in live)
    dead_gap = min(_largest_gap(r) for r in dead)
    print(
        f"\nheld failover: killed, marked failed after {failed_at - killed_at:.2f} s, promoted after"
        f" {promoted_at - killed_at:.2f} s; largest inter-event gap of {len(live)} viewers of generations on"
        f" live masters: {live_gap:.3f} s; smallest largest gap of {len(dead)} viewers of the dead master's"
        f" generations: {dead_gap:.3f} s"
    )
    # The live generations streamed all through the outage, so their gaps cover it.
    assert all(r.times[0] < killed_at and r.times[-1] > promoted_at for r in live)
    for gen_id, pair in viewers.items():
        info = infos[gen_id]
        assert info["status"] == "completed", info["error"]
        for received in pair:
            assert received.done and not received.errors, received.errors
            seqs = [int(event_id.split("-")[0]) for event_id in received.ids]
            assert seqs == list(range(1, len(seqs) + 1)), "a gap or a duplicate"
            assert received.text == info["content"]
    assert dead_gap > _DEAD_MIN_GAP_S, "the dead master's generation did not pause: was the outage real?"
    assert live_gap < _LIVE_MAX_GAP_S, f"generations on live masters paused {live_gap:.2f} s during the failover"
