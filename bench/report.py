"""What a run produces: the table on stdout, the JSON file, the chart, and the targets' verdicts.

The JSON holds everything the table shows and more (per system and scenario: the full
figures; per scenario: fanline/baseline ratios; the targets of DESIGN.md "Performance").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# DESIGN.md, "Performance", on a 2-core machine.
TARGETS = {
    "ttft": "time to first token p50 ≤ 10 ms, p99 ≤ 40 ms (sequential requests)",
    "ttft_concurrent": "time to first token p50 ≤ 10 ms, p99 ≤ 40 ms (20 concurrent requests)",
    "latency_1000": "delivery latency p99 ≤ 50 ms, 1 pod, 1,000 viewers, 50 events/s",
    "throughput": "≥ 200,000 events/s delivered by one API pod process with p99 ≤ 150 ms",
    "idle": "≥ 15,000 idle SSE viewers on one pod, ≤ 16 KiB each",
    "redis_ratio": "Redis commands per delivered event at 1,000 viewers ≤ 1/100 of the baseline",
    "storm": "1,000 viewers reconnect at once to a loaded pod: all resumed, exact, within 5 s",
}

RATIO_KEYS = (
    ("delivered_per_s", "delivered/s"),
    ("p50", "p50"),
    ("p99", "p99"),
    ("api_cpu_s_per_1k", "API CPU/1k"),
    ("redis_commands_per_event", "Redis cmd/ev"),
    ("api_rss_mib", "RSS"),
)


def _value(figures: dict[str, Any], key: str) -> Any:
    if key in ("p50", "p95", "p99"):
        return (figures.get("latency_ms") or {}).get(key)
    return figures.get(key)


def ratios(systems: dict[str, dict[str, Any] | None]) -> dict[str, float | None]:
    ours, theirs = systems.get("fanline"), systems.get("baseline")
    if not ours or not theirs:
        return {}
    result: dict[str, float | None] = {}
    for key, _ in RATIO_KEYS:
        a, b = _value(ours, key), _value(theirs, key)
        result[key] = round(a / b, 4) if isinstance(a, int | float) and isinstance(b, int | float) and b else None
    return result


# -- the table -------------------------------------------------------------


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value and abs(value) < 0.01:
            return f"{value:.2g}"
        return f"{value:,.{digits}f}"
    return str(value)


def _errors(figures: dict[str, Any]) -> str:
    errors = figures.get("errors") or {}
    if not errors:
        return "0"
    count = 0
    for value in errors.values():
        if isinstance(value, int):
            count += value
        elif isinstance(value, dict):
            count += sum(v for v in value.values() if isinstance(v, int))
        else:
            count += 1
    return str(count)


def _notes(scenario: dict[str, Any], figures: dict[str, Any]) -> str:
    notes = []
    if "ttft_concurrent_ms" in figures:
        c = figures["ttft_concurrent_ms"]
        notes.append(f"concurrent p50/p99 {_fmt(c['p50'])}/{_fmt(c['p99'])} ms")
    if "held" in figures:
        notes.append(f"held {figures['held']:,}, {_fmt(figures['kib_per_connection'])} KiB/conn")
    if "late_join_first_event_ms" in figures:
        notes.append(f"joiners 1st event p99 {_fmt(figures['late_join_first_event_ms']['p99'])} ms")
    if "resume" in figures:
        r = figures["resume"]
        notes.append(f"{r['resumed']}/{r['dropped']} resumed in {_fmt(r['all_resumed_s'], 2)} s")
    if figures.get("client_cpu_util_max", 0) > 0.9:
        notes.append("CLIENT-BOUND")
    if figures["complete"] < figures.get("viewers", figures.get("requests", 0)):
        notes.append(f"{figures['complete']} complete")
    return "; ".join(notes)


COLUMNS = (
    ("scenario", 30),
    ("system", 8),
    ("viewers", 7),
    ("pub ev/s", 8),
    ("deliv/s", 9),
    ("p50 ms", 7),
    ("p95 ms", 7),
    ("p99 ms", 8),
    ("CPU s/1k", 8),
    ("cmd/ev", 7),
    ("RSS MiB", 7),
    ("API CPU", 7),
    ("cli CPU", 7),
    ("err", 4),
    ("exact", 5),
    ("notes", 0),
)


def _row(cells: list[str]) -> str:
    out = []
    for (_, width), cell in zip(COLUMNS, cells, strict=True):
        out.append(cell.ljust(width) if width == 30 or not width else cell.rjust(width))
    return " ".join(out).rstrip()


def table(result: dict[str, Any]) -> str:
    lines = [_row([name for name, _ in COLUMNS]), "-" * 150]
    for scenario in result["scenarios"]:
        for system, figures in scenario["systems"].items():
            if figures is None:
                lines.append(_row([scenario["label"], system, *["-"] * 12, "", "n/a (no POST endpoint)"]))
                continue
            latency = figures.get("latency_ms") or {}
            lines.append(
                _row(
                    [
                        scenario["label"],
                        system,
                        _fmt(figures.get("viewers", figures.get("requests"))),
                        _fmt(figures.get("published_events_per_s"), 0),
                        _fmt(figures.get("delivered_per_s")),
                        _fmt(latency.get("p50")),
                        _fmt(latency.get("p95")),
                        _fmt(latency.get("p99")),
                        _fmt(figures.get("api_cpu_s_per_1k"), 3),
                        _fmt(figures.get("redis_commands_per_event"), 3),
                        _fmt(figures.get("api_rss_mib")),
                        _fmt(figures.get("api_cpu_util"), 2),
                        _fmt(figures.get("client_cpu_util_max"), 2),
                        _errors(figures),
                        _fmt(figures.get("exact")),
                        _notes(scenario, figures),
                    ]
                )
            )
        r = scenario.get("ratios") or {}
        if r:
            cells = [
                "",
                "ratio",
                "",
                "",
                _fmt(r.get("delivered_per_s"), 2),
                _fmt(r.get("p50"), 2),
                "",
                _fmt(r.get("p99"), 2),
                _fmt(r.get("api_cpu_s_per_1k"), 2),
                _fmt(r.get("redis_commands_per_event"), 3),
                _fmt(r.get("api_rss_mib"), 2),
                "",
                "",
                "",
                "",
                "fanline / baseline",
            ]
            lines.append(_row(cells))
    lines.append("")
    lines.append("Targets (DESIGN.md, Performance):")
    for target in result["targets"]:
        lines.append(f"  [{target['verdict']:>12}] {target['target']}: {target['measured']}")
    return "\n".join(lines)


# -- the targets ---------------------------------------------------------------


def _find(scenarios: list[dict[str, Any]], name: str, **params: Any) -> dict[str, Any] | None:
    for s in scenarios:
        if s["scenario"] == name and all(s["params"].get(k) == v for k, v in params.items()):
            return s
    return None


def targets(scenarios: list[dict[str, Any]]) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []

    def add(key: str, verdict: str, measured: str) -> None:
        out.append({"key": key, "target": TARGETS[key], "verdict": verdict, "measured": measured})

    def met(ok: bool) -> str:
        return "met" if ok else "NOT MET"

    s = _find(scenarios, "ttft")
    if s and s["systems"].get("fanline"):
        f = s["systems"]["fanline"]
        for key, figures in (("ttft", f["ttft_sequential_ms"]), ("ttft_concurrent", f["ttft_concurrent_ms"])):
            ok = figures["p50"] is not None and figures["p50"] <= 10 and figures["p99"] <= 40
            add(
                key,
                met(ok),
                f"p50 {_fmt(figures['p50'])} ms, p99 {_fmt(figures['p99'])} ms ({figures['samples']} requests)",
            )
    else:
        add("ttft", "not measured", "-")

    s = _find(scenarios, "fanout", viewers=1000, rate=50)
    if s and s["systems"].get("fanline"):
        p99 = s["systems"]["fanline"]["latency_ms"]["p99"]
        add("latency_1000", met(p99 is not None and p99 <= 50), f"p99 {_fmt(p99)} ms")
    else:
        add("latency_1000", "not measured", "this mode has no 1,000-viewer 50 events/s fan-out")

    best = top = None
    offered = 0.0
    for s in scenarios:
        f = s["systems"].get("fanline")
        if s["scenario"] in ("fanout", "many") and f and f.get("delivered_per_s"):
            p = s["params"]
            offered = max(offered, p["viewers"] * p["rate"] * p.get("generations", 1))
            p99 = f["latency_ms"]["p99"]
            run = (f["delivered_per_s"], s["label"], p99)
            if p99 is not None and p99 <= 150 and (best is None or run[0] > best[0]):
                best = run
            if top is None or run[0] > top[0]:
                top = run
    if top is None:
        add("throughput", "not measured", "-")
    else:
        measured = f"highest {top[0]:,}/s at p99 {_fmt(top[2])} ms ({top[1]})"
        if best is not None and best is not top:
            measured += f"; highest with p99 ≤ 150 ms: {best[0]:,}/s ({best[1]})"
        if best is None:
            measured += "; no run had p99 ≤ 150 ms"
        verdict = met(best is not None and best[0] >= 200_000)
        if verdict != "met" and offered < 200_000:
            verdict = "not measured"
            measured += f" (no run offered 200,000/s: at most {offered:,.0f}/s)"
        add("throughput", verdict, measured)

    s = _find(scenarios, "idle")
    if s and s["systems"].get("fanline"):
        f = s["systems"]["fanline"]
        ok = f["held"] >= 15_000 and f["kib_per_connection"] <= 16 and f["exact"]
        verdict = (
            met(ok) if s["params"]["viewers"] >= 15_000 else ("partial" if f["kib_per_connection"] <= 16 else "NOT MET")
        )
        add(
            "idle",
            verdict,
            f"held {f['held']:,} of {s['params']['viewers']:,}, {_fmt(f['kib_per_connection'])} KiB each",
        )
    else:
        add("idle", "not measured", "-")

    s = _find(scenarios, "fanout", viewers=1000, rate=50) or _find(scenarios, "fanout", viewers=1000)
    if s and s.get("ratios", {}).get("redis_commands_per_event") is not None:
        ratio = s["ratios"]["redis_commands_per_event"]
        add("redis_ratio", met(ratio <= 0.01), f"ratio {ratio:.4f} (1/{1 / ratio:,.0f})" if ratio else "ratio 0")
    else:
        add("redis_ratio", "not measured", "needs a 1,000-viewer fan-out on both systems")

    s = _find(scenarios, "late")
    if s and s["systems"].get("fanline") and s["systems"]["fanline"].get("resume"):
        f = s["systems"]["fanline"]
        r = f["resume"]
        ok = r["resumed"] == r["dropped"] and f["exact"] and (r["all_resumed_s"] or 99) <= 5
        verdict = met(ok) if r["dropped"] >= 1000 else ("partial" if ok else "NOT MET")
        add(
            "storm",
            verdict,
            f"{r['resumed']}/{r['dropped']} resumed in {_fmt(r['all_resumed_s'], 2)} s, exact {f['exact']}",
        )
    else:
        add("storm", "not measured", "-")
    return out


# -- files -----------------------------------------------------------------------


def write_json(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=str) + "\n")


def write_chart(result: dict[str, Any], path: Path) -> str | None:
    """Latency (p50, p99) and delivered events/s against viewers, fanline vs baseline. None, or why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no chart"
    runs = [s for s in result["scenarios"] if s["scenario"] == "fanout"]
    if not runs:
        return "no fan-out scenario in this run: no chart"
    rates = sorted({s["params"]["rate"] for s in runs})
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    colours = {"fanline": "tab:blue", "baseline": "tab:red"}
    markers = ["o", "s", "^", "D"]
    for i, rate in enumerate(rates):
        for system in ("fanline", "baseline"):
            points = sorted(
                (s["params"]["viewers"], s["systems"][system])
                for s in runs
                if s["params"]["rate"] == rate and s["systems"].get(system)
            )
            if not points:
                continue
            xs = [v for v, _ in points]
            style = {"color": colours[system], "marker": markers[i % len(markers)]}
            p99 = [f["latency_ms"]["p99"] for _, f in points]
            p50 = [f["latency_ms"]["p50"] for _, f in points]
            left.plot(xs, p99, linestyle="-", label=f"{system} p99, {rate:g} ev/s", **style)
            left.plot(xs, p50, linestyle=":", alpha=0.6, label=f"{system} p50, {rate:g} ev/s", **style)
            right.plot(xs, [f["delivered_per_s"] for _, f in points], label=f"{system}, {rate:g} ev/s", **style)
        offered = sorted({s["params"]["viewers"] for s in runs if s["params"]["rate"] == rate})
        right.plot(offered, [v * rate for v in offered], color="grey", linestyle="--", linewidth=0.8, alpha=0.7)
    for ax, title, unit in (
        (left, "Delivery latency (publish → viewer)", "ms"),
        (right, "Events delivered per second (1 API pod)", "events/s"),
    ):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("viewers of one generation")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    right.text(0.02, 0.02, "dashed: offered (viewers × events/s)", transform=right.transAxes, fontsize=7, color="grey")
    meta = result["meta"]
    fig.suptitle(
        f"fanline vs naive baseline — {meta['mode']} mode, {meta['machine']['cores']} cores ({meta['machine']['cpu']})"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
