"""Regression: a counter ``fanline_generations_created_total`` (API) clashed with the ``_created``
series of the worker's ``fanline_generations_total``, and both defined ``fanline_redis_errors_total``:
importing the API's and the worker's metrics in one process failed (DuplicateTimeseries), and the two
series meant different things under one name."""

from __future__ import annotations

from prometheus_client import REGISTRY

import fanline.api.metrics
import fanline.worker.metrics


def test_api_and_worker_metrics_live_in_one_registry_without_clashes() -> None:
    names = [m.name for m in REGISTRY.collect() if m.name.startswith("fanline_")]
    assert len(names) == len(set(names))
    assert fanline.api.metrics.REDIS_ERRORS is fanline.worker.metrics.REDIS_ERRORS
    assert "fanline_generations_started" in names and "fanline_generations" in names
