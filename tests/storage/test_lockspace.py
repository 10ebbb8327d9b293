"""One host per host id: the HSM and SPM daemons hold theirs in the lockspace.

Real sanlock daemons, one per simulated host in its own mount namespace,
over a master block domain on a loop PV (lockspace io_timeout 1 s, so a
join takes ~3 s); real ``xtnd hsm`` and ``xtnd spm`` processes.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from xtnd import lvm
from xtnd.mailbox import codec
from xtnd.mailbox.directio import DirectFile
from xtnd.storage import lockspace, sanlockutil
from xtnd.storage.model import LockspaceLocation
from xtnd.tools.rig import loops
from xtnd.tools.rig.sanlockd import RUN_DIR, SanlockDaemon
from xtnd.tools.rig.spmd import Pool, SpmProcess
from xtnd.tools.rig.wait import wait_for

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]

Hosts = Callable[[int], list[SanlockDaemon]]


@pytest.fixture
def pool(workdir: str, need_root: None) -> Iterator[Pool]:
    if lvm.device_mapper_available():
        pytest.skip("these tests map LVs with loop devices (no device-mapper)")
    with loops.loop_pvs(workdir, count=1) as pvs:
        p = Pool(workdir, pvs)  # max_hosts 10
        try:
            yield p
        finally:
            p.remove()


class NoSanlock:
    """A host whose sanlock daemon is not running: its own empty /run/sanlock."""

    def popen(self, cmd: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        script = f'mount -t tmpfs -o mode=0755 xtnd-no-sanlock {RUN_DIR} && exec "$@"'
        argv = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh", *cmd]
        return subprocess.Popen(argv, **kwargs)


class HsmProcess:
    """``xtnd hsm --config FILE`` in a host's namespace, logging to a file."""

    def __init__(self, host: SanlockDaemon | NoSanlock, pool: Pool, host_id: int, name: str):
        # Only [host] matters here ([lease] does not exist for the HSM); no
        # metrics port, and a libvirt that is not there (the HSM keeps trying).
        conf = os.path.join(pool.workdir, f"{name}.conf")
        with open(conf, "w") as f:
            f.write(
                f"[host]\nhost_id = {host_id}\nmaster_domain = {pool.uuid}\n"
                f"storage_config = {pool.storage_config}\nrun_dir = {os.path.join(pool.workdir, 'run')}\n"
                "control_socket =\n"
                "[metrics]\nlisten =\n[api]\nsocket =\n"
                f"[libvirt]\nuri = qemu:///system?socket={os.path.join(pool.workdir, 'no-libvirt.sock')}\n"
            )
        self.logfile = os.path.join(pool.workdir, f"{name}.log")
        with open(self.logfile, "ab") as out:
            argv = [sys.executable, "-m", "xtnd.tools.cli", "hsm", "--config", conf]
            self.proc = host.popen(argv, stdout=out, stderr=subprocess.STDOUT)

    def log(self) -> str:
        with open(self.logfile, errors="replace") as f:
            return f.read()

    def wait_started(self, timeout: float = 60.0) -> None:
        def started() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"hsm exited rc={self.proc.returncode}:\n{self.log()[-3000:]}")
            return "hsm started" in self.log()

        wait_for(started, timeout=timeout, interval=0.05, what=f"hsm started in {self.logfile}")

    def wait(self, timeout: float = 60.0) -> int:
        return self.proc.wait(timeout)

    def terminate(self, timeout: float = 60.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)


def spm(pool: Pool, host: SanlockDaemon, host_id: int, name: str, **extra: str) -> SpmProcess:
    config = pool.spm_config(host_id, name=f"{name}.conf", **extra)
    return SpmProcess(host, config, os.path.join(pool.workdir, f"{name}.log"))


def spaces(host: SanlockDaemon, location: LockspaceLocation) -> list[str]:
    """The lockspace lines (s NAME:HOST_ID:...) the host's daemon lists."""
    out = host.client("status").stdout
    return [ln for ln in out.splitlines() if ln.startswith(f"s {location.name}:")]


def holds_spm_lease(host: SanlockDaemon, location: LockspaceLocation) -> bool:
    out = host.client("status").stdout
    return any(ln.startswith(f"r {location.name}:SDM:") for ln in out.splitlines())


def refusal(line_source: str) -> str:
    """The one error line of a refused daemon (and that there is no traceback)."""
    assert "Traceback" not in line_source, line_source
    [line] = [ln for ln in line_source.splitlines() if "refusing to start" in ln]
    return line


