"""The Durable Streams scenario: fanline's /v1/streams against the Node reference server.

    fanline bench --scenarios durable               # --quick, --smoke: smaller sizes

The same client load, in one run, against (a) the protocol's reference server
(`@durable-streams/server`, in memory, `conformance/reference-server.mjs`) and (b) one fanline
API pod on an embedded Valkey, both on loopback:

- append: ``producers`` concurrent producers, each POSTing small JSON messages to a stream of
  its own, one after the other, for ``append_s`` seconds: appends/s and their latency;
- fan-out: one stream, ``readers`` live readers (``live=sse`` from offset -1), one producer
  appending ``rate`` messages/s for ``fanout_s`` seconds, each message carrying its send time:
  delivery latency (sent → a reader parsed it), messages lost or duplicated per reader
  (target 0), and the server process's CPU seconds per 1,000 delivered messages.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import orjson

from fanline.bench.stack import REPO, Proc, cpu_seconds
from fanline.cli.valkey import EmbeddedValkey, free_port, spawn_logged

CONFORMANCE = REPO / "conformance"
JSON = {"Content-Type": "application/json"}


def percentile(samples: list[float], p: float) -> float:
    """Nearest rank; 0 with no samples."""
    if not samples:
        return 0.0
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]


@dataclass
class Spec:
    producers: int = 8
    append_s: float = 10.0
    readers: int = 500
    rate: float = 50.0
    fanout_s: float = 10.0


SIZES = {
    "full": Spec(),
    "quick": Spec(producers=8, append_s=5.0, readers=200, rate=50.0, fanout_s=5.0),
    "smoke": Spec(producers=2, append_s=1.0, readers=5, rate=20.0, fanout_s=1.0),
}


@dataclass
class Result:
    server: str
    appends: int = 0
    appends_per_s: float = 0.0
    append_p50_ms: float = 0.0
    append_p99_ms: float = 0.0
    readers: int = 0
    sent: int = 0
    delivered: int = 0
    lost: int = 0
    duplicated: int = 0
    delivery_p50_ms: float = 0.0
    delivery_p99_ms: float = 0.0
    cpu_s_per_1k: float = 0.0
    errors: list[str] = field(default_factory=list)


async def _wait_port(port: int, proc: Proc) -> None:
    limit_s = 30.0
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode} before listening")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise RuntimeError(f"{proc.name} did not listen on {port} within {limit_s} s")


async def _append_phase(client: httpx.AsyncClient, base: str, spec: Spec, result: Result) -> None:
    latencies: list[float] = []
    run = uuid.uuid4().hex[:8]

    async def producer(n: int) -> None:
        url = f"{base}/bench-{run}/append-{n}"
        (await client.put(url, headers=JSON)).raise_for_status()
        deadline = time.monotonic() + spec.append_s
        i = 0
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            response = await client.post(url, headers=JSON, content=orjson.dumps({"i": i, "text": "token"}))
            latencies.append((time.perf_counter() - t0) * 1000)
            if response.status_code >= 300:
                result.errors.append(f"append {response.status_code}: {response.text[:200]}")
                return
            i += 1

    started = time.monotonic()
    await asyncio.gather(*(producer(n) for n in range(spec.producers)))
    elapsed = time.monotonic() - started
    result.appends = len(latencies)
    result.appends_per_s = round(len(latencies) / elapsed, 1)
    result.append_p50_ms = round(percentile(latencies, 50), 2)
    result.append_p99_ms = round(percentile(latencies, 99), 2)


async def _read(client: httpx.AsyncClient, url: str, received: list[int], latencies: list[float]) -> None:
    """One live SSE reader: the message numbers it got, and each message's delivery latency."""
    event = ""
    data: list[str] = []
    async with client.stream("GET", url, params={"offset": "-1", "live": "sse"}) as response:
        async for line in response.aiter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:])
            elif not line and data:
                if event == "data":
                    now_ns = time.time_ns()
                    parsed = json.loads("\n".join(data))
                    for message in parsed if isinstance(parsed, list) else [parsed]:
                        if message.get("end"):
                            return
                        received.append(message["i"])
                        latencies.append((now_ns - message["t"]) / 1e6)
                data = []


