"""``python -m fanline.bench`` / ``fanline bench``: the run from the command line to the report.

    python -m fanline.bench                       # full: the sizes of the issue (several minutes)
    python -m fanline.bench --quick               # the same scenarios, smaller: under 2 minutes
    python -m fanline.bench --smoke               # a few seconds: keeps the benchmark working in CI
    python -m fanline.bench --quick --scenarios fanout --viewers 100,2000 --rates 50,200

It starts an isolated Valkey, fanline API pods and workers, and baseline pods (bench/stack.py),
runs each scenario against fanline then the baseline (bench/scenarios.py), stops everything,
and writes the table (stdout), the JSON and the chart (bench/report.py). Exit status: 0 when
every fanline scenario was exact, 1 when one was not, 2 on a usage or start-up error.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from arq.connections import RedisSettings, create_pool

from fanline.bench import chaos, durable, report, scenarios
from fanline.bench.stack import Stack

SCENARIOS = ("ttft", "fanout", "many", "idle", "late")
# Runs alone, and only when asked for: a soak under faults, not a side-by-side (bench/chaos.py).
CHAOS = "chaos"
# Runs alone too: the Durable Streams protocol, fanline against the Node reference server.
DURABLE = "durable"
CHAOS_MINUTES = {"full": 10.0, "quick": 1.0, "smoke": 0.25}
DEFAULT_OUTPUT = Path("bench/results/latest.json")

# Sizes per mode; any option given on the command line wins.
PRESETS: dict[str, dict[str, Any]] = {
    "full": {
        "ttft_sequential": 200, "ttft_concurrent": 20, "ttft_rounds": 5, "ttft_tokens": 16,
        "viewers": [100, 1000, 5000], "rates": [50.0, 200.0], "duration": 10.0,
        "generations": 50, "viewers_per_generation": 20, "many_rate": 50.0,
        "idle_viewers": 15_000, "idle_settle_s": 2.0,
        "late_live": 500, "late_joiners": 200, "late_resumers": 1000, "late_rate": 50.0, "late_duration": 10.0,
        "max_scenario_s": 120.0,
    },
    "quick": {
        "ttft_sequential": 50, "ttft_concurrent": 20, "ttft_rounds": 2, "ttft_tokens": 16,
        "viewers": [100, 1000], "rates": [50.0, 200.0], "duration": 3.0,
        "generations": 10, "viewers_per_generation": 20, "many_rate": 50.0,
        "idle_viewers": 2000, "idle_settle_s": 1.0,
        "late_live": 200, "late_joiners": 50, "late_resumers": 200, "late_rate": 50.0, "late_duration": 4.0,
        "max_scenario_s": 20.0,
    },
    "smoke": {
        "ttft_sequential": 5, "ttft_concurrent": 3, "ttft_rounds": 1, "ttft_tokens": 8,
        "viewers": [10], "rates": [50.0], "duration": 1.0,
        "generations": 2, "viewers_per_generation": 3, "many_rate": 50.0,
        "idle_viewers": 20, "idle_settle_s": 0.2,
        "late_live": 5, "late_joiners": 3, "late_resumers": 5, "late_rate": 50.0, "late_duration": 1.5,
        "max_scenario_s": 15.0,
    },
}  # fmt: skip


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fanline bench", description="Load benchmark: fanline vs a naive baseline.")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_const", dest="mode", const="quick", help="smaller sizes: < 2 minutes")
    mode.add_argument("--smoke", action="store_const", dest="mode", const="smoke", help="tiny sizes: seconds (CI)")
    p.set_defaults(mode="full")
    p.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated, of {', '.join(SCENARIOS)}; or {CHAOS} alone (the soak under faults), "
        f"or {DURABLE} alone (Durable Streams: fanline vs the Node reference server)",
    )
    p.add_argument("--systems", default="fanline,baseline", help="fanline, baseline, or both")
    p.add_argument("--pods", type=int, default=2, help="API pods per system (late joiners and resumes use the 2nd)")
    p.add_argument("--loadgens", type=int, default=1, help="minimum load-generator processes per phase")
    p.add_argument("--workers", type=int, default=1, help="fanline worker processes per demo pace")
    g = p.add_argument_group("sizes (default: per mode)")
    g.add_argument("--viewers", type=_ints, help="fan-out: viewers of one generation, e.g. 100,1000,5000")
    g.add_argument("--rates", type=_floats, help="fan-out: events per second, e.g. 50,200")
    g.add_argument("--duration", type=float, help="fan-out and many: seconds of generation")
    g.add_argument("--generations", type=int, help="many: generations")
    g.add_argument("--viewers-per-generation", type=int, help="many: viewers of each")
    g.add_argument("--many-rate", type=float, help="many: events per second of each generation")
    g.add_argument("--idle-viewers", type=int, help="idle: connections to hold")
    g.add_argument("--idle-settle-s", type=float, help="idle: wait before each memory reading")
    g.add_argument("--late-live", type=int, help="late: live viewers")
    g.add_argument("--late-joiners", type=int, help="late: viewers joining midway")
    g.add_argument("--late-resumers", type=int, help="late: viewers that drop and resume at once")
    g.add_argument("--late-rate", type=float)
    g.add_argument("--late-duration", type=float)
    g.add_argument("--ttft-sequential", type=int)
    g.add_argument("--ttft-concurrent", type=int)
    g.add_argument("--ttft-rounds", type=int)
    g.add_argument("--ttft-tokens", type=int)
    g.add_argument("--max-scenario-s", type=float, help="cap on any one phase (viewers not done by then are errors)")
    g.add_argument("--chaos-minutes", type=float, help="chaos: length of the soak (full 10, quick 1, smoke 0.25)")
    g.add_argument("--chaos-generations", type=int, default=50, help="chaos: generations kept running")
    g.add_argument("--chaos-viewers", type=int, default=4, help="chaos: viewers of each generation")
    g.add_argument("--seed", type=int, default=1, help="chaos: the seed of the faults' kinds, targets and times")
    o = p.add_argument_group("output")
    o.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="the JSON file (chaos: chaos.json beside it)")
    o.add_argument("--chart", type=Path, default=None, help="the PNG chart (default: the JSON path with .png)")
    o.add_argument("--no-chart", action="store_true")
    o.add_argument(
        "--profile",
        nargs="?",
        const="python",
        choices=("python", "native"),
        help="py-spy the fanline pod during fan-out phases (native: C frames too, pauses the pod per sample)",
    )
    o.add_argument("--keep", action="store_true", help="keep the work directory (logs) and print its path")
    o.add_argument("--note", default="", help="free text stored in the JSON (e.g. 'machine shared with other jobs')")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    for key, value in PRESETS[args.mode].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    chosen = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    if CHAOS in chosen:
        return _chaos(args, chosen, argv)
    if DURABLE in chosen:
        return _durable(args, chosen)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SCENARIOS] + [s for s in systems if s not in ("fanline", "baseline")]
    if unknown:
        print(f"fanline bench: unknown scenario or system: {', '.join(unknown)}", file=sys.stderr)
        return 2
    args.scenarios, args.systems = chosen, systems

    # SIGTERM unwinds like Ctrl-C, so every process started is stopped.
    signal.signal(signal.SIGTERM, _interrupt)
    work_dir = Path(tempfile.mkdtemp(prefix="fanline-bench-"))
    paces = sorted({0.0, *args.rates, args.many_rate, args.late_rate})
    # The fanline pods always run: they answer GET /v1/generations/{id} for every exactness check.
    stack = Stack(work_dir, paces=paces, pods=max(1, args.pods), workers_per_pace=max(1, args.workers))
    started = time.time()
    load_before = os.getloadavg()
    try:
        try:
            stack.start(sorted({"fanline", *systems}))
        except (RuntimeError, TimeoutError) as exc:
            print(f"fanline bench: could not start the stack: {exc}", file=sys.stderr)
            return 2
        scenario_results, profiles = asyncio.run(_run(args, stack, work_dir))
    except KeyboardInterrupt:
        print("fanline bench: interrupted; stopping what it started", file=sys.stderr)
        return 130
    finally:
        stack.stop()
        if args.keep:
            print(f"fanline bench: logs kept in {work_dir}", file=sys.stderr)
        else:
            shutil.rmtree(work_dir, ignore_errors=True)

    result: dict[str, Any] = {
        "meta": {
            "mode": args.mode,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "duration_s": round(time.time() - started, 1),
            "machine": _machine(),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
            "note": args.note,
            "command": "python -m fanline.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
            "systems": systems,
        },
        "scenarios": scenario_results,
        "targets": report.targets(scenario_results),
        "profiles": profiles,
    }
    report.write_json(result, args.output)
    print(report.table(result))
    print(f"\nJSON: {args.output}", end="")
    if not args.no_chart:
        chart = args.chart or args.output.with_suffix(".png")
        problem = report.write_chart(result, chart)
        print(f"   chart: {problem or chart}", end="")
    print(f"   ({result['meta']['duration_s']} s)")
    inexact = [s["label"] for s in scenario_results if (s["systems"].get("fanline") or {}).get("exact") is False]
    if inexact:
        print(f"fanline bench: NOT EXACT: {', '.join(inexact)}", file=sys.stderr)
        return 1
    return 0


def _durable(args: argparse.Namespace, chosen: list[str]) -> int:
    if chosen != [DURABLE]:
        print(f"fanline bench: {DURABLE} runs alone (its own servers)", file=sys.stderr)
        return 2
    return _run_alone(DURABLE, args, lambda work_dir, output: durable.run(work_dir, args.mode, output))


def _chaos(args: argparse.Namespace, chosen: list[str], argv: list[str] | None) -> int:
    if chosen != [CHAOS]:
        print(f"fanline bench: {CHAOS} runs alone (it is a soak, not a side-by-side)", file=sys.stderr)
        return 2
    minutes = args.chaos_minutes if args.chaos_minutes is not None else CHAOS_MINUTES[args.mode]
    spec = chaos.Spec(
        duration_s=minutes * 60,
        seed=args.seed,
        generations=args.chaos_generations,
        viewers_per_generation=args.chaos_viewers,
    )
    if args.mode == "smoke":  # seconds, in CI: a fault every few seconds, short generations
        spec.tokens, spec.fault_every_s = 40, (2.0, 4.0)
    return _run_alone(CHAOS, args, lambda work_dir, output: chaos.run(work_dir, spec, output))


def _run_alone(name: str, args: argparse.Namespace, run: Callable[[Path, Path], int]) -> int:
    """A scenario that runs alone, in a work directory of its own; its JSON is <name>.json by default."""
    output = args.output if args.output != DEFAULT_OUTPUT else DEFAULT_OUTPUT.with_name(f"{name}.json")
    signal.signal(signal.SIGTERM, _interrupt)
    work_dir = Path(tempfile.mkdtemp(prefix=f"fanline-{name}-"))
    try:
        return run(work_dir, output)
    except KeyboardInterrupt:
        print("fanline bench: interrupted; stopping what it started", file=sys.stderr)
        return 130
    finally:
        if args.keep:
            print(f"fanline bench: logs kept in {work_dir}", file=sys.stderr)
        else:
            shutil.rmtree(work_dir, ignore_errors=True)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _machine() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cores": os.cpu_count(), "cpu": cpu, "python": platform.python_version(), "system": platform.platform()}


async def _run(args: argparse.Namespace, stack: Stack, work_dir: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    redis = aioredis.Redis.from_url(stack.named_url("fanline-bench"))
    queue = await create_pool(RedisSettings.from_dsn(stack.redis_url))
    bench = scenarios.Bench(
        stack=stack,
        redis=redis,
        queue=queue,
        work_dir=work_dir,
        max_scenario_s=args.max_scenario_s,
        min_loadgens=args.loadgens,
        profile_dir=args.output.parent / "profiles" if args.profile else None,
        profile_native=args.profile == "native",
    )
    results: list[dict[str, Any]] = []

    async def each(name: str, label: str, params: dict[str, Any], run: Any, baseline: bool = True) -> None:
        systems: dict[str, dict[str, Any] | None] = {}
        for system in args.systems:
            if system == "baseline" and not baseline:
                systems[system] = None
                continue
            bench.say(f"· {label}: {system} …")
            figures = await run(system)
            latency = figures.get("latency_ms") or {}
            bench.say(
                f"  exact {figures['exact']}, p50 {latency.get('p50')} ms, p99 {latency.get('p99')} ms, "
                f"{figures.get('delivered_per_s')} delivered/s, errors {figures['errors'] or 0}"
            )
            systems[system] = figures
            await asyncio.sleep(0.3)  # let sockets close and the pods settle
        results.append(
            {"scenario": name, "label": label, "params": params, "systems": systems, "ratios": report.ratios(systems)}
        )

    try:
        if "ttft" in args.scenarios and "fanline" in args.systems:
            params = {
                "sequential": args.ttft_sequential,
                "concurrent": args.ttft_concurrent,
                "rounds": args.ttft_rounds,
                "tokens": args.ttft_tokens,
            }
            await each(
                "ttft",
                f"ttft {args.ttft_sequential} seq + {args.ttft_concurrent}x{args.ttft_rounds} conc",
                params,
                lambda system: scenarios.ttft(
                    bench, system, args.ttft_sequential, args.ttft_concurrent, args.ttft_rounds, args.ttft_tokens
                ),
                baseline=False,
            )
        if "fanout" in args.scenarios:
            for rate in args.rates:
                for viewers in args.viewers:
                    await each(
                        "fanout",
                        f"fan-out {viewers:,} v @ {rate:g} ev/s",
                        {"viewers": viewers, "rate": rate, "duration_s": args.duration},
                        lambda system, v=viewers, r=rate: scenarios.fanout(bench, system, v, r, args.duration),
                    )
        if "many" in args.scenarios:
            g, v, r = args.generations, args.viewers_per_generation, args.many_rate
            await each(
                "many",
                f"many {g} gen x {v} v @ {r:g} ev/s",
                {"generations": g, "viewers": v, "rate": r, "duration_s": args.duration},
                lambda system: scenarios.many(bench, system, g, v, r, args.duration),
            )
        if "late" in args.scenarios:
            params = {
                "live": args.late_live,
                "joiners": args.late_joiners,
                "resumers": args.late_resumers,
                "rate": args.late_rate,
                "duration_s": args.late_duration,
            }
            await each(
                "late",
                f"late {args.late_live}+{args.late_joiners} join+{args.late_resumers} resume",
                params,
                lambda system: scenarios.late(
                    bench,
                    system,
                    args.late_live,
                    args.late_joiners,
                    args.late_resumers,
                    args.late_rate,
                    args.late_duration,
                ),
            )
        if "idle" in args.scenarios:
            # Two sockets per baseline viewer in one process: it cannot hold more than this.
            capped = min(args.idle_viewers, scenarios.BASELINE_MAX_VIEWERS)
            await each(
                "idle",
                f"idle {args.idle_viewers:,} viewers",
                {"viewers": args.idle_viewers, "baseline_viewers": capped},
                lambda system: scenarios.idle(
                    bench, system, args.idle_viewers if system == "fanline" else capped, args.idle_settle_s
                ),
            )
    finally:
        await queue.aclose()
        await redis.aclose()
    return results, bench.profiles
