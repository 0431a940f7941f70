"""fanline on a real Valkey Cluster (FANLINE_REDIS_CLUSTER=1), the arq queue on a
separate non-cluster Valkey, with real API pods and a worker.

- Exact delivery: many viewers joining at different times on two pods, and one that
  resumes on the other pod, get identical, complete text.
- Generations spread over shards and cluster nodes: each generation's keys live on
  the node that owns its shard's slot, and concurrent generations on several nodes
  all stream exactly through one pod's hub.
- Failover: with a replica per master, the master holding a watched generation is
  killed; once its replica is promoted, the generation goes on, viewers that stayed
  connected and viewers that resume on the other pod get exact text.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from redis.crc import key_slot

import fanline
from fanline.cli.valkey import EmbeddedCluster, EmbeddedValkey
from fanline.shared import keys
from fanline.shared.settings import Settings
from tests.support import Received, Stack, create, generation, read_sse, read_sse_at, settled_at

OUTPUT = Path(__file__).resolve().parents[2] / "test-output"


@dataclass
class ClusterStack:
    cluster: EmbeddedCluster
    queue: EmbeddedValkey
    stack: Stack


@contextlib.contextmanager
def _cluster_stack(data_dir: Path, log_dir: Path, replicas: int, tokens_per_s: str) -> Iterator[ClusterStack]:
    shutil.rmtree(log_dir, ignore_errors=True)  # a previous run's lines would mislead
    cluster = EmbeddedCluster(data_dir / "cluster", masters=3, replicas=replicas)
    queue = EmbeddedValkey(data_dir / "queue", persistent=False)
    env = {
        "FANLINE_REDIS_CLUSTER": "1",
        "FANLINE_QUEUE_REDIS_URL": queue.url,
        "FANLINE_DEMO_TOKENS_PER_S": tokens_per_s,
    }
    stack = Stack(cluster.url, log_dir, env)
    try:
        cluster.start()
        queue.start()
        stack.start(apis=2, workers=1)
        yield ClusterStack(cluster, queue, stack)
    finally:
        stack.stop()
        queue.stop()
        cluster.stop()


@pytest.fixture(scope="module")
def cluster_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterStack]:
    """Three masters, two API pods, one worker; the demo writes 200 tokens/s."""
    with _cluster_stack(tmp_path_factory.mktemp("cluster"), OUTPUT / "cluster", 0, "200") as started:
        yield started


def command(client: redis.Redis, *args: str) -> Any:
    """A raw command on the sync client (redis-py leaves ``execute_command`` untyped)."""
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


def _owner_port(cluster: EmbeddedCluster, gen_id: str) -> int:
    """The port of the master that serves the slot of the generation's keys, as the cluster says."""
    slot = key_slot(keys.events_key(gen_id).encode())
    for node in cluster.nodes:
        client = redis.Redis(port=node.port)
        try:
            for start, end, master, *_ in command(client, "CLUSTER", "SLOTS"):
                if start <= slot <= end:
                    return int(master[1])
        except redis.ConnectionError:
            continue  # a killed node
        finally:
            client.close()
    raise AssertionError(f"no node serves slot {slot}")


def _assert_exact(results: list[Received], content: str) -> None:
    for received in results:
        assert received.done and not received.errors, received.errors
        seqs = [int(event_id.split("-")[0]) for event_id in received.ids]
        assert seqs == list(range(1, len(seqs) + 1)), "a gap or a duplicate"
        assert received.ids == results[0].ids
        assert received.text == content


async def test_viewers_joining_late_and_resuming_on_the_other_pod_get_exact_text(
    cluster_stack: ClusterStack,
) -> None:
    first_pod, second_pod = cluster_stack.stack.api_urls
    async with (
        httpx.AsyncClient(base_url=first_pod, timeout=30) as first,
        httpx.AsyncClient(base_url=second_pod, timeout=30) as second,
    ):
        gen_id = await create(first, max_tokens=300)
        events = f"/v1/generations/{gen_id}/events"

        async def viewer(n: int) -> Received:
            return await read_sse(first if n % 2 else second, "GET", events)

        # Viewers from the start; one that reads a part on each pod; more viewers
        # joining after each part (late joiners replay, then follow live).
        viewers = [asyncio.create_task(viewer(n)) for n in range(8)]
        mover = await read_sse(first, "GET", events, stop_after=20)
        viewers += [asyncio.create_task(viewer(n)) for n in range(8)]
        await read_sse(second, "GET", events, headers={"Last-Event-ID": mover.ids[-1]}, received=mover, stop_after=30)
        viewers += [asyncio.create_task(viewer(n)) for n in range(8)]
        await read_sse(first, "GET", events, headers={"Last-Event-ID": mover.ids[-1]}, received=mover)
        results = await asyncio.gather(*viewers)
        info = await generation(second, gen_id)

    assert info["status"] == "completed"
    _assert_exact([mover, *results], info["content"])


