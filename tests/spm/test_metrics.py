"""Prometheus metrics, status and log levels of a real ``xtnd spm`` process.

The daemon listens on port 0 (the kernel picks a free one; the daemon logs
it), so parallel test runs never collide. An extend is held in flight by
holding LVM's VG lock while the test scrapes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator

import pytest
from testlib.prom import LISTENING, scrape, value
from xtnd.mailbox.hsm import ExtendFailed
from xtnd.spm.control import ControlClient
from xtnd.tools.rig import sanlockd
from xtnd.tools.rig.spmd import MiB, Pool, SpmProcess, vg_locked
from xtnd.tools.rig.wait import wait_for


@pytest.fixture
def spm(pool: Pool, sanlock_hosts: Callable[[int], list[sanlockd.SanlockDaemon]], workdir: str) -> Iterator[SpmProcess]:
    [host] = sanlock_hosts(1)
    config = pool.spm_config(1, **{"metrics.listen": "127.0.0.1:0"})
    proc = SpmProcess(host, config, os.path.join(workdir, "spm1.log"))
    proc.wait_serving()
    yield proc
    if proc.proc.poll() is None:
        proc.kill()


def test_scrape_during_extend(
    pool: Pool, spm: SpmProcess, sanlock_hosts: Callable[[int], list[sanlockd.SanlockDaemon]], workdir: str
) -> None:
    port = int(spm.wait_log(LISTENING).group(1))
    before = scrape(port)
    assert value(before, "xtnd_spm_lease_held") == 1
    assert value(before, "xtnd_spm_host_id") == 1
    assert value(before, "xtnd_spm_lease_acquisitions_total") == 1
    assert value(before, "xtnd_spm_extends_in_flight") == 0
    assert value(before, "xtnd_spm_extend_requests_total", result="extended", reason="") == 0
    assert value(before, "xtnd_spm_extend_phase_seconds_count", phase="lvextend") == 0

    vol = pool.create_volume(capacity=100 * MiB, size=8 * MiB)
    hsm = pool.hsm(host_id=2)
    hsm.start()
    try:
        with vg_locked(pool.domain.vg):
            pending = hsm.submit(pool.uuid, vol, 20 * MiB)
            during = wait_for(
                lambda: (s := scrape(port)) and value(s, "xtnd_spm_extends_in_flight") == 1 and s,
                timeout=60,
                what="an extend in flight",
            )
            assert not pending.done()
        assert pending.result(timeout=60) == 20 * MiB
        with pytest.raises(ExtendFailed):
            hsm.submit(pool.uuid, uuid.uuid4(), 20 * MiB).result(timeout=60)
    finally:
        hsm.stop()
    assert value(during, "xtnd_spm_extend_requests_total", result="extended", reason="") == 0
    after = scrape(port)
    assert value(after, "xtnd_spm_extends_in_flight") == 0
    assert value(after, "xtnd_spm_extend_requests_total", result="extended", reason="") == 1
    assert value(after, "xtnd_spm_extend_requests_total", result="refused", reason="unknown_volume") == 1
    for phase in ("queue", "lock", "validate", "total"):
        assert value(after, "xtnd_spm_extend_phase_seconds_count", phase=phase) == 2, phase
    for phase in ("fence", "lvextend"):
        assert value(after, "xtnd_spm_extend_phase_seconds_count", phase=phase) == 1, phase
    # Both ran and took time (the held VG lock stalls lvs in validate, or lvextend).
    assert value(after, "xtnd_spm_extend_phase_seconds_sum", phase="validate") > 0
    assert value(after, "xtnd_spm_extend_phase_seconds_sum", phase="lvextend") > 0
    assert value(after, "xtnd_spm_mailbox_scans_total") > value(before, "xtnd_spm_mailbox_scans_total")
    assert value(after, "xtnd_spm_mailbox_scan_seconds_count") > value(before, "xtnd_spm_mailbox_scan_seconds_count")
    assert value(after, "xtnd_spm_inbox_reads_total") > value(before, "xtnd_spm_inbox_reads_total")
    assert value(after, "xtnd_spm_outbox_writes_total") > value(before, "xtnd_spm_outbox_writes_total")

    status = ControlClient(os.path.join(pool.workdir, "spm1.sock")).call("status")
    assert status["role"] == "serving"
    assert status["lease_holder"] == 1
    assert status["results"]["extended"] == 1
    log_level_at_runtime(pool, spm)
    standby_status(pool, sanlock_hosts, workdir)


def standby_status(pool: Pool, sanlock_hosts: Callable[[int], list[sanlockd.SanlockDaemon]], workdir: str) -> None:
    """A second SPM waits for the lease: its status and metrics say so, and
    who holds it. (Checked while test_scrape_during_extend's SPM serves: a
    test of its own started that first SPM, ~6 s, once more.)"""
    [host2] = sanlock_hosts(1)
    config = pool.spm_config(2, **{"metrics.listen": "127.0.0.1:0"})
    standby = SpmProcess(host2, config, os.path.join(workdir, "spm2.log"))
    try:
        port = int(standby.wait_log(LISTENING).group(1))
        standby.wait_log(r"SPM lease busy, waiting owners=1/")
        status = ControlClient(os.path.join(pool.workdir, "spm2.sock")).call("status")
        assert status["role"] == "standby" and status["host_id"] == 2
        assert status["lease_held"] is False and status["lease_holder"] == 1
        samples = scrape(port)
        assert value(samples, "xtnd_spm_host_id") == 2
        assert value(samples, "xtnd_spm_lease_held") == 0
        assert value(samples, "xtnd_spm_lease_acquisitions_total") == 0
    finally:
        standby.kill()


def log_level_at_runtime(pool: Pool, spm: SpmProcess) -> None:
    """xtnd spm log-level changes a logger of the running daemon. (Checked
    on test_scrape_during_extend's SPM, for the same reason as above.)"""
    sock = os.path.join(pool.workdir, "spm1.sock")
    logged = spm.log().count("extend done result=extended")
    vol = pool.create_volume(capacity=100 * MiB, size=8 * MiB)
    hsm = pool.hsm(host_id=3)  # not the scrape's HSM: a fresh mailbox slot
    hsm.start()
    try:
        # The daemon logs at INFO: a mailbox scan is a DEBUG line of xtnd.mailbox... until asked.
        cmd = [sys.executable, "-m", "xtnd.tools.cli", "spm", "log-level", "xtnd.spm.extend", "warning"]
        out = subprocess.run([*cmd, "--socket", sock], capture_output=True, text=True, check=True).stdout
        assert out == "xtnd.spm.extend: INFO -> WARNING\n"
        hsm.submit(pool.uuid, vol, 20 * MiB).result(timeout=60)
        cmd[-1] = "info"
        subprocess.run([*cmd, "--socket", sock], capture_output=True, text=True, check=True)
        hsm.submit(pool.uuid, vol, 24 * MiB).result(timeout=60)
    finally:
        hsm.stop()
    spm.wait_log(r"extend done result=extended .*size_mb=24")
    assert spm.log().count("extend done result=extended") == logged + 1
    bad = subprocess.run([*cmd[:-1], "loud", "--socket", sock], capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr and "Traceback" not in bad.stderr
