"""Extend counters and latency figures, for the control socket and the logs.

Latencies go into a fixed-bucket histogram (cumulative, cheap, never
grows) and a window of the most recent values, from which percentiles are
computed exactly for the recent past. Everything is in milliseconds.
"""

from __future__ import annotations

import bisect
import collections
import threading
from typing import Any

from xtnd.common import stats

# Upper bounds (ms) of the histogram buckets; the last bucket is open.
BUCKETS_MS = (5, 10, 25, 50, 75, 100, 150, 250, 500, 1000, 2500, 5000, 10000)
WINDOW = 2048

# What an extend ended as.
RESULTS = ("extended", "noop", "refused", "failed", "fenced")


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile of values (p in 0..100); 0 for no values."""
    return stats.percentile(values, p) if values else 0.0


class Latency:
    """Histogram plus a window of recent values of one duration."""

    def __init__(self, window: int = WINDOW):
        self.buckets = [0] * (len(BUCKETS_MS) + 1)
        self.count = 0
        self.sum_ms = 0.0
        self.max_ms = 0.0
        self.recent: collections.deque[float] = collections.deque(maxlen=window)

    def add(self, ms: float) -> None:
        self.buckets[bisect.bisect_left(BUCKETS_MS, ms)] += 1
        self.count += 1
        self.sum_ms += ms
        self.max_ms = max(self.max_ms, ms)
        self.recent.append(ms)

    def snapshot(self) -> dict[str, Any]:
        recent = list(self.recent)
        return {
            "count": self.count,
            "mean_ms": round(self.sum_ms / self.count, 3) if self.count else 0.0,
            "max_ms": round(self.max_ms, 3),
            "p50_ms": round(percentile(recent, 50), 3),
            "p90_ms": round(percentile(recent, 90), 3),
            "p99_ms": round(percentile(recent, 99), 3),
            "buckets_ms": {f"le_{b}": n for b, n in zip([*BUCKETS_MS, "inf"], self.buckets, strict=True)},
        }


class Metrics:
    """Thread-safe extend counters and latency breakdowns."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.results = dict.fromkeys(RESULTS, 0)
        self.in_flight = 0
        self.total = Latency()  # request seen in the inbox -> reply ready
        self.lvextend = Latency()  # the LVM command alone

    def started(self) -> None:
        with self._lock:
            self.in_flight += 1

    def finished(self, result: str, total_ms: float, lvextend_ms: float | None) -> None:
        with self._lock:
            self.in_flight -= 1
            self.results[result] += 1
            self.total.add(total_ms)
            if lvextend_ms is not None:
                self.lvextend.add(lvextend_ms)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "results": dict(self.results),
                "in_flight": self.in_flight,
                "total": self.total.snapshot(),
                "lvextend": self.lvextend.snapshot(),
            }

    def summary(self) -> str:
        """One key=value line for the periodic stats log."""
        snap = self.snapshot()
        results = " ".join(f"{k}={v}" for k, v in snap["results"].items())
        total, lvx = snap["total"], snap["lvextend"]
        return (
            f"{results} in_flight={snap['in_flight']} total_p50_ms={total['p50_ms']} "
            f"total_p99_ms={total['p99_ms']} total_max_ms={total['max_ms']} "
            f"lvextend_p50_ms={lvx['p50_ms']} lvextend_p99_ms={lvx['p99_ms']}"
        )
