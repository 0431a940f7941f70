"""The chaos soak: generations and viewers under fire, then every event checked.

    fanline bench --scenarios chaos                  # 10 minutes (--quick: 1, --smoke: 15 s)
    fanline bench --scenarios chaos --chaos-minutes 3 --seed 7

For the whole run it keeps ``generations`` demo generations going (a new one as soon as one
ends) on 3 API pods and 3 workers over one Valkey (persistent: AOF, fsync always), each
watched by ``viewers_per_generation`` viewers that use ``fanline.watch`` over all pods (so a
viewer that loses its pod resumes on the next). Every few seconds (seeded, bounded) one fault
hits: an API pod or a worker is SIGKILLed or SIGTERMed (and started again on the same port),
or Valkey is restarted. At the end each viewer's events are compared with the generation's
stored stream (XRANGE): lost, duplicated and reordered events (target 0), the generations'
outcomes by cause (``worker_lost`` is the expected end of a generation whose worker was
SIGKILLed), the longest silence any viewer saw between two events (the worst resume time,
plus at most one token interval), and the slowest first event (a generation queued while
workers restart waits for one).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import redis.asyncio as aioredis

import fanline
from fanline.bench.stack import REPO, Proc, wait_healthy
from fanline.cli.valkey import EmbeddedValkey, free_port, spawn_logged
from fanline.shared import keys
from fanline.shared.keys import Meta

FAULTS = ("kill-pod", "term-pod", "kill-worker", "term-worker", "restart-valkey")


@dataclass
class Spec:
    duration_s: float
    seed: int = 1
    generations: int = 50
    viewers_per_generation: int = 4
    pods: int = 3
    workers: int = 3
    tokens: int = 200
    pace: float = 20.0  # tokens/s: a generation lasts ~10 s
    fault_every_s: tuple[float, float] = (5.0, 15.0)


@dataclass
class Seen:
    """What one viewer got."""

    ids: list[str] = field(default_factory=list)
    content: str = ""
    error: str | None = None  # the error event's code, or "gave_up" / an exception's name
    longest_silence_s: float = 0.0  # between two of its events
    first_event_s: float = 0.0  # from its first request (the generation may still be queued)


@dataclass
class Watched:
    gen_id: str
    viewers: list[Seen]


class Soak:
    def __init__(self, work_dir: Path, spec: Spec) -> None:
        self.work_dir = work_dir
        self.spec = spec
        self.valkey = EmbeddedValkey(work_dir / "valkey", persistent=True, extra_args=["--appendfsync", "always"])
        self.queue_name = f"fanline:chaos:{uuid.uuid4().hex[:8]}"
        self.pods: list[Proc] = []
        self.workers: list[Proc] = []
        self.faults: list[dict[str, Any]] = []
        self.watched: list[Watched] = []
        self.create_retries = 0
        self._restarts = Counter[str]()

    # -- processes ---------------------------------------------------------

    def _env(self) -> dict[str, str]:
        return {
            **os.environ,
            "FANLINE_REDIS_URL": self.valkey.url,
            "FANLINE_QUEUE_NAME": self.queue_name,
            "FANLINE_DEMO_TOKENS_PER_S": f"{self.spec.pace:g}",
            "FANLINE_LOG_LEVEL": "warning",
        }

    def _spawn(self, name: str, args: list[str], port: int = 0) -> Proc:
        self._restarts[name] += 1
        log = self.work_dir / "logs" / f"{name}.{self._restarts[name]}.log"
        return Proc(name, spawn_logged([sys.executable, "-m", "fanline.cli", *args], self._env(), log, REPO), port)

    def _start_pod(self, n: int, port: int) -> Proc:
        return self._spawn(f"pod{n}", ["api", "--port", str(port)], port)

    def start(self) -> None:
        self.valkey.start()
        self.workers = [self._spawn(f"worker{n}", ["worker"]) for n in range(self.spec.workers)]
        self.pods = [self._start_pod(n, free_port()) for n in range(self.spec.pods)]
        for pod in self.pods:
            wait_healthy(pod)

    def stop(self) -> None:
        for proc in self.pods + self.workers:
            if proc.alive():
                proc.popen.send_signal(signal.SIGTERM)
        for proc in self.pods + self.workers:
            proc.stop()
        self.valkey.stop()

    @property
    def urls(self) -> list[str]:
        return [pod.url for pod in self.pods]

    # -- faults ------------------------------------------------------------

    async def _fault(self, kind: str, rng: random.Random) -> dict[str, Any]:
        started = time.monotonic()
        record: dict[str, Any] = {"at_s": 0.0, "fault": kind}
        if kind == "restart-valkey":
            await asyncio.to_thread(self.valkey.stop)
            await asyncio.to_thread(self.valkey.start)
        else:
            group = self.pods if kind.endswith("pod") else self.workers
            n = rng.randrange(len(group))
            victim = group[n]
            record["target"] = victim.name
            victim.popen.send_signal(signal.SIGKILL if kind.startswith("kill") else signal.SIGTERM)
            await asyncio.to_thread(victim.popen.wait, 60)
            if group is self.pods:
                group[n] = self._start_pod(n, victim.port)
                await asyncio.to_thread(wait_healthy, group[n], 60)
            else:
                group[n] = self._spawn(victim.name, ["worker"])
        record["took_s"] = round(time.monotonic() - started, 2)
        return record

    async def _chaos(self, until: float, started: float) -> None:
        rng = random.Random(self.spec.seed)
        low, high = self.spec.fault_every_s
        while True:
            await asyncio.sleep(rng.uniform(low, high))
            if time.monotonic() >= until:
                return
            kind = rng.choice(FAULTS)
            at = time.monotonic() - started
            record = await self._fault(kind, rng)
            record["at_s"] = round(at, 1)
            self.faults.append(record)
            print(f"  {at:6.1f} s  {kind:<15} {record.get('target', '')} ({record['took_s']} s)", file=sys.stderr)

    # -- load --------------------------------------------------------------

    async def _create(self, http: httpx.AsyncClient, rng: random.Random) -> str:
        body = {
            "model": "demo",
            "messages": [{"role": "user", "content": "chaos"}],
            "max_tokens": self.spec.tokens,
        }
        while True:
            url = rng.choice(self.urls)
            try:
                response = await http.post(f"{url}/v1/generations", json=body)
                if response.status_code == 201:
                    return str(response.json()["id"])
            except httpx.HTTPError:
                pass
            self.create_retries += 1  # a pod down or draining, or Valkey away: another pod, shortly
            await asyncio.sleep(0.2)

    async def _view(self, gen_id: str, offset: int, seen: Seen) -> None:
        urls = self.urls[offset:] + self.urls[:offset]
        started = time.monotonic()
        last: float | None = None
        try:
            # Bounded: a viewer still waiting long after its generation should have ended is a finding.
            async with asyncio.timeout(self.spec.tokens / self.spec.pace * 3 + 120):
                async for update in fanline.watch(urls, gen_id, max_reconnects=10_000):
                    now = time.monotonic()
                    if last is None:
                        seen.first_event_s = now - started
                    else:
                        seen.longest_silence_s = max(seen.longest_silence_s, now - last)
                    last = now
                    seen.ids.append(update.id)
                    seen.content += update.content
        except fanline.GenerationError as exc:
            seen.error = exc.code
        except fanline.WatchError as exc:
            seen.error = f"watch_error {exc.status}"
        except TimeoutError:
            seen.error = "hung"

    async def _slot(self, n: int, until: float, http: httpx.AsyncClient) -> None:
        rng = random.Random(self.spec.seed * 1000 + n)
        while time.monotonic() < until:
            gen_id = await self._create(http, rng)
            watched = Watched(gen_id, [Seen() for _ in range(self.spec.viewers_per_generation)])
            self.watched.append(watched)
            await asyncio.gather(*(self._view(gen_id, n + i, seen) for i, seen in enumerate(watched.viewers)))

    async def run(self) -> dict[str, Any]:
        started = time.monotonic()
        until = started + self.spec.duration_s
        async with httpx.AsyncClient(timeout=httpx.Timeout(10.0)) as http:
            chaos = asyncio.create_task(self._chaos(until, started))
            await asyncio.gather(*(self._slot(n, until, http) for n in range(self.spec.generations)))
            await chaos
        return await self._check(time.monotonic() - started)

    # -- the check ---------------------------------------------------------

    async def _check(self, wall_s: float) -> dict[str, Any]:
        redis = aioredis.Redis.from_url(self.valkey.url)
        lost = duplicated = reordered = delivered = 0
        outcomes: Counter[str] = Counter()
        viewer_errors: Counter[str] = Counter()
        content_mismatches = 0
        silence = first = 0.0
        try:
            for watched in self.watched:
                entries = await redis.xrange(keys.events_key(watched.gen_id))
                meta = await redis.hgetall(keys.meta_key(watched.gen_id))
                status = meta.get(Meta.STATUS.encode(), b"?").decode()
                error = meta.get(Meta.ERROR.encode())
                outcomes[f"{status} ({orjson.loads(error)['code']})" if error else status] += 1
                stored = [i.decode() for i, fields in entries if fields.get(b"k") == b"c"]
                content = (await redis.get(keys.content_key(watched.gen_id)) or b"").decode()
                for seen in watched.viewers:
                    delivered += len(seen.ids)
                    duplicated += len(seen.ids) - len(set(seen.ids))
                    reordered += sum(1 for a, b in zip(seen.ids, seen.ids[1:], strict=False) if _seq(b) <= _seq(a))
                    lost += len(set(stored) - set(seen.ids))
                    if seen.error:
                        viewer_errors[seen.error] += 1
                    if seen.content != content:
                        content_mismatches += 1
                    silence = max(silence, seen.longest_silence_s)
                    first = max(first, seen.first_event_s)
        finally:
            await redis.aclose()
        return {
            "spec": {**self.spec.__dict__, "fault_every_s": list(self.spec.fault_every_s)},
            "wall_s": round(wall_s, 1),
            "generations": len(self.watched),
            "viewers": sum(len(w.viewers) for w in self.watched),
            "events_delivered": delivered,
            "lost": lost,
            "duplicated": duplicated,
            "reordered": reordered,
            "content_mismatches": content_mismatches,
            "outcomes": dict(outcomes),
            "viewer_errors": dict(viewer_errors),
            "longest_silence_s": round(silence, 2),
            "slowest_first_event_s": round(first, 2),
            "create_retries": self.create_retries,
            "faults": self.faults,
            "faults_by_kind": dict(Counter(f["fault"] for f in self.faults)),
            "exact": lost == duplicated == reordered == content_mismatches == 0,
        }


def _seq(event_id: str) -> int:
    return int(event_id.split("-")[0])


def table(result: dict[str, Any]) -> str:
    rows = [
        ("run", f"{result['wall_s']} s, seed {result['spec']['seed']}"),
        ("generations / viewers", f"{result['generations']} / {result['viewers']}"),
        ("events delivered", str(result["events_delivered"])),
        ("lost / duplicated / reordered", f"{result['lost']} / {result['duplicated']} / {result['reordered']}"),
        ("viewer text != stored content", str(result["content_mismatches"])),
        ("generations by outcome", ", ".join(f"{k}: {v}" for k, v in sorted(result["outcomes"].items()))),
        ("viewers that ended on an error", ", ".join(f"{k}: {v}" for k, v in sorted(result["viewer_errors"].items()))),
        ("longest silence between two events", f"{result['longest_silence_s']} s (the worst resume)"),
        ("slowest first event", f"{result['slowest_first_event_s']} s (from the viewer's first request)"),
        ("faults", ", ".join(f"{k}: {v}" for k, v in sorted(result["faults_by_kind"].items()))),
        ("POSTs retried (pod or Valkey away)", str(result["create_retries"])),
        ("exact", "yes" if result["exact"] else "NO"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def run(work_dir: Path, spec: Spec, output: Path) -> int:
    """Starts the processes, soaks, stops them, prints the table and writes the JSON. 0 when exact."""
    soak = Soak(work_dir, spec)
    print(f"fanline bench chaos: {spec.duration_s:g} s, seed {spec.seed}; faults:", file=sys.stderr)
    try:
        soak.start()
        result = asyncio.run(soak.run())
    finally:
        soak.stop()
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"\nJSON: {output}")
    return 0 if result["exact"] else 1