async def test_generations_spread_over_shards_and_nodes_stream_exactly(cluster_stack: ClusterStack) -> None:
    first_pod, second_pod = cluster_stack.stack.api_urls
    async with (
        httpx.AsyncClient(base_url=first_pod, timeout=30) as first,
        httpx.AsyncClient(base_url=second_pod, timeout=30) as second,
    ):
        # 16 concurrent generations, all watched on the second pod: its hub reads
        # them from several nodes at once (one blocking read per shard).
        async def run(n: int) -> tuple[Received, Received]:
            gen_id = await create(first, prompt=f"prompt {n}", max_tokens=60)
            events = f"/v1/generations/{gen_id}/events"
            return await asyncio.gather(read_sse(second, "GET", events), read_sse(second, "GET", events))

        runs = await asyncio.gather(*(run(n) for n in range(16)))
        infos = [await generation(first, a.gen_id) for a, _ in runs]

    for (a, b), info in zip(runs, infos, strict=True):
        assert info["status"] == "completed"
        _assert_exact([a, b], info["content"])

    cluster = cluster_stack.cluster
    shards = {keys.shard(info["id"]) for info in infos}
    owners = {info["id"]: _owner_port(cluster, info["id"]) for info in infos}
    assert len(shards) > 1
    assert len(set(owners.values())) > 1, "16 random generations all on one of three nodes"
    # Each generation's keys are on the node that owns its slot (nowhere else).
    for gen_id, port in owners.items():
        for node in cluster.nodes:
            client = redis.Redis(port=node.port)
            try:
                if node.port == port:
                    assert client.exists(*keys.generation_keys(gen_id)) == 3
                else:
                    with pytest.raises(redis.ResponseError, match="MOVED"):
                        client.exists(keys.events_key(gen_id))
            finally:
                client.close()


async def test_app_generations_from_the_producer_library_stream_exactly(cluster_stack: ClusterStack) -> None:
    """fanline.Producer on the Cluster (issue 12): generations on several nodes, written by the
    app (by hand, and by stream_response's background feed), each read on one pod and resumed on
    the other."""
    cluster, queue = cluster_stack.cluster, cluster_stack.queue
    settings = Settings(redis_url=cluster.url, redis_cluster=True, queue_redis_url=queue.url)
    first_pod, second_pod = cluster_stack.stack.api_urls
    words = [f" w{i}" for i in range(30)]

    async def text() -> AsyncIterator[str]:
        for word in words:
            yield word
            await asyncio.sleep(0.002)

    async with fanline.Producer(settings) as producer:
        gens = []
        for _ in range(8):
            async with producer.generation(model="app") as gen:
                for word in words:
                    gen.add(word)
                    await asyncio.sleep(0.001)
            gens.append(gen.id)
        response = await producer.stream_response(text(), model="wrapped")
        gens.append(response.gen_id)
        await settled_at(first_pod, response.gen_id)  # fed in the background while the producer is open
    async with httpx.AsyncClient(base_url=first_pod, timeout=30) as first:
        for gen_id in gens:
            head = await read_sse(first, "GET", f"/v1/generations/{gen_id}/events", stop_after=2)
            tail = await read_sse_at(second_pod, gen_id, Received(), last_event_id=head.ids[-1])
            info = await generation(first, gen_id)
            assert info["status"] == "completed" and info["content"] == "".join(words)
            assert head.text + tail.text == info["content"]
            seqs = [int(i.split("-")[0]) for i in head.ids + tail.ids]
            assert seqs == list(range(1, len(seqs) + 1)), "a gap or a duplicate"
    assert len({_owner_port(cluster, g) for g in gens}) > 1, "9 generations all on one node"


@pytest.fixture
def replicated_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterStack]:
    """Three masters with a replica each, two API pods, one worker; 100 tokens/s."""
    data_dir = tmp_path_factory.mktemp("replicated")
    with _cluster_stack(data_dir, OUTPUT / f"cluster-failover-{data_dir.name}", 1, "100") as started:
        yield started


def _wait_for_promotion(cluster: EmbeddedCluster, dead_port: int, timeout: float = 30.0) -> None:
    """Until a live node says the dead master has failed and its slots are served again
    (its replica was promoted: the dead node's line lists no slots any more). Polls the
    cluster: it announces this to no client. (The cluster runs with
    cluster-require-full-coverage no, so cluster_state is ok all along.)"""
    witness = next(node for node in cluster.nodes if node.port != dead_port)
    client = redis.Redis(port=witness.port)
    deadline = time.monotonic() + timeout
    try:
        while True:
            lines = command(client, "CLUSTER", "NODES").decode().splitlines()
            dead = next(line for line in lines if f":{dead_port}@" in line).split()
            served = b"cluster_state:ok" in command(client, "CLUSTER", "INFO")
            if served and "fail" in dead[2].split(",") and len(dead) == 8:  # fields 9+ are its slots
                return
            assert time.monotonic() < deadline, f"the replica was not promoted within {timeout} s"
            time.sleep(0.1)
    finally:
        client.close()


