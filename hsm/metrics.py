"""One record per completed extend, its completion log line, and the metrics.

The completion line is a stable key=value form for scripts (mailbox/PROTOCOL.md §5):

    extend-complete vm=NAME drive=vda domain=UUID volume=UUID old_mb=N
    new_mb=N trigger=threshold|enospc|stats|retry|load|recheck wait_ms=N
    extend_ms=N refresh_ms=N resume_ms=N total_ms=N resumed=yes|no
    rate_mbs=F chunk_mb=N

rate_mbs is the guest's estimated write rate (MiB/s) and chunk_mb the
chunk the sizing policy chose for this extend (xtnd.hsm.sizing).

Phases, all from one monotonic clock:
- wait: the trigger (event received, pause seen, stats pass) to the request
  handed to the mailbox (queueing, fresh stats, sizing);
- extend: request to the SPM's reply (mailbox roundtrip and lvextend);
- refresh: reply to the device refreshed, its new size verified and the
  threshold re-armed;
- resume: checking the pause reason and resuming the VM (0 when running);
- total: trigger to done.

HsmMetrics is the daemon's own Prometheus registry (``xtnd_hsm_*``): the
phase histograms are fed with each record; everything else (counters,
drives by state, mailbox I/O) is read from its owner at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from xtnd.common import logfmt
from xtnd.common.promhttp import LATENCY_BUCKETS

MiB = 1024**2


@dataclass(frozen=True)
class ExtendRecord:
    vm: str
    vm_name: str
    drive: str
    domain: str
    volume: str
    trigger: str
    old_size: int
    new_size: int
    t_event: float
    t_request: float
    t_reply: float
    t_refreshed: float
    t_done: float
    resumed: bool
    rate: float = 0.0  # estimated guest write rate, bytes/s
    chunk: int = 0  # chunk chosen for this extend, bytes

    @property
    def wait(self) -> float:
        return self.t_request - self.t_event

    @property
    def extend(self) -> float:
        return self.t_reply - self.t_request

    @property
    def refresh(self) -> float:
        return self.t_refreshed - self.t_reply

    @property
    def resume(self) -> float:
        return self.t_done - self.t_refreshed

    @property
    def total(self) -> float:
        return self.t_done - self.t_event

    def line(self) -> str:
        return (
            f"extend-complete {logfmt.fields(vm=self.vm_name, drive=self.drive)} domain={self.domain} "
            f"volume={self.volume} old_mb={self.old_size // MiB} new_mb={self.new_size // MiB} trigger={self.trigger} "
            f"wait_ms={_ms(self.wait)} extend_ms={_ms(self.extend)} refresh_ms={_ms(self.refresh)} "
            f"resume_ms={_ms(self.resume)} total_ms={_ms(self.total)} resumed={'yes' if self.resumed else 'no'} "
            f"rate_mbs={self.rate / MiB:.2f} chunk_mb={self.chunk // MiB}"
        )


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def parse_line(line: str) -> dict[str, str]:
    """The key=value fields of a completion line (for scripts and tests);
    quoted values (a VM name with spaces or quotes) come back as written."""
    start = line.index("extend-complete ")
    return logfmt.parse(line[start + len("extend-complete ") :])


CHUNK_BUCKETS = tuple(float(2**i * MiB) for i in range(0, 15))  # 1 MiB .. 16 GiB
PHASES = ("wait", "extend", "refresh", "resume", "total")
DRIVE_STATES = ("unset", "armed", "exceeded", "extending", "disabled")
# Monitor counter -> extend result.
RESULTS = {"extends": "extended", "failures": "failed", "refused": "refused"}
# Monitor counter -> error kind.
ERRORS = {
    "failures": "extend_failed",
    "libvirt_errors": "libvirt",
    "job_errors": "job",
    "stats_pass_errors": "stats_pass",
}


@dataclass
class Sources:
    """Where a scrape reads the HSM's figures (set by the daemon)."""

    counters: Callable[[], Mapping[str, int]]
    drive_states: Callable[[], Iterable[str]]
    in_flight: Callable[[], int]
    io: Mapping[str, Callable[[], Mapping[str, int]]]  # name -> counters ("mailbox", "inbox", "outbox")
    # (vm name, drive, write rate bytes/s, chunk bytes) of every watched drive.
    drive_sizing: Callable[[], Iterable[tuple[str, str, float, int]]] | None = None
    # p99 of recent extends' trigger-to-refreshed seconds (adaptive sizing).
    extend_latency: Callable[[], float] | None = None


