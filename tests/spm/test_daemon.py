"""A real ``xtnd spm`` daemon (own sanlock daemon and namespace) serving a real HSM mailbox.

Every extend runs a real lvextend; sizes are checked with lvs. Refusals are
checked on the wire (reply size 0) and in the daemon's log line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import uuid
from collections.abc import Callable, Iterator

import pytest
from testlib.sdnotify import NotifySocket
from xtnd import lvm
from xtnd.mailbox import notice
from xtnd.mailbox.directio import DirectFile
from xtnd.mailbox.hsm import ExtendFailed
from xtnd.spm.control import ControlClient
from xtnd.storage import constants as c
from xtnd.tools.rig import loops, sanlockd, spmd
from xtnd.tools.rig.spmd import MiB, Pool, SpmProcess
from xtnd.tools.rig.wait import wait_for

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[Pool, SpmProcess]]:
    """One pool and one serving SPM for the extend-path tests below (each
    start costs ~5 s: loop PV and domain, sanlock host, lockspace join).
    The tests share its log and counters: each counts from where it
    started, and uses its own volumes and HSM mailbox slot."""
    if not loops.is_root():
        pytest.skip("needs root")
    if sanlockd.missing():
        pytest.skip(f"sanlock: {sanlockd.missing()}")
    os.makedirs(loops.BASE, exist_ok=True)
    workdir = loops.workdir("test_daemon-served")
    host = sanlockd.SanlockDaemon("host1", workdir)
    try:
        with loops.loop_pvs(workdir, count=1) as pvs:
            pool = Pool(workdir, pvs)
            try:
                proc = SpmProcess(host.start(), pool.spm_config(1), os.path.join(workdir, "spm1.log"))
                proc.wait_serving()
                yield pool, proc
                if proc.proc.poll() is None:
                    proc.kill()
            finally:
                host.stop()
                pool.close()
                with contextlib.suppress(lvm.LVMError):
                    lvm.vgremove(pool.domain.runner, pool.domain.vg)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def test_extend_flow(served: tuple[Pool, SpmProcess]) -> None:
    pool, spm = served
    start = len(spm.log())
    sock = os.path.join(pool.workdir, "spm1.sock")
    stats = ControlClient(sock).call("stats")["extends"]
    extended, lvextends = stats["results"].get("extended", 0), stats["lvextend"]["count"]
    vol = pool.create_volume(capacity=100 * MiB, size=8 * MiB)
    hsm = pool.hsm(host_id=2)
    hsm.start()
    try:
        # Request-to-reply through the mailbox, real lvextend.
        assert hsm.submit(pool.uuid, vol, 20 * MiB).result(timeout=60) == 20 * MiB
        assert pool.lv_size(vol) == 20 * MiB
        # A size not on an extent boundary is rounded up to one (4 MiB).
        assert hsm.submit(pool.uuid, vol, 29 * MiB).result(timeout=60) == 32 * MiB
        assert pool.lv_size(vol) == 32 * MiB
        # Replays and smaller sizes: success with the current size, no change.
        assert hsm.submit(pool.uuid, vol, 29 * MiB).result(timeout=60) == 32 * MiB
        assert hsm.submit(pool.uuid, vol, 10 * MiB).result(timeout=60) == 32 * MiB
        assert pool.lv_size(vol) == 32 * MiB
        # Exactly the max size (capacity x 1.1) is allowed.
        assert hsm.submit(pool.uuid, vol, 110 * MiB).result(timeout=60) == 112 * MiB
        # volume resize through the daemon's socket: validation follows the
        # new capacity at once, and the notice is in outbox block 0.
        with pytest.raises(ExtendFailed):
            hsm.submit(pool.uuid, vol, 125 * MiB).result(timeout=60)
        result = ControlClient(sock).call("volume_resize", domain=str(pool.uuid), uuid=str(vol), size=120 * MiB)
        assert result["changed"] and result["volume"]["capacity"] == 120 * MiB
        assert hsm.submit(pool.uuid, vol, 125 * MiB).result(timeout=60) == 128 * MiB
        with DirectFile(pool.domain.mailbox().outbox, readonly=True) as f:
            sent = notice.read(f)
        assert sent is not None and (sent.volume, sent.capacity) == (vol, 120 * MiB)
    finally:
        hsm.stop()
    log = spm.log()[start:]
    assert log.count("extend done result=extended") == 4
    assert log.count("extend done result=noop") == 2
    line = next(ln for ln in log.splitlines() if "extend done result=extended" in ln)
    for key in ("queue_ms=", "lock_ms=", "validate_ms=", "fence_ms=", "lvextend_ms=", "total_ms=", f"volume={vol}"):
        assert key in line
    # With the real lease, fence() (sanlock inquire + client status) runs before each lvextend.
    fences = [float(m) for m in re.findall(r"result=extended .*?fence_ms=([\d.]+)", log)]
    assert len(fences) == 4 and all(f > 0 for f in fences)
    logging.getLogger("xtnd.tests.spm").info("fence_ms=%s", fences)
    stats = ControlClient(sock).call("stats")
    assert stats["lease_held"] is True
    assert stats["extends"]["results"]["extended"] == extended + 4
    assert stats["extends"]["lvextend"]["count"] == lvextends + 4


def test_refusals(served: tuple[Pool, SpmProcess]) -> None:
    pool, spm = served
    start = len(spm.log())
    vol = pool.create_volume(capacity=100 * MiB, size=8 * MiB)
    # An LV tagged special (like ids/leases/inbox/outbox) and one xtnd did not make.
    special, foreign = uuid.uuid4(), uuid.uuid4()
    lvm.lvcreate(pool.domain.runner, pool.domain.vg, str(special), 8 * MiB, (c.TAG_SPECIAL,))
    lvm.lvcreate(pool.domain.runner, pool.domain.vg, str(foreign), 8 * MiB)
    free = pool.free_extents()
    hsm = pool.hsm(host_id=3)
    hsm.start()
    try:
        cases = {
            "unknown domain": (uuid.uuid4(), vol, 20 * MiB),
            "unknown volume": (pool.uuid, uuid.uuid4(), 20 * MiB),
            "special": (pool.uuid, special, 20 * MiB),
            "foreign": (pool.uuid, foreign, 20 * MiB),
            "oversize": (pool.uuid, vol, 111 * MiB),
        }
        for name, (sd, v, size) in cases.items():
            with pytest.raises(ExtendFailed):
                hsm.submit(sd, v, size).result(timeout=60)
            assert spm.log()[start:].count("extend done result=refused") == list(cases).index(name) + 1, name
    finally:
        hsm.stop()
    assert pool.free_extents() == free
    assert pool.lv_size(vol) == pool.lv_size(special) == pool.lv_size(foreign) == 8 * MiB
    log = spm.log()[start:]
    assert "not managed by this SPM" in log
    assert "unknown volume" in log
    assert "special LV" in log and "foreign LV" in log
    assert "above max size" in log
    # No LVM command for any of them.
    refused = [ln for ln in log.splitlines() if "extend done result=refused" in ln]
    assert len(refused) == len(cases)
    assert all("lvextend_ms=0.000" in ln for ln in refused)


def test_no_free_extents(served: tuple[Pool, SpmProcess]) -> None:
    pool, spm = served
    start = len(spm.log())
    vol = pool.create_volume(capacity=2000 * MiB, size=8 * MiB)
    # Take every free extent but one (the last of the module's tests: the VG stays full).
    filler = "filler"
    lvm.lvcreate(pool.domain.runner, pool.domain.vg, filler, (pool.free_extents() - 1) * 4 * MiB)
    hsm = pool.hsm(host_id=4)
    hsm.start()
    try:
        with pytest.raises(ExtendFailed):
            hsm.submit(pool.uuid, vol, 20 * MiB).result(timeout=60)
        # The one free extent still serves a smaller request.
        assert hsm.submit(pool.uuid, vol, 12 * MiB).result(timeout=60) == 12 * MiB
    finally:
        hsm.stop()
    assert pool.lv_size(vol) == 12 * MiB
    assert pool.free_extents() == 0
    spm.wait_log(r"extend done result=failed .*")
    [failed] = re.findall(r"extend done result=failed .*", spm.log()[start:])
    assert "no free space in domain" in failed


def test_sigterm_releases_lease(
    pool: Pool, sanlock_hosts: Callable[[int], list[sanlockd.SanlockDaemon]], workdir: str, notify: NotifySocket
) -> None:
    """systemd's view of one SPM life: watchdog pings from the start (the
    lockspace join takes seconds), READY=1 once serving, pings while
    serving, STOPPING=1 on SIGTERM, the lease released and the control
    socket gone. (Once test_watchdog.py started its own daemon for the
    pings: the same start and stop, ~7 s, twice.)"""
    [host] = sanlock_hosts(1)
    env = notify.env(watchdog_usec=1_000_000)  # a ping every 0.5 s
    spm = SpmProcess(host, pool.spm_config(1), os.path.join(workdir, "spm1.log"), env=env)
    try:
        before = notify.until_ready()
        assert spm.serving()[0][0] == "started", "READY=1 before serving"
        # Joining the lockspace takes seconds: pinged meanwhile.
        assert "WATCHDOG=1" in before, before
        after = [notify.recv() for _ in range(3)]
        assert after == ["WATCHDOG=1"] * 3, after
        assert "systemd watchdog enabled period=1.0s" in spm.log()
        assert os.path.exists(os.path.join(pool.workdir, "spm1.sock"))
        assert spm.terminate() == 0
        # Pings sent before the signal may still be queued ahead of it.
        last = notify.recv()
        while last == "WATCHDOG=1":
            last = notify.recv()
        assert "STOPPING=1" in last, last
    finally:
        if spm.proc.poll() is None:
            spm.kill()
    log = spm.log()
    assert "released lease" in log
    [started, stopped] = spm.serving()
    assert started[0] == "started" and stopped[0] == "stopped" and started[2] < stopped[2]
    assert not os.path.exists(os.path.join(pool.workdir, "spm1.sock"))


@pytest.mark.parametrize("shell", ["true", "false"])
def test_sigterm_with_requests_in_flight(
    pool: Pool, sanlock_hosts: Callable[[int], list[sanlockd.SanlockDaemon]], workdir: str, shell: str
) -> None:
    """SIGTERM mid-burst: running extends finish, the rest waits for the next SPM.

    shell=true: one extend waits in the LVM shell's lvextend, the other for
    the shell; false: both wait in lvextend processes."""
    [host] = sanlock_hosts(1)
    # Two workers: at most two requests are being handled when SIGTERM comes.
    config = pool.spm_config(1, **{"mailbox.workers": "2", "lvm.shell": shell})
    control = ControlClient(os.path.join(workdir, "spm1.sock"))
    spm = SpmProcess(host, config, os.path.join(workdir, "spm1.log"))
    spm.wait_serving()
    volumes = [pool.create_volume(capacity=100 * MiB, size=8 * MiB) for _ in range(4)]
    hsm = pool.hsm(host_id=2, reoffer_timeout=60.0)
    hsm.start()
    try:
        # A no-op extend per volume makes the SPM read the new volumes (lvs)
        # before the VG is locked below.
        for v in volumes:
            assert hsm.submit(pool.uuid, v, 8 * MiB).result(timeout=60) == 8 * MiB
        # LVM's VG lock held by the test: both workers sit in lvextend when
        # SIGTERM comes, however fast extends are on this machine.
        with spmd.vg_locked(str(pool.uuid)):
            futures = [hsm.submit(pool.uuid, v, 8 * MiB + step * 4 * MiB) for step in (1, 2, 3) for v in volumes]
            if shell == "true":
                wait_for(lambda: control.call("stats")["extends"]["in_flight"] == 2, what="two extends in flight")
            else:
                wait_for(lambda: len(spmd.lvm_commands("lvextend", str(pool.uuid))) == 2, what="two lvextends waiting")
            spm.proc.send_signal(signal.SIGTERM)
            spm.wait_log("stopping reason=")
        assert spm.wait() == 0
        log = spm.log()
        assert "extends drained done=True" in log
        assert "released lease" in log
        served = log.count("extend done result=extended")
        # Exactly the two extends waiting in lvextend finished, and their
        # replies were written before the SPM exited: the HSM gets them
        # with no SPM running.
        assert served == 2
        wait_for(lambda: sum(f.done() for f in futures) == 2, what="the two replies of the stopped SPM")
        # The next SPM (same host, lockspace still joined) serves the rest.
        again = SpmProcess(host, config, os.path.join(workdir, "spm1-again.log"))
        again.wait_serving()
        for step, future in zip([s for s in (1, 2, 3) for _ in volumes], futures, strict=True):
            assert future.result(timeout=60) >= 8 * MiB + step * 4 * MiB
    finally:
        hsm.stop()
    assert served < len(futures), "everything was served before SIGTERM"
    for vol in volumes:
        assert pool.lv_size(vol) == 8 * MiB + 3 * 4 * MiB
    assert again.terminate() == 0


