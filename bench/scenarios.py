"""The scenarios and their measured phase.

Every viewer scenario runs the same phase against one system (fanline or the baseline):

    create the generation(s) (metadata only: "queued", a valid stream to watch)
    load generators connect the viewers that start at once ──▶ all "ready"
    snapshot: API and Valkey CPU, Valkey INFO commandstats, API RSS
    "go" ──▶ enqueue the job(s) on the worker of the wanted pace; late joiners join, resumers resume
    every viewer read to [DONE] (or the scenario's deadline passed) ──▶ snapshot again
    "collect" ──▶ each load generator reads the streams back, joins publish times (the entries'
                  ``t``) on event ids, checks every viewer, returns a latency histogram

Both systems read the same kind of streams written by fanline's real worker; only
who serves the viewers differs. A figure per delivered event uses every event every
viewer received (the final [DONE] included).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import redis.asyncio as aioredis
from arq.connections import ArqRedis

from fanline.api.generations import enqueue, write_queued
from fanline.bench import stats
from fanline.bench.profile import Profiler, summarise
from fanline.bench.stack import CLIENT_NAMES, REPO, Proc, Stack, cpu_seconds
from fanline.cli.valkey import die_with_parent
from fanline.shared.ids import new_generation_id
from fanline.shared.requests import ChatCompletionRequest

# One process holds at most ~19,900 sockets (open-files cap 20,000); keep a margin.
SOCKETS_PER_LOADGEN = 9_000
# One load generator (one Python process) parses ~250,000 events/s at a full core, and
# its own lag then is most of the latency measured; past this many deliveries a second a
# phase gets another one (at most MAX_LOADGENS_FOR_RATE: they share the machine's cores).
DELIVERIES_PER_LOADGEN = 100_000
MAX_LOADGENS_FOR_RATE = 3
# The baseline holds two sockets per viewer (client + Redis) in one process.
BASELINE_MAX_VIEWERS = 9_000


@dataclass
class Bench:
    """What every scenario needs: the stack, connections to it, and the run's limits."""

    stack: Stack
    redis: aioredis.Redis
    queue: ArqRedis
    work_dir: Path
    max_scenario_s: float
    min_loadgens: int = 1
    profile_dir: Path | None = None
    profile_native: bool = False
    profiles: dict[str, Any] = field(default_factory=dict)
    log: Any = None

    def say(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)


@dataclass
class Group:
    """Viewers of one generation with one role, on one pod (split across load generators)."""

    gen: str
    count: int
    role: str  # live | late | resume
    port: int
    drop_after: int = 0
    resume_port: int = 0
    join: tuple[float, float] = (0.0, 0.0)
    witness: bool = True

    def spec(self, count: int) -> dict[str, Any]:
        return {
            "gen": self.gen,
            "count": count,
            "role": self.role,
            "port": self.port,
            "drop_after": self.drop_after,
            "resume_port": self.resume_port,
            "join": list(self.join),
            "witness": self.witness,
        }


# -- generations ------------------------------------------------------------


async def create_generation(bench: Bench, tokens: int, prompt: str) -> str:
    """A queued generation, as ``api.generations.Generations.create`` writes it, but without its job yet.

    The benchmark enqueues the job only once every viewer is connected (``start``), so
    all of them watch it live from its first event.
    """
    gen_id = new_generation_id()
    request = ChatCompletionRequest.model_validate(
        {"model": "demo", "stream": True, "max_tokens": tokens, "messages": [{"role": "user", "content": prompt}]}
    )
    await write_queued(bench.redis, gen_id, request)
    return gen_id


async def start(bench: Bench, gens: list[tuple[str, float]]) -> None:
    """Enqueue each generation's job on the worker of its pace, and wake the workers."""
    by_queue: dict[str, list[str]] = {}
    for gen_id, pace in gens:
        by_queue.setdefault(bench.stack.queue_for(pace), []).append(gen_id)
    for queue_name, gen_ids in by_queue.items():
        await enqueue(bench.queue, gen_ids, queue_name)


# -- load generators ----------------------------------------------------------


