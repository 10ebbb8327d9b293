"""The SPM daemon's safety at start and exit: children tied to its life,
the lease kept until every LVM child of ours is gone."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

from testlib import freezable
from xtnd.storage import constants as c
from xtnd.tools.rig import sanlockd
from xtnd.tools.rig.spmd import MiB, Pool, SpmProcess, assert_never_both, intervals, write_json
from xtnd.tools.rig.wait import wait_for


def test_refuses_without_pdeathsig(workdir: str) -> None:
    """Without setpriv no child can be tied to the daemon: refuse to start."""
    storage_config = os.path.join(workdir, "storage.json")
    write_json(storage_config, {"domains": {}})
    config = os.path.join(workdir, "spm.conf")
    with open(config, "w") as f:
        f.write(f"[spm]\nhost_id = 1\nmaster_domain = {uuid.uuid4()}\nstorage_config = {storage_config}\n")
    empty = os.path.join(workdir, "bin")
    os.mkdir(empty)
    result = subprocess.run(
        [sys.executable, "-m", "xtnd.tools.spm_cli", "--config", config],
        env={**os.environ, "PATH": empty},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stderr
    assert "refusing to start: setpriv (util-linux) not found" in result.stderr
    assert "Traceback" not in result.stderr


def _state(pid: int) -> str | None:
    """The process state letter (R, S, D, Z, ...), None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0]
    except OSError:
        return None


def _stuck_lvm_child(parent: int) -> int | None:
    """A child of parent running lvm that is in uninterruptible sleep."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        state, ppid = stat.rpartition(")")[2].split()[:2]
        if name == "lvm" and int(ppid) == parent and state == "D":
            return int(entry)
    return None


@contextlib.contextmanager
def _slow_pool(pvs: list[str], workdir: str) -> Iterator[tuple[Pool, freezable.FreezablePV, uuid.UUID]]:
    """A pool whose special LVs sit on a normal PV (sanlock and the mailbox
    keep working) and with one volume on a PV that the test can make hang."""
    with freezable.freezable_pv(workdir) as slow:
        pool = Pool(workdir, [pvs[0], slow.device])
        try:
            vol = uuid.uuid4()
            tags = [f"--addtag={t}" for t in (c.TAG_VOLUME, f"{c.TAG_CAPACITY}{100 * MiB}", f"{c.TAG_FORMAT}qcow2")]
            args = ["--name", str(vol), "--size", "8m", "--activate", "n", "--zero", "n", *tags]
            pool.domain.runner.run("lvcreate", *args, pool.domain.vg, slow.device)
            yield pool, slow, vol
        finally:
            slow.thaw()
            pool.remove()


def _stick_an_extend(
    pool: Pool, slow: freezable.FreezablePV, vol: uuid.UUID, spm: SpmProcess
) -> tuple[Any, Future[int], int]:
    """Start an HSM, make the SPM's lvextend of vol hang in its metadata
    write (from then on LVM commands on this VG hang, the test's too);
    return the HSM, the extend's future and the stuck lvm process's pid."""
    hsm = pool.hsm(host_id=3, reoffer_timeout=600.0)
    hsm.start()
    # A no-op first: the SPM reads the volume list before the freeze.
    assert hsm.submit(pool.uuid, vol, 8 * MiB).result(timeout=60) == 8 * MiB
    slow.freeze()
    future = hsm.submit(pool.uuid, vol, 12 * MiB)
    # The lvm process running the lvextend (its own, or the SPM's LVM shell).
    pid = wait_for(lambda: _stuck_lvm_child(spm.proc.pid), what="lvextend stuck in its metadata write")
    return hsm, future, pid


EXTRA = {"spm.shutdown_grace": "3", "lvm.command_timeout": "2"}


def test_lease_kept_until_stuck_lvextend_is_gone(
    pvs: list[str], sanlock_hosts: Callable[[int], list[sanlockd.SanlockDaemon]], workdir: str
) -> None:
    """SIGTERM while an lvextend is stuck in a metadata write, past
    shutdown_grace: the SPM kills it but keeps its registration, and so the
    lease, until the kernel lets it die; only then can the standby serve."""
    with _slow_pool(pvs, workdir) as (pool, slow, vol):
        host1, host2 = sanlock_hosts(2)
        spm1 = SpmProcess(host1, pool.spm_config(1, **EXTRA), os.path.join(workdir, "spm1.log"))
        spm1.wait_serving()
        spm2 = SpmProcess(host2, pool.spm_config(2, **EXTRA), os.path.join(workdir, "spm2.log"))
        spm2.wait_log("SPM lease busy, waiting")
        hsm, _, pid = _stick_an_extend(pool, slow, vol, spm1)
        try:
            spm1.proc.send_signal(signal.SIGTERM)
            # Today's code exited here, freeing the lease under the stuck command.
            spm1.wait_log("extends still running after shutdown_grace")
            spm1.wait_log("children still alive after SIGKILL")
            assert _state(pid) == "D"
            assert spm1.proc.poll() is None
            assert spm2.serving() == []
            thawed = time.monotonic()
            slow.thaw()
            assert spm1.wait() == 4
            # Dead (a zombie until its new parent reaps it).
            assert _state(pid) in (None, "Z")
            spm2.wait_serving()
        finally:
            slow.thaw()
            hsm.stop()
        [(_, _, _), (what, _, stopped)] = spm1.serving()
        assert what == "stopped" and stopped > thawed, "stopped serving while its lvextend could still write"
        assert "all children gone" in spm1.log()
        assert_never_both(intervals((spm1, None), (spm2, None)))
        assert spm2.terminate() == 0


def test_lease_loss_waits_for_stuck_lvextend(
    pvs: list[str], sanlock_hosts: Callable[[int], list[sanlockd.SanlockDaemon]], workdir: str
) -> None:
    """The lease taken away (released behind the SPM's back) while an
    lvextend is stuck: no reply is written, no command starts, and the
    process exits (code 3) only once that lvextend is dead."""
    with _slow_pool(pvs, workdir) as (pool, slow, vol):
        [host] = sanlock_hosts(1)
        spm = SpmProcess(host, pool.spm_config(1, **EXTRA), os.path.join(workdir, "spm1.log"))
        spm.wait_serving()
        loc = pool.domain.spm_lease()
        resource = f"{pool.uuid}:{loc.resource}:{loc.path}:{loc.offset}"
        hsm, future, pid = _stick_an_extend(pool, slow, vol, spm)
        try:
            host.client("release", "-r", resource, "-p", str(spm.proc.pid))
            spm.wait_log("lease lost, exiting")
            spm.wait_log("children still alive after SIGKILL")
            assert _state(pid) == "D"
            assert spm.proc.poll() is None
            slow.thaw()
            assert spm.wait() == 3
            assert _state(pid) in (None, "Z")
            # The killed extend's failure was not written: the next SPM serves it.
            assert not future.done()
        finally:
            slow.thaw()
            hsm.stop()
        assert "all children gone" in spm.log()