def test_hsm_refuses_a_host_id_another_live_host_holds(pool: Pool, sanlock_hosts: Hosts) -> None:
    """Host 1 runs an HSM with id 1, host 2 is a plain sanlock client (a
    vdsm host of a mixed pool) with id 2: both hold their ids side by side.
    An HSM on host 3 configured with id 1 or 2 is refused at once (exit 2),
    naming the id and the sanlock host that holds it; host 1's HSM runs on."""
    h1, h2, h3 = sanlock_hosts(3)
    location = pool.domain.lockspace()
    first = HsmProcess(h1, pool, 1, "hsm1")
    arg = f"{location.name}:2:{location.path}:{location.offset}"
    h2.client("add_lockspace", "-o", "1", "-s", arg)
    first.wait_started()
    assert len(spaces(h1, location)) == 1 and len(spaces(h2, location)) == 1

    for host_id in (1, 2):
        owner = lockspace.DeltaLease.read(location, host_id).owner
        second = HsmProcess(h3, pool, host_id, f"hsm3-{host_id}")
        assert second.wait(30) == 2, second.log()
        line = refusal(second.log())
        assert f"host id {host_id} " in line and owner in line, line
        assert not spaces(h3, location)

    # A second HSM on the same host with the same id: sanlock cannot tell
    # it from the first (one daemon, one membership); xtnd refuses it.
    twin = HsmProcess(h1, pool, 1, "hsm1-twin")
    assert twin.wait(30) == 2, twin.log()
    line = refusal(twin.log())
    assert f"another hsm of this host already uses host id 1 in lockspace {location.name}: pid " in line, line

    assert first.proc.poll() is None
    assert first.terminate() == 0, first.log()
    # Stopped cleanly, host 1 released the id: another host may use it now.
    assert lockspace.DeltaLease.read(location, 1).timestamp == 0
    moved = HsmProcess(h3, pool, 1, "hsm3-moved")
    moved.wait_started()
    assert moved.terminate() == 0, moved.log()


def test_spm_and_hsm_share_the_host_id_in_both_orders(pool: Pool, sanlock_hosts: Hosts) -> None:
    """One host, one id: the HSM and the SPM start in either order, and
    stopping either never drops the other's membership or the SPM lease;
    the last one to stop leaves the lockspace."""
    [host] = sanlock_hosts(1)
    location = pool.domain.lockspace()

    hsm = HsmProcess(host, pool, 1, "hsm-a")  # HSM first
    hsm.wait_started()
    assert len(spaces(host, location)) == 1
    first = spm(pool, host, 1, "spm-a")
    first.wait_serving()
    assert first.terminate() == 0, first.log()
    assert len(spaces(host, location)) == 1 and hsm.proc.poll() is None

    second = spm(pool, host, 1, "spm-b")
    second.wait_serving()
    # One host, one id: an HSM configured with another id than its SPM's.
    wrong = HsmProcess(host, pool, 2, "hsm-wrong-id")
    assert wrong.wait(30) == 2, wrong.log()
    assert "this host is already in lockspace" in refusal(wrong.log())
    assert "as host id 1, not 2" in refusal(wrong.log())
    assert hsm.terminate() == 0, hsm.log()
    assert "lockspace kept for its other users" in hsm.log()
    assert holds_spm_lease(host, location) and len(spaces(host, location)) == 1

    hsm = HsmProcess(host, pool, 1, "hsm-b")  # SPM first
    hsm.wait_started()
    assert "lockspace already joined by this host" in hsm.log()
    assert second.terminate() == 0, second.log()
    assert second.serving()[-1][0] == "stopped" and "lease lost" not in second.log()
    assert len(spaces(host, location)) == 1
    # Still renewed, by the HSM's own criterion (a renewal within 6 x io_timeout).
    status = sanlockutil.parse_status(host.client("status", "-D").stdout, location.name, 1)
    assert status is not None and status.trouble() is None and status.renewal_age <= 6, status
    assert hsm.proc.poll() is None and "lost" not in hsm.log()
    assert hsm.terminate() == 0, hsm.log()
    assert "left lockspace" in hsm.log()
    assert not spaces(host, location)


