"""Real guests for ``xtnd inject``: a private libvirtd, TCG guests, ``xtnd hsm``.

Built on first use by a scenario that needs guests (Rig.guests()), once per
run, and torn down with the rig:

- a private libvirtd (xtnd.tools.rig.hsmrig.NamespacedLibvirtd) that a
  scenario may kill and restart under running guests and a running HSM,
  without touching the machine's libvirtd or anyone else's guests;
- the guest kernel and initramfs (xtnd.tools.rig.guest.build_rig, cached);
- guests named ``xtnd-inject-<rig>-...`` on thin qcow2 volumes of the rig's
  master domain, prepared (loop-mapped) and linked under a trial's run
  folder, where the trial's ``xtnd hsm`` watches them.

A harness killed outright leaves QEMU processes behind (libvirtd starts
them detached); the next run's clean-up (harness.clean_stale -> sweep())
kills every process whose command line names the dead rig's folder.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import uuid as uuidlib
from typing import TYPE_CHECKING

import libvirt
from xtnd.common import history
from xtnd.hsm import config as hsm_config
from xtnd.hsm import links
from xtnd.tools.rig import guest, hsmrig
from xtnd.tools.rig.wait import wait_for

if TYPE_CHECKING:
    from xtnd.tools.inject.harness import Trial

log = logging.getLogger("xtnd.inject")

PREFIX = "xtnd-inject-"
MiB = 1024**2


def _noop_error(ctx: object, err: object) -> None:
    """libvirt prints every error on stderr unless a handler is set."""


class GuestRig:
    """The run's private libvirtd and the guests defined on it."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.prefix = f"{PREFIX}{os.path.basename(workdir)}-"
        self.boot = guest.build_rig()
        libvirt.registerErrorHandler(_noop_error, None)
        self.libvirtd = hsmrig.NamespacedLibvirtd(workdir)
        try:
            self.libvirtd.start()
            self.conn: libvirt.virConnect = libvirt.open(self.libvirtd.uri())
        except BaseException:
            self.libvirtd.close()
            raise
        self.guests: list[guest.Guest] = []

    @property
    def uri(self) -> str:
        return self.libvirtd.uri()

    def define(self, disk: str, workload: guest.Workload, workdir: str) -> guest.Guest:
        g = guest.Guest.define(self.conn, self.boot, disk, workload, workdir, prefix=self.prefix)
        self.guests.append(g)
        return g

    def remove(self, g: guest.Guest) -> None:
        g.remove()
        if g in self.guests:
            self.guests.remove(g)

    def restart_libvirtd(self) -> None:
        """Kill libvirtd (SIGKILL) and start it again; the guests keep running."""
        self.kill_libvirtd()
        self.start_libvirtd()

    def kill_libvirtd(self) -> None:
        self.libvirtd.kill()
        with contextlib.suppress(libvirt.libvirtError):
            self.conn.close()

    def start_libvirtd(self) -> None:
        """Start it again and re-open our connection and domain handles."""
        self.libvirtd.start()
        self.conn = libvirt.open(self.libvirtd.uri())
        for g in self.guests:
            g.conn = self.conn
            with contextlib.suppress(libvirt.libvirtError):
                g.dom = self.conn.lookupByName(g.name)

    def close(self) -> None:
        """Destroy every domain of this libvirtd, then stop it."""
        if self.libvirtd.proc is None:
            with contextlib.suppress(Exception):
                self.start_libvirtd()
        with contextlib.suppress(libvirt.libvirtError):
            for dom in self.conn.listAllDomains():
                with contextlib.suppress(libvirt.libvirtError):
                    if dom.isActive():
                        dom.destroy()
                with contextlib.suppress(libvirt.libvirtError):
                    dom.undefine()
        with contextlib.suppress(libvirt.libvirtError):
            self.conn.close()
        self.libvirtd.close()
        # A QEMU that libvirt could not destroy (libvirtd dead) still holds
        # the namespace and the volumes: end it by its pid.
        sweep(self.workdir)


def _cmdline(pid: str) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[-1][:1] not in ("Z", "X")
    except OSError:
        return False


def sweep(path: str) -> list[int]:
    """SIGKILL every process whose command line names path (a rig's folder):
    the QEMU processes of a rig whose harness died, or, at the end of an
    interrupted run, its daemons still running."""
    needle = (path.rstrip("/") + "/").encode()
    killed: list[int] = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        if int(entry) != os.getpid() and needle in _cmdline(entry):
            with contextlib.suppress(OSError):
                os.kill(int(entry), signal.SIGKILL)
                killed.append(int(entry))
    # Gone or a zombie: its files (loop devices, the volumes) are closed
    # (an empty cmdline comes earlier, before the files are closed).
    with contextlib.suppress(Exception):
        wait_for(lambda: not any(_running(pid) for pid in killed), timeout=10, interval=0.02,
                 what=f"pids {killed} to exit")
    if killed:
        log.warning("killed processes left under %s: %s", path, killed)
    return killed


