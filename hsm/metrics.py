"""One record per completed extend, its completion log line, and percentiles.

The completion line is a stable key=value form for scripts (SPEC §5):

    extend-complete vm=NAME drive=vda domain=UUID volume=UUID old_mb=N
    new_mb=N trigger=threshold|enospc|stats|retry|load|recheck wait_ms=N
    extend_ms=N refresh_ms=N resume_ms=N total_ms=N resumed=yes|no

Phases, all from one monotonic clock:
- wait: the trigger (event received, pause seen, stats pass) to the request
  handed to the mailbox (queueing, fresh stats, sizing);
- extend: request to the SPM's reply (mailbox roundtrip and lvextend);
- refresh: reply to the device refreshed, its new size verified and the
  threshold re-armed;
- resume: checking the pause reason and resuming the VM (0 when running);
- total: trigger to done.
"""

from __future__ import annotations

from dataclasses import dataclass

from xtnd.common import stats

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
            f"extend-complete vm={self.vm_name} drive={self.drive} domain={self.domain} volume={self.volume} "
            f"old_mb={self.old_size // MiB} new_mb={self.new_size // MiB} trigger={self.trigger} "
            f"wait_ms={_ms(self.wait)} extend_ms={_ms(self.extend)} refresh_ms={_ms(self.refresh)} "
            f"resume_ms={_ms(self.resume)} total_ms={_ms(self.total)} resumed={'yes' if self.resumed else 'no'}"
        )


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def parse_line(line: str) -> dict[str, str]:
    """The key=value fields of a completion line (for scripts and tests)."""
    start = line.index("extend-complete ")
    return dict(field.split("=", 1) for field in line[start:].split()[1:])


percentile = stats.percentile