def test_spm_and_hsm_started_together(pool: Pool, sanlock_hosts: Hosts) -> None:
    """Started at the same moment, one of them joins and the other waits for
    that join to end (sanlock answers EEXIST while it is under way) before
    it touches its mailbox block or the lease."""
    [host] = sanlock_hosts(1)
    location = pool.domain.lockspace()
    hsm = HsmProcess(host, pool, 1, "hsm-t")
    proc = spm(pool, host, 1, "spm-t")
    proc.wait_serving()
    hsm.wait_started()
    logs = hsm.log() + proc.log()
    assert logs.count("joined lockspace lockspace=") == 1, logs
    assert len(spaces(host, location)) == 1
    assert hsm.terminate() == 0 and proc.terminate() == 0
    assert not spaces(host, location)


def test_hsm_without_sanlock_daemon(pool: Pool) -> None:
    """No sanlock daemon: the HSM cannot hold its id, says so in one line
    and exits 1 (systemd retries: sanlock may still be starting)."""
    hsm = HsmProcess(NoSanlock(), pool, 1, "hsm-nosanlock")
    assert hsm.wait(30) == 1, hsm.log()
    assert "Traceback" not in hsm.log()
    [line] = [ln for ln in hsm.log().splitlines() if "cannot start" in ln]
    assert "sanlock" in line, line


def test_unreadable_lockspace_fails_in_one_line(pool: Pool, sanlock_hosts: Hosts) -> None:
    """The ids area holds no lockspace (wiped): neither daemon can know the
    io_timeout to join with; both exit 1 with one line, no traceback."""
    [host] = sanlock_hosts(1)
    location = pool.domain.lockspace()
    with DirectFile(location.path) as ids:
        ids.write(0, bytes(1024 * 1024))
    hsm = HsmProcess(host, pool, 1, "hsm-wiped")
    proc = spm(pool, host, 1, "spm-wiped")
    for rc, text in ((hsm.wait(30), hsm.log()), (proc.wait(30), proc.log())):
        assert rc == 1 and "Traceback" not in text, text
        [line] = [ln for ln in text.splitlines() if "cannot start" in ln]
        assert f"cannot read the io_timeout of lockspace {location.name}" in line, line


def test_host_id_above_max_hosts_refused(pool: Pool, sanlock_hosts: Hosts) -> None:
    [host] = sanlock_hosts(1)
    hsm = HsmProcess(host, pool, 11, "hsm11")
    assert hsm.wait(30) == 2, hsm.log()
    assert "host id 11 is not in 1..10" in refusal(hsm.log())
    proc = spm(pool, host, 11, "spm11")
    assert proc.wait(30) == 2, proc.log()
    assert "host id 11 is not in 1..10" in refusal(proc.log())
    assert not spaces(host, pool.domain.lockspace())


def test_spm_io_timeout_must_match_the_lockspace(pool: Pool, sanlock_hosts: Hosts) -> None:
    """The pool's lockspace has io_timeout 1; an SPM configured with 2 would
    renew at another pace than every other host expects."""
    [host] = sanlock_hosts(1)
    proc = spm(pool, host, 1, "spm-io", **{"lease.io_timeout": "2"})
    assert proc.wait(30) == 2, proc.log()
    line = refusal(proc.log())
    assert re.search(r"io_timeout 2 differs from the io_timeout 1 of lockspace", line), line
    assert not spaces(host, pool.domain.lockspace())


