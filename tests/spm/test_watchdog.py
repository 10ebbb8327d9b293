"""The real SPM daemon pings systemd's watchdog (WATCHDOG_USEC) while serving."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable

from xtnd.spm.daemon import ServingHealth
from xtnd.tools.rig import sanlockd
from xtnd.tools.rig.spmd import Pool, SpmProcess


def test_pings_while_serving(
    pool: Pool, sanlock_hosts: Callable[[int], list[sanlockd.SanlockDaemon]], workdir: str
) -> None:
    notify_path = os.path.join(workdir, "notify")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    notify.settimeout(60)
    [host] = sanlock_hosts(1)
    env = {"NOTIFY_SOCKET": notify_path, "WATCHDOG_USEC": "1000000"}  # a ping every 0.5 s
    spm = SpmProcess(host, pool.spm_config(1), os.path.join(workdir, "spm1.log"), env=env)
    try:
        before = []
        while not any("READY=1" in s for s in before):
            before.append(notify.recv(4096).decode())
        # Joining the lockspace takes seconds: pinged meanwhile.
        assert "WATCHDOG=1" in before, before
        after = [notify.recv(4096).decode() for _ in range(3)]
        assert after == ["WATCHDOG=1"] * 3, after
        assert "systemd watchdog enabled period=1.0s" in spm.log()
        assert spm.terminate() == 0
    finally:
        notify.close()
        if spm.proc.poll() is None:
            spm.kill()


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
