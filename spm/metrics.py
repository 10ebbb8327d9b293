"""Extend counters and latency figures: control socket, logs and Prometheus.

Latencies go into a fixed-bucket histogram (cumulative, cheap, never
grows) and a window of the most recent values, from which percentiles are
computed exactly for the recent past; those are in milliseconds. The same
events feed the daemon's own Prometheus registry (seconds, ``xtnd_spm_*``),
which the daemon serves at ``[metrics] listen``; figures owned by other
parts (mailbox I/O, lease state) are read from them at scrape time.
"""

from __future__ import annotations

import bisect
import collections
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from xtnd.common import stats
from xtnd.common.promhttp import LATENCY_BUCKETS

# Upper bounds (ms) of the histogram buckets; the last bucket is open.
BUCKETS_MS = (5, 10, 25, 50, 75, 100, 150, 250, 500, 1000, 2500, 5000, 10000)
WINDOW = 2048

# What an extend ended as.
RESULTS = ("extended", "noop", "refused", "failed", "fenced")
# Phases of an extend (see extend.py's "extend done" line).
PHASES = ("queue", "lock", "validate", "fence", "lvextend", "total")


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
            "p50_ms": stats.json_number(stats.percentile(recent, 50), 3),
            "p90_ms": stats.json_number(stats.percentile(recent, 90), 3),
            "p99_ms": stats.json_number(stats.percentile(recent, 99), 3),
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
        self.errors: collections.Counter[str] = collections.Counter()
        self.registry = CollectorRegistry()
        r = self.registry
        self._phase = Histogram(
            "xtnd_spm_extend_phase_seconds",
            "Duration of each phase of an extend request served by this SPM",
            ["phase"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._requests = Counter(
            "xtnd_spm_extend_requests",
            "Extend requests by result (extended, noop, refused, failed, fenced) and reason",
            ["result", "reason"],
            registry=r,
        )
        self._in_flight = Gauge("xtnd_spm_extends_in_flight", "Extend requests being served now", registry=r)
        self._scan = Histogram(
            "xtnd_spm_mailbox_scan_seconds", "Duration of a full inbox scan", buckets=LATENCY_BUCKETS, registry=r
        )
        for phase in PHASES:
            self._phase.labels(phase)
        for result in ("extended", "noop"):
            self._requests.labels(result, "")
        self.lease = LeaseState()
        self._sources = _Sources(self)
        r.register(self._sources)

    def started(self) -> None:
        with self._lock:
            self.in_flight += 1
        self._in_flight.inc()

    def finished(
        self,
        result: str,
        total_ms: float,
        lvextend_ms: float | None,
        phases_ms: Mapping[str, float] | None = None,
        reason: str = "",
    ) -> None:
        """One request done; phases_ms: PHASES that ran (ms), reason: a short kind."""
        with self._lock:
            self.in_flight -= 1
            self.results[result] += 1
            self.total.add(total_ms)
            if lvextend_ms is not None:
                self.lvextend.add(lvextend_ms)
            if result in ("failed", "fenced"):
                self.errors[f"extend_{reason or result}"] += 1
        self._in_flight.dec()
        self._requests.labels(result, reason).inc()
        for phase, ms in (phases_ms or {}).items():
            self._phase.labels(phase).observe(ms / 1000)
        self._phase.labels("total").observe(total_ms / 1000)

    def scanned(self, seconds: float) -> None:
        """The mailbox's scan hook."""
        self._scan.observe(seconds)

    def error(self, kind: str) -> None:
        with self._lock:
            self.errors[kind] += 1

    def watch(self, name: str, counters: Callable[[], Mapping[str, int]]) -> None:
        """Export counters()'s figures at each scrape (mailbox stats, I/O counters) as xtnd_spm_<name>_*."""
        self._sources.watch(name, counters)

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


class LeaseState:
    """The SPM lease as this daemon sees it (set by the daemon, read by scrapes and status)."""

    def __init__(self) -> None:
        self.host_id = 0
        self.held = False
        self.since = 0.0  # wall time of the last change of held
        self.acquisitions = 0
        # The holder as last seen: our host id while held, else the owner a
        # busy acquire reported (0: unknown); holder_since: wall time it was
        # first seen (for another host: when we first saw it hold the lease).
        self.holder = 0
        self.holder_since = 0.0

    def set(self, held: bool, clock: Callable[[], float] = time.time) -> None:
        if held and not self.held:
            self.acquisitions += 1
        if held != self.held or not self.since:
            self.since = clock()
        self.held = held
        if held:
            self.seen_holder(self.host_id, clock)
        elif self.holder == self.host_id:
            self.seen_holder(0, clock)

    def seen_holder(self, host_id: int, clock: Callable[[], float] = time.time) -> None:
        if host_id != self.holder:
            self.holder = host_id
            self.holder_since = clock()


class _Sources(Collector):
    """Figures read at scrape time: lease state, errors, watched counters."""

    def __init__(self, metrics: Metrics):
        self._metrics = metrics
        self._watched: dict[str, Callable[[], Mapping[str, int]]] = {}

    def watch(self, name: str, counters: Callable[[], Mapping[str, int]]) -> None:
        self._watched[name] = counters

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        m = self._metrics
        lease = m.lease
        yield GaugeMetricFamily("xtnd_spm_host_id", "This daemon's host id in the master lockspace", lease.host_id)
        yield GaugeMetricFamily("xtnd_spm_lease_held", "1 while this daemon holds the SPM lease", int(lease.held))
        yield GaugeMetricFamily(
            "xtnd_spm_lease_changed_timestamp_seconds", "Wall time the lease was last taken or lost", lease.since
        )
        yield CounterMetricFamily(
            "xtnd_spm_lease_acquisitions", "Times this daemon acquired the SPM lease", lease.acquisitions
        )
        errors = CounterMetricFamily("xtnd_spm_errors", "Errors by kind", labels=["kind"])
        with m._lock:
            for kind, n in sorted(m.errors.items()):
                errors.add_metric([kind], n)
        for name, counters in self._watched.items():
            for key, value in sorted(counters().items()):
                if key == "errors":
                    errors.add_metric([f"{name}_storage"], value)
                    continue
                yield CounterMetricFamily(f"xtnd_spm_{name}_{key}", f"{name} {key.replace('_', ' ')}", value)
        yield errors