class LoadGen:
    """One ``python -m fanline.bench.loadgen`` process and its line protocol (see bench/loadgen.py)."""

    def __init__(self, process: asyncio.subprocess.Process, name: str, log_path: Path) -> None:
        self.process = process
        self.name = name
        self.log_path = log_path

    @classmethod
    async def start(cls, spec: dict[str, Any], name: str, log_dir: Path) -> LoadGen:
        log_path = log_dir / f"{name}.log"
        with _open_log(log_path) as log:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "fanline.bench.loadgen",
                cwd=REPO,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                preexec_fn=die_with_parent,
                limit=2**26,
            )
        loadgen = cls(process, name, log_path)
        await loadgen.send(json.dumps(spec))
        return loadgen

    async def send(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line.encode() + b"\n")
        await self.process.stdin.drain()

    async def read(self, event: str, within_s: float) -> dict[str, Any]:
        assert self.process.stdout is not None
        try:
            line = await asyncio.wait_for(self.process.stdout.readline(), within_s)
        except TimeoutError:
            raise RuntimeError(f"{self.name}: no {event!r} within {within_s:.0f} s") from None
        if not line:
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{self.name} exited before {event!r}:\n{tail}")
        message: dict[str, Any] = json.loads(line)
        if message.get("event") != event:
            raise RuntimeError(f"{self.name}: expected {event!r}, got {message.get('event')!r}")
        return message

    async def close(self) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(Exception):
                await self.send("stop")
            try:
                await asyncio.wait_for(self.process.wait(), 10)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


def _open_log(path: Path) -> IO[bytes]:
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "ab")


@contextlib.contextmanager
def _profiler(bench: Bench, proc: Proc, name: str | None, *also: tuple[Proc, str]) -> Iterator[None]:
    """py-spy on ``proc`` (and ``also``: more processes and names) for the block when the run
    profiles (``--profile``); the summaries go in the JSON."""
    if not name or bench.profile_dir is None:
        yield
        return
    targets = [(proc, name), *also]
    with contextlib.ExitStack() as stack:
        for target, label in targets:
            stack.enter_context(
                Profiler(target.pid, bench.profile_dir / f"{label}.raw.txt", native=bench.profile_native)
            )
        yield
    for _, label in targets:
        bench.profiles[label] = summarise(bench.profile_dir / f"{label}.raw.txt")


def _split(count: int, parts: int, index: int) -> int:
    return count // parts + (1 if index < count % parts else 0)


# -- one measured phase -------------------------------------------------------


@dataclass
class Snapshot:
    at: float
    cpu: dict[int, float]
    valkey_cpu: float
    worker_cpu: float  # every worker process of the stack
    commands: dict[str, int]  # INFO commandstats: calls by command, every client (and scripts' inner calls)
    clients: dict[int, tuple[str, int]]  # CLIENT LIST: id -> (name, tot-cmds)


async def snapshot(bench: Bench, pods: list[Proc]) -> Snapshot:
    info = await bench.redis.info("commandstats")
    commands = {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in info.items() if isinstance(v, dict)}
    clients = {int(c["id"]): (c.get("name", ""), int(c.get("tot-cmds", 0))) for c in await bench.redis.client_list()}
    assert bench.stack.valkey is not None and bench.stack.valkey.process is not None
    return Snapshot(
        at=time.monotonic(),
        cpu={p.pid: p.cpu_s() for p in pods},
        valkey_cpu=cpu_seconds(bench.stack.valkey.process.pid),
        worker_cpu=sum(p.cpu_s() for p in bench.stack.worker_processes()),
        commands=commands,
        clients=clients,
    )


def commands_by_client(before: Snapshot, after: Snapshot) -> Counter[str]:
    """Commands sent during the phase, by client name (connections closed meanwhile are not seen)."""
    sent: Counter[str] = Counter()
    for client_id, (name, total) in after.clients.items():
        sent[name or "unnamed"] += total - before.clients.get(client_id, (name, 0))[1]
    return sent