def _hold_failover_until_the_generation_looks_lost(queue: EmbeddedValkey, replica: EmbeddedValkey, gen_id: str) -> None:
    """Waits until the generation's last heartbeat (read on the replica, which has a
    copy) is older than FANLINE_WORKER_LOST_AFTER_S plus one reaper interval, then
    promotes the replica (CLUSTER FAILOVER FORCE).

    That is what every failover looks like with Redis's default cluster-node-timeout
    (15 s, three times the default worker-lost threshold): the embedded cluster's
    2 s node timeout would make the outage shorter than any production one.
    """
    settings = Settings()
    client = redis.Redis(port=replica.port)
    deadline = time.monotonic() + 30
    try:
        # Reads on a replica while its master's slots are down (only for this test's look).
        client.config_set("cluster-allow-reads-when-down", "yes")
        command(client, "READONLY")
        while True:
            heartbeat = float(command(client, "HGET", keys.meta_key(gen_id), keys.Meta.HEARTBEAT) or 0)
            if time.time() - heartbeat > settings.worker_lost_after_s + settings.reap_interval_s:
                break
            assert time.monotonic() < deadline, "the heartbeat did not go stale"
            time.sleep(0.1)
        # Regression: the worker's liveness (the running set) lived in the cluster and was written
        # after the generation's heartbeat, so it went stale with the generation's node, and a
        # reaper that never touched that node failed the generation once the replica was promoted.
        # It lives on the queue Redis now and must be fresh while the generation's node is down.
        with redis.Redis(port=queue.port) as other:
            alive_at = float(command(other, "ZSCORE", keys.RUNNING, gen_id) or 0)
        assert time.time() - alive_at < settings.worker_lost_after_s, "the worker's liveness went stale"
        command(client, "CLUSTER", "FAILOVER", "FORCE")
    finally:
        client.close()


async def _watch_through_a_failover(stack: ClusterStack, *, hold: bool) -> None:
    cluster = stack.cluster
    first_pod, second_pod = stack.stack.api_urls
    async with (
        httpx.AsyncClient(base_url=first_pod, timeout=60) as first,
        httpx.AsyncClient(base_url=second_pod, timeout=60) as second,
    ):
        gen_id = await create(first, max_tokens=300)
        events = f"/v1/generations/{gen_id}/events"

        # Viewers that stay connected through the failover, on both pods.
        staying = [asyncio.create_task(read_sse(first if n % 2 else second, "GET", events)) for n in range(6)]
        # A viewer that reads a part, goes away during the failover, and resumes on the other pod.
        mover = await read_sse(first, "GET", events, stop_after=20)

        port = _owner_port(cluster, gen_id)
        index = next(i for i, node in enumerate(cluster.nodes) if node.port == port)
        assert index < cluster.masters, "the generation's node is a master"
        replica = cluster.nodes[cluster.masters + index]  # EmbeddedCluster: replica of master i
        if hold:
            for node in cluster.nodes[cluster.masters :]:
                with redis.Redis(port=node.port) as client:
                    client.config_set("cluster-replica-no-failover", "yes")
        cluster.nodes[index].kill()
        # The viewers go on meanwhile (these wait in a thread).
        if hold:
            await asyncio.to_thread(_hold_failover_until_the_generation_looks_lost, stack.queue, replica, gen_id)
        await asyncio.to_thread(_wait_for_promotion, cluster, port)

        await read_sse(second, "GET", events, headers={"Last-Event-ID": mover.ids[-1]}, received=mover)
        late = await read_sse(second, "GET", events)
        results = await asyncio.gather(*staying)
        info = await generation(second, gen_id)

    assert info["status"] == "completed", info["error"]
    _assert_exact([mover, late, *results], info["content"])


async def test_viewers_resume_exactly_across_a_master_failover(replicated_stack: ClusterStack) -> None:
    """The master holding a watched generation is killed; its replica is promoted by the cluster."""
    await _watch_through_a_failover(replicated_stack, hold=False)


async def test_a_failover_longer_than_the_worker_lost_threshold_keeps_live_generations(
    replicated_stack: ClusterStack,
) -> None:
    """As above, with the outage of a production failover: the worker is alive all along
    (it retries its writes), so its generation must go on, not end as worker_lost."""
    await _watch_through_a_failover(replicated_stack, hold=True)
