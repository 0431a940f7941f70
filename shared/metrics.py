"""Prometheus metrics that API pods and workers both count (each process serves its own)."""

from __future__ import annotations

from prometheus_client import Counter

REDIS_ERRORS = Counter("fanline_redis_errors_total", "Redis errors seen by this process", ["where"])