async def measure(
    bench: Bench,
    system: str,
    label: str,
    pods: list[Proc],
    groups: list[Group],
    gens: list[tuple[str, float]],
    deadline_s: float,
    *,
    hold: Any = None,
    profile: str | None = None,
) -> dict[str, Any]:
    """Runs one phase (see the module docstring) and returns its figures."""
    deadline_s = min(deadline_s, bench.max_scenario_s)
    sockets = sum(g.count for g in groups)
    rates = dict(gens)
    offered = sum(g.count * rates.get(g.gen, 0.0) for g in groups)
    for_rate = min(MAX_LOADGENS_FOR_RATE, math.ceil(offered / DELIVERIES_PER_LOADGEN))
    parts = max(bench.min_loadgens, math.ceil(sockets / SOCKETS_PER_LOADGEN), for_rate)
    content_port = bench.stack.pods_of("fanline")[0].port
    loadgens: list[LoadGen] = []
    try:
        for i in range(parts):
            spec = {
                "mode": "viewers",
                "redis_url": bench.stack.redis_url,
                "content_port": content_port,
                "groups": [g.spec(_split(g.count, parts, i)) for g in groups if _split(g.count, parts, i)],
                "deadline_s": deadline_s,
                "connect_timeout_s": 30 + sockets / 200,
                "seed": i + 1,
            }
            loadgens.append(await LoadGen.start(spec, f"loadgen-{label}-{i}", bench.work_dir / "logs"))
        ready = [await lg.read("ready", 60 + sockets / 100) for lg in loadgens]
        held: dict[str, Any] = {}
        if hold is not None:
            held = await hold(ready)
        before = await snapshot(bench, pods)
        rss_before = {p.pid: p.rss_kib() for p in pods}
        with _profiler(bench, pods[0], profile):
            for lg in loadgens:
                await lg.send("go")
            await start(bench, gens)
            done = [await lg.read("done", deadline_s + 60) for lg in loadgens]
        after = await snapshot(bench, pods)
        rss_after = {p.pid: p.rss_kib() for p in pods}
        for lg in loadgens:
            await lg.send("collect")
        results = [await lg.read("result", 300) for lg in loadgens]
    finally:
        for lg in loadgens:
            await lg.close()
    dead = [p.name for p in pods if not p.alive()]
    figures = _figures(system, results, before, after, rss_before, rss_after, ready, done)
    figures.update(held)
    if dead:
        figures["exact"] = False
        figures["errors"]["dead_processes"] = dead
    return figures