class GuestVolume:
    """A thin qcow2 volume of the trial, prepared and linked for its HSM."""

    def __init__(self, t: Trial, run_dir: str, capacity: int = 1024 * MiB, initial: int = 8 * MiB):
        self.trial = t
        domain = t.pool.domain
        self.uuid = uuidlib.uuid4()
        domain.create_volume(self.uuid, capacity, initial_size=initial)
        t.volumes.append(self.uuid)
        t.sizes_before[str(self.uuid)] = t.pool.lv_size(self.uuid)
        t.guest_volumes.append(self)
        self.run_dir = run_dir
        device = domain.prepare_volume(self.uuid)
        self.link = links.create(t.pool.uuid, self.uuid, device, run_dir)

    def teardown(self) -> None:
        """Unlink and unmap (before the trial removes the LV)."""
        links.remove(self.trial.pool.uuid, self.uuid, self.run_dir)
        with contextlib.suppress(Exception):
            self.trial.pool.domain.teardown_volume(self.uuid)


class HsmDaemon:
    """``xtnd hsm`` of a trial on SPM host 1 (host id 1, sharing the SPM's
    sanlock daemon), watching the trial's run folder through the rig's
    private libvirtd; its log is TRIAL/NAME.log."""

    def __init__(self, t: Trial, run_dir: str, chunk_mb: int = 8, utilization: int = 100):
        self.trial = t
        self.run_dir = run_dir
        c = hsm_config.Config()
        c.host.host_id = 1
        c.host.master_domain = str(t.pool.uuid)
        c.host.storage_config = t.pool.storage_config
        c.host.run_dir = run_dir
        c.host.control_socket = ""
        c.metrics.listen = ""
        c.api.socket = ""  # several HSMs on one machine: no fixed socket
        # Fixed chunks: the scenarios size their volumes' room by them.
        c.thin.policy = "fixed"
        c.thin.chunk_mb = chunk_mb
        c.thin.utilization_percent = utilization
        c.monitor.stats_interval = 0.5
        c.monitor.extend_timeout = 30.0
        c.retry.backoff_initial = 0.25
        c.retry.backoff_max = 1.0
        c.libvirt.uri = t.rig.guests().uri
        c.libvirt.reconnect_initial = 0.1
        c.libvirt.reconnect_max = 0.5
        self.config = os.path.join(t.dir, "hsm.conf")
        with open(self.config, "w") as f:
            f.write(hsm_config.show(c))
        self.starts = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.name = ""
        self.killed: set[int] = set()

    def start(self, wait: bool = True) -> subprocess.Popen[bytes]:
        """Start it; wait until it is connected to libvirt unless wait is False
        (then call wait_connected())."""
        self.starts += 1
        self.name = "hsm1" if self.starts == 1 else f"hsm1.{self.starts - 1}"
        t = self.trial
        env = {**os.environ, history.ENV: t.history, history.ENV_NAME: self.name}
        logfile = os.path.join(t.dir, f"{self.name}.log")
        with open(logfile, "ab") as out:
            self.proc = t.rig.hosts[0].popen([sys.executable, "-m", "xtnd.tools.cli", "hsm", "--config", self.config],
                                             env=env, stdout=out, stderr=subprocess.STDOUT)
        t.processes.append(self.proc)
        if wait:
            self.wait_connected()
        return self.proc

    def wait_connected(self) -> None:
        proc, t = self.proc, self.trial
        assert proc is not None

        def connected() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"{self.name} exited rc={proc.returncode}: {t.log_of(self.name)[-800:]}")
            return "connected to libvirt" in t.log_of(self.name)

        wait_for(connected, timeout=60, interval=0.05, what=f"{self.name} connected to libvirt")

    def log(self) -> str:
        return self.trial.log_of(self.name)

    def kill(self) -> None:
        assert self.proc is not None
        self.killed.add(self.proc.pid)
        self.trial.kill_process(self.proc, self.name)

    def stop(self) -> None:
        """SIGTERM at the end of the trial: it must have lived and must exit 0."""
        proc, t = self.proc, self.trial
        if proc is None:
            return
        if proc.poll() is not None:
            if proc.pid not in self.killed:
                history.record("died", target=proc.pid, name=self.name, rc=proc.returncode)
            return
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        if rc != 0:
            history.record("died", target=proc.pid, name=self.name, rc=rc)
        t.expect("Traceback" not in self.log(), f"{self.name} logged a traceback")