def test_hsm_stops_writing_its_block_when_renewals_fail(pool: Pool, sanlock_hosts: Hosts) -> None:
    """The ids area becomes unreadable for this host (its loop device now
    answers only the first sector): sanlock cannot renew the delta lease,
    and after 6 x io_timeout the HSM stops writing its block and exits 3,
    well before another host could take the id (8 x io_timeout + 60 s)."""
    [host] = sanlock_hosts(1)
    location = pool.domain.lockspace()
    hsm = HsmProcess(host, pool, 1, "hsm-renew")
    hsm.wait_started()
    theirs = bytes(range(255, -1, -1)) * (codec.BLOCK_SIZE // 256)
    with DirectFile(pool.domain.mailbox().inbox) as inbox:
        inbox.write(1 * codec.BLOCK_SIZE, theirs)
        loops.fail_storage(location.path)
        try:
            assert hsm.wait(40) == 3, hsm.log()
        finally:
            loops.restore_storage(location.path)
        assert re.search(r"host id 1 in lockspace \S+ lost: ", hsm.log()), hsm.log()
        assert "Traceback" not in hsm.log()
        assert inbox.read(1 * codec.BLOCK_SIZE, codec.BLOCK_SIZE) == theirs


def test_hsm_stops_writing_its_block_when_the_host_id_is_lost(pool: Pool, sanlock_hosts: Hosts) -> None:
    """sanlock drops the HSM's host id (here: removed by hand). The HSM must
    never write its mailbox block again, not even the usual clearing on
    stop: the block may be another host's by now. It exits with 3."""
    [host] = sanlock_hosts(1)
    location = pool.domain.lockspace()
    hsm = HsmProcess(host, pool, 1, "hsm-lost")
    hsm.wait_started()
    # What another host now owning id 1 would have written.
    theirs = bytes(range(256)) * (codec.BLOCK_SIZE // 256)
    with DirectFile(pool.domain.mailbox().inbox) as inbox:
        inbox.write(1 * codec.BLOCK_SIZE, theirs)
        host.client("rem_lockspace", "-s", f"{location.name}:1:{location.path}:{location.offset}")
        assert hsm.wait(30) == 3, hsm.log()
        assert re.search(r"host id 1 in lockspace \S+ lost: ", hsm.log()), hsm.log()
        assert "Traceback" not in hsm.log()
        assert inbox.read(1 * codec.BLOCK_SIZE, codec.BLOCK_SIZE) == theirs


# Pure logic, beside the real-stack tests above.


def test_checks_name_the_values() -> None:
    lockspace.check_host_id("ls", 10, 10)
    with pytest.raises(lockspace.HostIdOutOfRange, match=r"host id 11 is not in 1\.\.10"):
        lockspace.check_host_id("ls", 11, 10)
    with pytest.raises(lockspace.HostIdOutOfRange):
        lockspace.check_host_id("ls", 0, 10)
    lockspace.check_io_timeout("ls", 10, 10)
    with pytest.raises(lockspace.IoTimeoutMismatch, match="io_timeout 2 differs from the io_timeout 1"):
        lockspace.check_io_timeout("ls", 2, 1)
    for refusal_type in (lockspace.HostIdOutOfRange, lockspace.IoTimeoutMismatch, lockspace.HostIdBusy):
        assert issubclass(refusal_type, lockspace.MembershipRefused)


class _Flaky(lockspace.Membership):
    """check() fails on the n-th call."""

    def __init__(self, fail_at: int):
        super().__init__(LockspaceLocation("ls", "/nonexistent", 0), 1, 1)
        self.calls = 0
        self.fail_at = fail_at

    def check(self) -> None:
        self.calls += 1
        if self.calls >= self.fail_at:
            raise lockspace.MembershipLost("ls", 1, "gone")


def test_watch_reports_a_loss_once() -> None:
    lost: list[lockspace.MembershipLost] = []
    watch = lockspace.MembershipWatch(_Flaky(fail_at=2), lost.append)
    assert watch.step()
    assert not watch.step()
    assert not watch.step()
    assert [str(e) for e in lost] == ["host id 1 in lockspace ls lost: gone"]


@pytest.mark.soak
def test_random_stops_and_starts_keep_the_shared_id(pool: Pool, sanlock_hosts: Hosts) -> None:
    """Many random stops and starts of the host's HSM and SPM: while either
    runs the host holds its id, a running SPM never loses its lease, and
    the last one to stop leaves the lockspace."""
    import random

    [host] = sanlock_hosts(1)
    location = pool.domain.lockspace()
    rng = random.Random(7)
    hsm: HsmProcess | None = None
    spm_proc: SpmProcess | None = None
    for step in range(int(os.environ.get("XTND_LOCKSPACE_STEPS", "20"))):
        if rng.random() < 0.5:
            if hsm is None:
                hsm = HsmProcess(host, pool, 1, f"soak-hsm-{step}")
                hsm.wait_started()
            else:
                assert hsm.terminate() == 0, hsm.log()
                hsm = None
        else:
            if spm_proc is None:
                spm_proc = spm(pool, host, 1, f"soak-spm-{step}")
                spm_proc.wait_serving()
            else:
                assert spm_proc.terminate() == 0, spm_proc.log()
                assert "lease lost" not in spm_proc.log()
                spm_proc = None
        running = [p.proc for p in (hsm, spm_proc) if p is not None]
        assert all(p.poll() is None for p in running)
        assert len(spaces(host, location)) == (1 if running else 0), step
        assert holds_spm_lease(host, location) == (spm_proc is not None), step
    for proc in (hsm, spm_proc):
        if proc is not None:
            assert proc.terminate() == 0
    assert not spaces(host, location)