def _figures(
    system: str,
    results: list[dict[str, Any]],
    before: Snapshot,
    after: Snapshot,
    rss_before: dict[int, int],
    rss_after: dict[int, int],
    ready: list[dict[str, Any]],
    done: list[dict[str, Any]],
) -> dict[str, Any]:

    def total(key: str) -> int:
        return sum(int(r[key]) for r in results)

    viewers = total("viewers")
    delivered = total("delivered")
    first = min((r["first_recv_us"] for r in results if r["first_recv_us"]), default=0)
    last = max((r["last_recv_us"] for r in results), default=0)
    span_s = (last - first) / 1e6 if last > first else 0.0
    streams: dict[str, dict[str, Any]] = {}
    for r in results:
        streams.update(r["streams"])
    api_cpu = sum(after.cpu[pid] - before.cpu.get(pid, 0.0) for pid in after.cpu)
    commands = {k: n - before.commands.get(k, 0) for k, n in after.commands.items()}
    commands = {k: n for k, n in commands.items() if n > 0 and k != "info"}
    command_total = sum(commands.values())
    reads = sum(n for k, n in commands.items() if k in ("xread", "xrange", "xrevrange", "xreadgroup"))
    by_client = commands_by_client(before, after)
    serving = by_client[CLIENT_NAMES[system]]
    failures: Counter[str] = Counter()
    http: Counter[str] = Counter()
    for r in results:
        failures.update(r["failures"])
        http.update(r["http_errors"])
    errors: dict[str, Any] = {
        name: total(name)
        for name in ("gaps", "dups", "error_events", "bad_crc", "wrong_count", "negative_latencies")
        if total(name)
    }
    if failures:
        errors["failures"] = dict(failures)
    if http:
        errors["http"] = dict(http)
    connect_failed = sum(r["failed"] for r in ready)
    if connect_failed:
        errors["connect_failed"] = connect_failed
    exact_viewers = total("exact")
    witness_ok = all(r["witness_ok"] for r in results)
    if not witness_ok:
        errors["witness"] = [p for r in results for p in r["witness_problems"]][:5]
    streams_ok = bool(streams) and all(s["contiguous"] and s["events"] > 0 for s in streams.values())
    if not streams_ok:
        errors["streams"] = "a stream was empty or not numbered 1-0, 2-0, …"
    rates = [
        (s["events"] - 1) / ((s["last_us"] - s["first_us"]) / 1e6)
        for s in streams.values()
        if s["events"] > 1 and s["last_us"] > s["first_us"]
    ]
    client_cpu = [r["cpu_s"] for r in results]
    client_util = max((r["cpu_s"] / r["wall_s"] for r in results if r["wall_s"] > 0), default=0.0)
    figures: dict[str, Any] = {
        "viewers": viewers,
        "complete": total("complete"),
        "exact_viewers": exact_viewers,
        "exact": exact_viewers == viewers and witness_ok and streams_ok and not http and not connect_failed,
        "generations": len(streams),
        "events_per_generation": round(sum(s["events"] for s in streams.values()) / max(1, len(streams)), 1),
        "published_events_per_s": round(sum(rates) / len(rates), 1) if rates else None,
        "delivered": delivered,
        "delivered_per_s": round(delivered / span_s) if span_s else None,
        "latency_ms": stats.percentiles(stats.merge(r["hist"] for r in results)),
        "api_cpu_s": round(api_cpu, 3),
        "api_cpu_s_per_1k": round(1000 * api_cpu / delivered, 4) if delivered else None,
        "api_cpu_util": round(api_cpu / max(1e-9, after.at - before.at) / max(1, len(after.cpu)), 3),
        "valkey_cpu_s": round(after.valkey_cpu - before.valkey_cpu, 3),
        "worker_cpu_s": round(after.worker_cpu - before.worker_cpu, 3),
        # The serving side's commands (the API pods', or the baseline's), from CLIENT LIST.
        "redis_commands": serving,
        "redis_commands_per_event": round(serving / delivered, 5) if delivered else None,
        # Every command Valkey ran (the worker's writes and its scripts' inner calls too), from INFO commandstats.
        "redis_all_commands": command_total,
        "redis_all_commands_per_event": round(command_total / delivered, 5) if delivered else None,
        "redis_stream_reads_per_event": round(reads / delivered, 5) if delivered else None,
        "redis_commands_by_client": dict(by_client),
        "redis_top_commands": dict(Counter(commands).most_common(8)),
        "api_rss_mib": round(sum(rss_after.values()) / 1024, 1),
        "api_rss_growth_mib": round((sum(rss_after.values()) - sum(rss_before.values())) / 1024, 1),
        "client_cpu_s": round(sum(client_cpu), 3),
        # The viewers' checks of what they kept, after the phase (not in client_cpu_s).
        "client_check_cpu_s": round(sum(r.get("check_cpu_s", 0.0) for r in results), 3),
        "client_cpu_util_max": round(client_util, 3),
        "client_processes": len(results),
        "connect_s": round(max(r["connect_s"] for r in ready), 3),
        "wall_s": round(max(r["wall_s"] for r in results), 3),
        "errors": errors,
    }
    late = [x for r in results for x in r["late_first_event_us"]]
    if late:
        figures["late_join_first_event_ms"] = stats.list_percentiles(late)
    dropped = total("dropped")
    if dropped:
        drop_first = min(r["drop_first_us"] for r in results if r["drop_first_us"])
        resume_last = max(r["resume_last_us"] for r in results)
        figures["resume"] = {
            "dropped": dropped,
            "resumed": total("resumed"),
            "all_resumed_s": round((resume_last - drop_first) / 1e6, 3) if resume_last else None,
            "gap_ms": stats.list_percentiles([x for r in results for x in r["resume_gap_us"]]),
        }
    if "ttft_sequential_us" in results[0]:
        figures["ttft_sequential_ms"] = stats.list_percentiles([x for r in results for x in r["ttft_sequential_us"]])
        figures["ttft_concurrent_ms"] = stats.list_percentiles([x for r in results for x in r["ttft_concurrent_us"]])
        figures["request_total_ms"] = stats.list_percentiles([x for r in results for x in r["total_us"]])
        figures["ttft_split_ms"] = {
            kind: {
                part: stats.list_percentiles([x for r in results for x in r["ttft_split_us"][kind][part]])
                for part in ("to_publish", "to_client")
            }
            for kind in ("sequential", "concurrent")
        }
        figures["latency_ms"] = figures["ttft_sequential_ms"]
    return figures


# -- the scenarios ---------------------------------------------------------------


def _pods(bench: Bench, system: str) -> list[Proc]:
    return bench.stack.pods_of(system)


def _deadline(duration_s: float) -> float:
    return 3 * duration_s + 10


async def ttft(bench: Bench, system: str, sequential: int, concurrent: int, rounds: int, tokens: int) -> dict[str, Any]:
    """(a) POST /v1/chat/completions (stream, no-delay demo) → first content chunk. fanline only."""
    pods = _pods(bench, system)[:1]
    spec: dict[str, Any] = {
        "mode": "ttft",
        "redis_url": bench.stack.redis_url,
        "content_port": pods[0].port,
        "port": pods[0].port,
        "sequential": sequential,
        "concurrent": concurrent,
        "rounds": rounds,
        "max_tokens": tokens,
        "deadline_s": min(bench.max_scenario_s, 60.0),
    }
    lg = await LoadGen.start(spec, "loadgen-ttft", bench.work_dir / "logs")
    try:
        ready = [await lg.read("ready", 30)]
        before = await snapshot(bench, pods)
        rss_before = {p.pid: p.rss_kib() for p in pods}
        worker = (bench.stack.workers[0.0][0], f"ttft-{system}-worker")
        with _profiler(bench, pods[0], f"ttft-{system}", worker):
            await lg.send("go")
            done = [await lg.read("done", spec["deadline_s"] * 2 + 30)]
        after = await snapshot(bench, pods)
        rss_after = {p.pid: p.rss_kib() for p in pods}
        await lg.send("collect")
        results = [await lg.read("result", 120)]
    finally:
        await lg.close()
    figures = _figures(system, results, before, after, rss_before, rss_after, ready, done)
    figures["requests"] = figures.pop("viewers")
    return figures


