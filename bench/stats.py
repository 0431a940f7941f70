"""Latency histograms that load generators can build cheaply and the run can merge.

A histogram maps a bucket (its lower bound, µs) to a count: 10 µs wide below
100 ms, 1 ms wide above, so percentiles are exact to 1 % over the range that
matters while a process holding millions of samples sends a few thousand numbers.

    hist: Counter[int] = Counter(map(bucket, latencies_us))
    percentiles(hist)  # {"p50": ms, "p95": ms, "p99": ms, "max": ms, "samples": n}
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

_FINE_LIMIT_US = 100_000


def bucket(us: int) -> int:
    if us < _FINE_LIMIT_US:
        return us - us % 10 if us > 0 else 0
    return us - us % 1000


def merge(histograms: Iterable[Mapping[int | str, int]]) -> Counter[int]:
    total: Counter[int] = Counter()
    for hist in histograms:
        for key, count in hist.items():
            total[int(key)] += count
    return total


def percentiles(hist: Mapping[int, int], points: tuple[float, ...] = (50, 95, 99)) -> dict[str, float | int | None]:
    """Nearest-rank percentiles in milliseconds (the bucket's middle); None when there are no samples."""
    samples = sum(hist.values())
    result: dict[str, float | int | None] = {f"p{p:g}": None for p in points}
    result["max"] = None
    result["samples"] = samples
    if not samples:
        return result
    keys = sorted(hist)
    targets = sorted((max(1, -(-samples * p // 100)), f"p{p:g}") for p in points)
    seen = 0
    i = 0
    for key in keys:
        seen += hist[key]
        while i < len(targets) and seen >= targets[i][0]:
            result[targets[i][1]] = _ms(key)
            i += 1
    result["max"] = _ms(keys[-1])
    return result


def _ms(key: int) -> float:
    width = 10 if key < _FINE_LIMIT_US else 1000
    return round((key + width / 2) / 1000, 3)


def list_percentiles(values_us: list[int]) -> dict[str, float | int | None]:
    """The same figures for a short list of exact samples (µs in, ms out)."""
    if not values_us:
        return percentiles({})
    ordered = sorted(values_us)
    n = len(ordered)
    result: dict[str, float | int | None] = {}
    for p in (50, 95, 99):
        rank = max(1, -(-n * p // 100))
        result[f"p{p}"] = round(ordered[rank - 1] / 1000, 3)
    result["max"] = round(ordered[-1] / 1000, 3)
    result["samples"] = n
    return result