async def _fanout_phase(client: httpx.AsyncClient, base: str, spec: Spec, result: Result, pid: int) -> None:
    url = f"{base}/bench-{uuid.uuid4().hex[:8]}/fanout"
    (await client.put(url, headers=JSON)).raise_for_status()
    received: list[list[int]] = [[] for _ in range(spec.readers)]
    latencies: list[float] = []
    readers = [asyncio.create_task(_read(client, url, got, latencies)) for got in received]
    await asyncio.sleep(1.0)  # let the readers connect (a reader late by more still catches up)
    cpu0 = cpu_seconds(pid)
    sent = 0
    interval = 1.0 / spec.rate
    started = time.monotonic()
    while time.monotonic() - started < spec.fanout_s:
        body = orjson.dumps({"i": sent, "t": time.time_ns()})
        response = await client.post(url, headers=JSON, content=body)
        if response.status_code >= 300:
            result.errors.append(f"fan-out append {response.status_code}: {response.text[:200]}")
            break
        sent += 1
        await asyncio.sleep(max(0.0, started + sent * interval - time.monotonic()))
    await client.post(url, headers=JSON, content=orjson.dumps({"end": True}))
    done, pending = await asyncio.wait(readers, timeout=30.0)
    cpu = cpu_seconds(pid) - cpu0
    for task in pending:
        task.cancel()
        result.errors.append("a reader did not get every message within 30 s")
    for task in done:
        if task.exception() is not None:
            result.errors.append(f"reader: {task.exception()!r}")
    delivered = sum(len(got) for got in received)
    result.readers = spec.readers
    result.sent = sent
    result.delivered = delivered
    result.lost = sum(len(set(range(sent)) - set(got)) for got in received)
    result.duplicated = sum(len(got) - len(set(got)) for got in received)
    result.delivery_p50_ms = round(percentile(latencies, 50), 2)
    result.delivery_p99_ms = round(percentile(latencies, 99), 2)
    result.cpu_s_per_1k = round(cpu / max(1, delivered) * 1000, 4)


async def _measure(name: str, base: str, pid: int, spec: Spec) -> Result:
    result = Result(name)
    limits = httpx.Limits(max_connections=spec.readers + spec.producers + 10, max_keepalive_connections=None)
    timeout = httpx.Timeout(30.0, read=60.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        await _append_phase(client, base, spec, result)
        await _fanout_phase(client, base, spec, result, pid)
    return result


def _table(results: list[Result]) -> str:
    rows = [
        "| server | appends/s | append p50 / p99 ms | readers | delivered | lost / dup | "
        "delivery p50 / p99 ms | server CPU s per 1k delivered |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        rows.append(
            f"| {r.server} | {r.appends_per_s:,.0f} | {r.append_p50_ms} / {r.append_p99_ms} | {r.readers} | "
            f"{r.delivered:,} | {r.lost} / {r.duplicated} | {r.delivery_p50_ms} / {r.delivery_p99_ms} | "
            f"{r.cpu_s_per_1k} |"
        )
    ref, fan = results
    if ref.appends_per_s and ref.delivery_p99_ms and ref.cpu_s_per_1k:
        rows.append(
            f"\nfanline / reference: appends/s {fan.appends_per_s / ref.appends_per_s:.2f}, "
            f"delivery p99 {fan.delivery_p99_ms / ref.delivery_p99_ms:.2f}, "
            f"CPU per delivered message {fan.cpu_s_per_1k / ref.cpu_s_per_1k:.2f}"
        )
    return "\n".join(rows)


def run(work_dir: Path, mode: str, output: Path) -> int:
    """Runs the scenario; prints the table, writes the JSON; 0 when both were exact."""
    spec = SIZES[mode]
    node = shutil.which("node")
    if node is None:
        print("the durable scenario needs Node.js 20+ (for the reference server)", file=sys.stderr)
        return 2
    if not (CONFORMANCE / "node_modules" / "@durable-streams" / "server").exists():
        print("installing conformance/ (npm ci) for the reference server ...", flush=True)
        npm = shutil.which("npm") or "npm"
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=CONFORMANCE, check=True)
    env = {**os.environ, "FANLINE_LOG_LEVEL": "warning"}
    ref_port, pod_port = free_port(), free_port()
    reference = Proc(
        "reference",
        spawn_logged([node, "reference-server.mjs", str(ref_port)], env, work_dir / "reference.log", CONFORMANCE),
        ref_port,
    )
    results: list[Result] = []
    with EmbeddedValkey(work_dir / "valkey") as valkey:
        pod_env = {**env, "FANLINE_REDIS_URL": valkey.url, "FANLINE_MAX_CONNECTIONS": "20000"}
        pod = Proc(
            "fanline",
            spawn_logged(
                [sys.executable, "-m", "fanline.cli", "api", "--port", str(pod_port)],
                pod_env,
                work_dir / "pod.log",
                REPO,
            ),
            pod_port,
        )
        try:
            for proc, base in ((reference, reference.url), (pod, pod.url + "/v1/streams")):
                asyncio.run(_wait_port(proc.port, proc))
                print(f"durable: {proc.name} ({spec.producers} producers, {spec.readers} readers) ...", flush=True)
                results.append(asyncio.run(_measure(proc.name, base, proc.pid, spec)))
        finally:
            pod.stop()
            reference.stop()
    table = _table(results)
    print(table)
    output.parent.mkdir(parents=True, exist_ok=True)
    summary = {"mode": mode, "spec": asdict(spec), "results": [asdict(r) for r in results]}
    output.write_text(json.dumps(summary, indent=2))
    print(f"\nJSON: {output}")
    exact = all(not r.errors and r.lost == 0 and r.duplicated == 0 and r.sent > 0 for r in results)
    return 0 if exact else 1