async def fanout(bench: Bench, system: str, viewers: int, rate: float, duration_s: float) -> dict[str, Any]:
    """(b) one generation at ``rate`` events/s, ``viewers`` live viewers on one pod."""
    tokens = max(2, round(rate * duration_s))
    gen = await create_generation(bench, tokens, f"fan-out {viewers}x{rate:g}")
    pod = _pods(bench, system)[0]
    label = f"fanout-v{viewers}-e{rate:g}-{system}"
    profile = label if system == "fanline" else None
    groups = [Group(gen, viewers, "live", pod.port)]
    return await measure(bench, system, label, [pod], groups, [(gen, rate)], _deadline(duration_s), profile=profile)


async def many(
    bench: Bench, system: str, generations: int, viewers: int, rate: float, duration_s: float
) -> dict[str, Any]:
    """(c) ``generations`` generations, ``viewers`` each, all on one pod."""
    tokens = max(2, round(rate * duration_s))
    gens = [await create_generation(bench, tokens, f"many {i}") for i in range(generations)]
    pod = _pods(bench, system)[0]
    groups = [Group(g, viewers, "live", pod.port) for g in gens]
    label = f"many-g{generations}-v{viewers}-{system}"
    return await measure(bench, system, label, [pod], groups, [(g, rate) for g in gens], _deadline(duration_s))


async def late(
    bench: Bench, system: str, live: int, joiners: int, resumers: int, rate: float, duration_s: float
) -> dict[str, Any]:
    """(e) live viewers on pod 0; late joiners on pod 1 during the middle of the generation; resumers
    on pod 0 that all drop at the same event a third of the way in and resume at once on pod 1."""
    tokens = max(6, round(rate * duration_s))
    gen = await create_generation(bench, tokens, f"late joiners {live}+{joiners}+{resumers}")
    pods = _pods(bench, system)
    first, second = pods[0], pods[1 % len(pods)]
    groups = [
        Group(gen, live, "live", first.port),
        Group(gen, joiners, "late", second.port, join=(0.2 * duration_s, 0.8 * duration_s)),
        Group(gen, resumers, "resume", first.port, drop_after=max(1, tokens // 3), resume_port=second.port),
    ]
    used = [first] if second is first else [first, second]
    label = f"late-{system}"
    return await measure(
        bench, system, label, used, [g for g in groups if g.count], [(gen, rate)], _deadline(duration_s)
    )


async def idle(bench: Bench, system: str, viewers: int, settle_s: float = 1.0) -> dict[str, Any]:
    """(d) ``viewers`` idle SSE viewers on a fresh pod: how many it holds, and RSS per connection.

    A fresh pod, warmed up with a small run, so memory freed by earlier scenarios does not
    hide the cost of the new connections. The idle generation then runs (5 tokens) so every
    viewer's stream is checked for exactness like any other.
    """
    pod = bench.stack.start_pod(system, extra=True)
    try:
        warm = await create_generation(bench, 3, "warm-up")
        await measure(
            bench, system, f"idle-warmup-{system}", [pod], [Group(warm, 20, "live", pod.port)], [(warm, 0)], 30
        )
        await asyncio.sleep(settle_s)
        base_rss = pod.rss_kib()
        gen = await create_generation(bench, 5, f"idle {viewers}")

        async def hold(ready: list[dict[str, Any]]) -> dict[str, Any]:
            await asyncio.sleep(settle_s)
            held_rss = pod.rss_kib()
            connected = sum(r["connected"] for r in ready)
            return {
                "held": connected,
                "rss_base_mib": round(base_rss / 1024, 1),
                "rss_held_mib": round(held_rss / 1024, 1),
                "kib_per_connection": round((held_rss - base_rss) / max(1, connected), 2),
                "connect_rate_per_s": round(connected / max(1e-3, max(r["connect_s"] for r in ready))),
            }

        return await measure(
            bench, system, f"idle-{system}", [pod], [Group(gen, viewers, "live", pod.port)], [(gen, 0)], 60, hold=hold
        )
    finally:
        pod.stop()