class HsmMetrics:
    def __init__(self, host_id: int):
        self.host_id = host_id
        self.registry = CollectorRegistry()
        self._phase = Histogram(
            "xtnd_hsm_extend_phase_seconds",
            "Duration of each phase of a completed extend on this host",
            ["phase"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        for phase in PHASES:
            self._phase.labels(phase)
        self._chunk = Histogram(
            "xtnd_hsm_extend_chunk_bytes",
            "Chunk chosen by the sizing policy for each completed extend",
            buckets=CHUNK_BUCKETS,
            registry=self.registry,
        )
        self.sources: Sources | None = None
        self.registry.register(_Collector(self))

    def record(self, r: ExtendRecord) -> None:
        for phase in PHASES:
            self._phase.labels(phase).observe(max(0.0, getattr(r, phase)))
        self._chunk.observe(r.chunk)


class _Collector(Collector):
    def __init__(self, metrics: HsmMetrics):
        self._metrics = metrics

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        m = self._metrics
        yield GaugeMetricFamily("xtnd_hsm_host_id", "This host's mailbox host id", m.host_id)
        src = m.sources
        if src is None:
            return
        counters = dict(src.counters())
        requests = CounterMetricFamily("xtnd_hsm_extend_requests", "Extends by result", labels=["result"])
        for key, result in RESULTS.items():
            requests.add_metric([result], counters.get(key, 0))
        yield requests
        yield GaugeMetricFamily("xtnd_hsm_extends_in_flight", "Extend requests waiting for the SPM", src.in_flight())
        states = list(src.drive_states())
        drives = GaugeMetricFamily("xtnd_hsm_drives", "Watched drives by state", labels=["state"])
        for state in DRIVE_STATES:
            drives.add_metric([state], states.count(state))
        yield drives
        yield CounterMetricFamily("xtnd_hsm_vm_pauses", "VMs paused on an I/O error", counters.get("paused", 0))
        yield CounterMetricFamily("xtnd_hsm_vm_resumes", "VMs resumed after an extend", counters.get("resumed", 0))
        yield CounterMetricFamily("xtnd_hsm_stats_passes", "Bulk stats passes", counters.get("stats_passes", 0))
        errors = CounterMetricFamily("xtnd_hsm_errors", "Errors by kind", labels=["kind"])
        for key, kind in ERRORS.items():
            errors.add_metric([kind], counters.get(key, 0))
        for name, figures in src.io.items():
            for key, value in sorted(figures().items()):
                if key == "errors":
                    errors.add_metric([f"{name}_storage"], value)
                    continue
                yield CounterMetricFamily(f"xtnd_hsm_{name}_{key}", f"{name} {key.replace('_', ' ')}", value)
        yield errors
        if src.extend_latency is not None:
            yield GaugeMetricFamily(
                "xtnd_hsm_extend_latency_p99_seconds",
                "p99 of recent extends' trigger-to-refreshed time (adaptive sizing)",
                src.extend_latency(),
            )
        if src.drive_sizing is not None:
            rate = GaugeMetricFamily(
                "xtnd_hsm_drive_write_rate_bytes_per_second", "Estimated guest write rate", labels=["vm", "drive"]
            )
            chunk = GaugeMetricFamily(
                "xtnd_hsm_drive_chunk_bytes", "Chunk the sizing policy would choose now", labels=["vm", "drive"]
            )
            for vm, drive, bps, size in src.drive_sizing():
                rate.add_metric([vm, drive], bps)
                chunk.add_metric([vm, drive], size)
            yield rate
            yield chunk
