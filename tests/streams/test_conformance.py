"""The official Durable Streams conformance suite (npm ``@durable-streams/server-conformance-tests``
0.3.6, 338 tests, run unchanged by conformance/conformance.test.mjs) against fanline:

- ``fanline up`` (embedded Valkey, one pod), as a user starts it;
- three API pods on one Valkey, behind a round-robin balancer, so one test's requests
  (create, append, read, live reads) land on different pods;
- three API pods on a 3-master Valkey Cluster, behind the same balancer.

Each run must pass at least 326 tests (what the reference server passes here) and fail
none; the 6 skipped are the suite's "Reserved subscription APIs" (skipped by the suite
itself unless ``subscriptions: true``, a webhook API that is not part of the protocol's
streams). The figures are in the README ("Durable Streams").
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.test_cluster import ClusterStack, _cluster_stack
from tests.streams.conftest import CONFORMANCE, Balancer, balancer_for, node_and_npm
from tests.support import Stack

OUTPUT = Path(__file__).resolve().parents[2] / "test-output"
MIN_PASSED = 326
SKIPPED_BY_THE_SUITE = "Reserved subscription APIs"


def run_suite(base_url: str, report: Path) -> dict[str, Any]:
    """Runs the suite against ``base_url`` (…/v1/streams); vitest's JSON report."""
    _, npm = node_and_npm()
    report.parent.mkdir(parents=True, exist_ok=True)
    report.unlink(missing_ok=True)
    result = subprocess.run(
        [
            npm,
            "exec",
            "--",
            "vitest",
            "run",
            "--config",
            "vitest.config.mjs",
            "--reporter=json",
            f"--outputFile={report}",
        ],
        cwd=CONFORMANCE,
        env={**os.environ, "DS_BASE_URL": base_url, "NO_COLOR": "1", "CI": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert report.exists(), result.stdout[-3000:] + result.stderr[-3000:]
    parsed: dict[str, Any] = json.loads(report.read_text())
    return parsed


def assert_conformant(report: dict[str, Any]) -> None:
    failed, skipped = [], []
    for file in report["testResults"]:
        for test in file["assertionResults"]:
            name = " > ".join([*test["ancestorTitles"][1:], test["title"]])
            if test["status"] == "failed":
                failed.append(name + ": " + test["failureMessages"][0][:300])
            elif test["status"] != "passed":
                skipped.append(name)
    assert report["numTotalTests"] == 338, report["numTotalTests"]
    assert not failed, "\n".join(failed)
    assert report["numPassedTests"] >= MIN_PASSED, report["numPassedTests"]
    assert all(name.startswith(SKIPPED_BY_THE_SUITE) for name in skipped), skipped


@pytest.mark.timeout(600)
def test_fanline_up_passes_the_conformance_suite(fanline_up: str) -> None:
    assert_conformant(run_suite(fanline_up + "/v1/streams", OUTPUT / "conformance" / "fanline-up.json"))


@pytest.fixture(scope="module")
def three_pods(stack_factory: Any) -> Iterator[tuple[Stack, Balancer]]:
    stack: Stack = stack_factory(apis=3, workers=1, shared=False)
    balancer = balancer_for(stack.api_urls)
    yield stack, balancer
    balancer.stop()


@pytest.mark.timeout(600)
def test_three_pods_on_one_valkey_pass_the_conformance_suite(three_pods: tuple[Stack, Balancer]) -> None:
    stack, balancer = three_pods
    backend = stack.redis_url.rsplit(":", 1)[-1].replace("/", "_")
    assert_conformant(run_suite(balancer.url + "/v1/streams", OUTPUT / "conformance" / f"three-pods-{backend}.json"))
    assert all(n > 0 for n in balancer.connections), balancer.connections  # every pod served


@pytest.fixture(scope="module")
def cluster_pods(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ClusterStack, Balancer]]:
    with _cluster_stack(tmp_path_factory.mktemp("ds-cluster"), OUTPUT / "ds-cluster", 0, "200") as started:
        started.stack.start_api()  # a third pod
        balancer = balancer_for(started.stack.api_urls)
        yield started, balancer
        balancer.stop()


@pytest.mark.timeout(600)
def test_three_pods_on_a_valkey_cluster_pass_the_conformance_suite(cluster_pods: tuple[ClusterStack, Balancer]) -> None:
    _, balancer = cluster_pods
    assert_conformant(run_suite(balancer.url + "/v1/streams", OUTPUT / "conformance" / "cluster.json"))
    assert all(n > 0 for n in balancer.connections), balancer.connections
