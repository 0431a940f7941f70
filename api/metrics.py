"""Prometheus metrics of an API pod, served at ``GET /metrics``.

Counted where they happen, and cheaply on the hot path: a viewer's deliveries are
a plain int per batch, the hub's lag one observation per event read (not per
viewer), the viewer gauges once per connection.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from fanline.shared.metrics import REDIS_ERRORS as REDIS_ERRORS  # counted by API pods and workers alike

VIEWERS = Gauge("fanline_viewers", "Viewers connected to this pod", ["transport"])

# Events written to viewers, by transport: plain ints on the hot path (a prometheus
# Counter takes a lock per increment), turned into a counter at scrape time.
DELIVERED: dict[str, int] = {"sse": 0, "ndjson": 0, "websocket": 0, "ai_sdk": 0}


class _DeliveredCollector(Collector):
    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily("fanline_events_delivered", "Events written to viewers", labels=["transport"])
        for transport, count in DELIVERED.items():
            family.add_metric([transport], count)
        yield family


REGISTRY.register(_DeliveredCollector())
RESUMES = Counter("fanline_resumes_total", "Streams started after a Last-Event-ID", ["transport"])
GENERATIONS_STARTED = Counter("fanline_generations_started_total", "Generations started through this pod")
TIME_TO_FIRST_TOKEN = Histogram(
    "fanline_time_to_first_token_seconds",
    "From a streaming chat completion request to its first event written",
    buckets=(0.002, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12),
)
HUB_LAG = Histogram(
    "fanline_hub_lag_seconds",
    "From the worker's publish to this pod's hub reading the event",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0),
)
HUB_READS = Counter("fanline_hub_reads_total", "Blocking XREADs the hub's readers completed")
HUB_HISTORY_READS = Counter("fanline_hub_history_reads_total", "XRANGE history reads by viewers behind the ring")
HUB_DIRECT_WRITES = Counter(
    "fanline_hub_direct_writes_total", "Writes the hub made straight to caught-up viewers' sockets (sinks)"
)
HUB_TOPICS = Gauge("fanline_hub_topics", "Generations watched on this pod")
SLOW_VIEWER_CUTOFFS = Counter("fanline_slow_viewer_cutoffs_total", "Viewers cut off for accepting no bytes")
DRAIN_HINTS = Counter("fanline_reconnect_hints_total", "Streams closed with a reconnect hint (drain)")
QUEUE_DEPTH = Gauge("fanline_queue_depth", "Jobs waiting in the arq queue (read at scrape time)")
