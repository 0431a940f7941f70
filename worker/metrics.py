"""Prometheus metrics of a worker, served on ``FANLINE_WORKER_METRICS_PORT`` when set."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from fanline.shared.metrics import REDIS_ERRORS as REDIS_ERRORS  # counted by API pods and workers alike

GENERATIONS = Counter("fanline_generations_total", "Generations that ended, by status", ["status"])
GENERATION_DURATION = Histogram(
    "fanline_generation_duration_seconds",
    "From job start to the generation's end",
    buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600),
)
FIRST_TOKEN = Histogram(
    "fanline_worker_first_token_seconds",
    "From job start to the first token handed to the publisher",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10),
)
EVENTS_PUBLISHED = Counter("fanline_events_published_total", "Stream entries written")
PUBLISH_WRITES = Counter(
    "fanline_publish_writes_total",
    "Publish writes (each may carry several entries; writes of one loop turn share a round trip)",
)
