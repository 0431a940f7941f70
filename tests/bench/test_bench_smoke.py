"""The benchmark's smoke mode, end to end: it starts, measures both systems, stops, and reports exactness.

No timing is asserted (figures on a shared CI machine mean nothing); only that the
benchmark keeps working and that every viewer of both systems got every event.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_bench(*args: str) -> subprocess.CompletedProcess[str]:
    """``fanline bench --smoke ARGS`` as a user runs it; fails the test if it exits non-zero."""
    run = subprocess.run(
        [sys.executable, "-m", "fanline.bench", "--smoke", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=280,
        stdin=subprocess.DEVNULL,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run


@pytest.mark.timeout(300)
def test_smoke_run_is_exact_for_both_systems(tmp_path: Path) -> None:
    output = tmp_path / "smoke.json"
    run = run_bench("--output", str(output), "--note", "pytest smoke")
    result = json.loads(output.read_text())
    assert output.with_suffix(".png").exists() or "matplotlib" in run.stdout

    names = {s["scenario"] for s in result["scenarios"]}
    assert names == {"ttft", "fanout", "many", "idle", "late"}
    for scenario in result["scenarios"]:
        systems = scenario["systems"]
        assert systems["fanline"]["exact"] is True, (scenario["label"], systems["fanline"]["errors"])
        if scenario["scenario"] == "ttft":
            assert systems["baseline"] is None  # the baseline has no POST endpoint
            continue
        assert systems["baseline"]["exact"] is True, (scenario["label"], systems["baseline"]["errors"])
        for figures in systems.values():
            assert figures["delivered"] > 0
            assert figures["latency_ms"]["samples"] > 0
    assert {t["key"] for t in result["targets"]} >= {
        "ttft",
        "latency_1000",
        "throughput",
        "idle",
        "redis_ratio",
        "storm",
    }


@pytest.mark.timeout(300)
def test_chaos_smoke_soak_checks_every_event_under_faults(tmp_path: Path) -> None:
    """The chaos soak (issue 13) in seconds: faults do hit, and its exactness check runs on every
    viewer (what it found is asserted as exact: a lost or duplicated event here is a bug)."""
    output = tmp_path / "chaos.json"
    run = run_bench(
        "--scenarios",
        "chaos",
        "--chaos-minutes",
        "0.3",
        "--chaos-generations",
        "10",
        "--seed",
        "3",
        "--output",
        str(output),
    )
    result = json.loads(output.read_text())
    assert result["faults"], "no fault hit during the soak"
    assert result["generations"] > 10 and result["events_delivered"] > 0
    assert (result["lost"], result["duplicated"], result["reordered"], result["content_mismatches"]) == (0, 0, 0, 0)
    assert "lost / duplicated / reordered" in run.stdout


@pytest.mark.timeout(300)
def test_durable_smoke_runs_fanline_and_the_reference_server_side_by_side(tmp_path: Path) -> None:
    """The Durable Streams scenario (issue 11) in seconds: the same load against the Node reference
    server and a fanline pod, every reader gets every message exactly once on both."""
    output = tmp_path / "durable.json"
    run = run_bench("--scenarios", "durable", "--output", str(output))
    results = {r["server"]: r for r in json.loads(output.read_text())["results"]}
    assert set(results) == {"reference", "fanline"}
    for r in results.values():
        assert r["appends"] > 0 and r["sent"] > 0 and not r["errors"], r
        assert r["delivered"] == r["sent"] * r["readers"] and (r["lost"], r["duplicated"]) == (0, 0), r
    assert "fanline / reference" in run.stdout
