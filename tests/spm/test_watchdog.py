"""The SPM's systemd watchdog health rule.

The real daemon's pings (WATCHDOG_USEC) before READY=1 and while serving are
checked in tests/spm/test_daemon.py::test_sigterm_releases_lease, with the
rest of its systemd notify life (one daemon start for both).
"""

from __future__ import annotations

import time

from xtnd.spm.daemon import ServingHealth


class FakeLeaseWatchdog:
    def __init__(self) -> None:
        self.lost: str | None = None
        self.last_ok = time.monotonic()
        self.stall_timeout = 20.0


def test_health_follows_lease_checks_and_mailbox() -> None:
    lease = FakeLeaseWatchdog()
    stats = {"event_reads": 1, "scans": 0, "errors": 0}
    health = ServingHealth(lease, stats)  # type: ignore[arg-type]
    assert health() == (True, "")
    ok, why = health()
    assert not ok and "mailbox" in why  # no read since the last ping
    stats["event_reads"] += 1
    assert health() == (True, "")
    lease.last_ok -= 30
    stats["scans"] += 1
    ok, why = health()
    assert not ok and "no successful lease check" in why
    lease.last_ok = time.monotonic()
    lease.lost = "sanlock said so"
    stats["scans"] += 1
    assert health() == (False, "lease lost: sanlock said so")
