"""The throw-away rig of ``xtnd inject`` and the trial runner.

One Rig per scenario run: a loop-device PV under /var/tmp with a master
block domain (xtnd.tools.rig.spmd.Pool), one real sanlock daemon per SPM
host in its own mount namespace, real ``xtnd spm`` processes, HSM mailbox
clients in this process (the real HSM mailbox code, on real O_DIRECT
files). Every trial gets its own volumes and history file; the SPMs and
clients a trial starts are stopped at its end, the rig at the end of the
run, also on Ctrl-C, SIGTERM or an exception (children also die with this
process: PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from xtnd import lvm
from xtnd.common import history
from xtnd.lvm import loop as lvloop
from xtnd.mailbox.hsm import HSMMailbox
from xtnd.tools.inject import checker, fusefile
from xtnd.tools.rig import loops, sanlockd
from xtnd.tools.rig.spmd import EXTENT, MiB, Pool, SpmProcess
from xtnd.tools.rig.wait import wait_for

if TYPE_CHECKING:
    from xtnd.tools.inject.guestrig import GuestRig

log = logging.getLogger("xtnd.inject")

WORK_BASE = "/var/tmp/xtnd-inject"
# Sparse; LVM keeps 256 MiB of it for metadata areas.
PV_SIZE = 1024**3


class SetupError(Exception):
    """The rig cannot be built here (not root, sanlock missing, ...)."""


_T0 = time.monotonic()


def progress(text: str) -> None:
    print(f"inject: [{time.monotonic() - _T0:6.1f}s] {text}", file=sys.stderr, flush=True)


@dataclasses.dataclass
class Spm:
    """A real ``xtnd spm`` process of the rig."""

    name: str
    host_id: int
    proc: SpmProcess
    killed: bool = False

    @property
    def pid(self) -> int:
        return self.proc.proc.pid

    def alive(self) -> bool:
        return self.proc.proc.poll() is None


def descendants(pid: int) -> list[int]:
    """Every living process below pid (children, grandchildren, ...)."""
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        kids = []
        try:
            # Each thread has its own list: workers start LVM commands too.
            for task in os.listdir(f"/proc/{parent}/task"):
                with open(f"/proc/{parent}/task/{task}/children") as f:
                    kids += [int(k) for k in f.read().split()]
        except OSError:
            continue
        found += kids
        todo += kids
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return False


class Trial:
    """One trial of a scenario: its volumes, processes and history."""

    def __init__(self, rig: Rig, index: int, seed: int):
        self.rig = rig
        self.index = index
        self.rng = random.Random(seed)
        self.dir = os.path.join(rig.workdir, f"{rig.scenario}-trial{index + 1}")
        os.makedirs(self.dir)
        self.history = os.path.join(self.dir, "history.jsonl")
        self.spms: list[Spm] = []
        self.clients: list[HSMMailbox] = []
        self.processes: list[subprocess.Popen[bytes]] = []
        self.volumes: list[uuidlib.UUID] = []
        # Guest volumes (guestrig.GuestVolume): unmapped before removal.
        self.guest_volumes: list[Any] = []
        self.sizes_before: dict[str, int] = {}
        self.violations: list[str] = []
        self.may_die: set[str] = set()
        self.bound = 60.0
        history.enable(self.history, "harness")

    @property
    def pool(self) -> Pool:
        return self.rig.pool

    def phase(self, text: str) -> None:
        progress(f"{self.rig.scenario} trial {self.index + 1}: {text}")

    def fail(self, text: str) -> None:
        self.violations.append(text)

    def expect(self, cond: bool, text: str) -> None:
        if not cond:
            self.fail(text)

    def inject(self, what: str) -> None:
        self.phase(f"inject {what}")
        history.record("inject", what=what)

    # Pieces

    def volume(self, capacity: int = 100 * MiB, size: int = 8 * MiB) -> uuidlib.UUID:
        vol = self.pool.create_volume(capacity=capacity, size=size)
        self.volumes.append(vol)
        self.sizes_before[str(vol)] = self.pool.lv_size(vol)
        return vol

    def spm(self, host: int, env: dict[str, str] | None = None, wait: bool = True,
            config: dict[str, str] | None = None) -> Spm:
        """Start ``xtnd spm`` as SPM host ``host`` (1 or 2); wait until it
        serves unless ``wait`` is False (a standby)."""
        name = f"spm{host}" + (f".{sum(s.host_id == host for s in self.spms)}" if any(
            s.host_id == host for s in self.spms) else "")
        extra: dict[str, Any] = dict(config or {})  # "section.option" -> value
        conf = self.pool.spm_config(host, name=f"{name}.conf", **extra)
        full_env = {history.ENV: self.history, history.ENV_NAME: name, **(env or {})}
        proc = SpmProcess(self.rig.hosts[host - 1], conf, os.path.join(self.dir, f"{name}.log"), env=full_env)
        spm = Spm(name, host, proc)
        self.spms.append(spm)
        if wait:
            proc.wait_serving(timeout=120)
        return spm

    def own_storage(self, host: int) -> str:
        """A loop device of host ``host``'s own over the shared PV file, as
        when a host reaches the SAN by its own paths: failing it
        (loops.fail_storage) fails that host's I/O only. Give it to the
        host's SPM as ``pvs``; detached at the end of the run."""
        device = loops.attach_loop(os.path.join(self.rig.workdir, "pv0"))
        self.rig.own_devices.append(device)
        return device

    def lv_devices(self, device: str, *lvs: str) -> list[str]:
        """The loop devices mapping these LVs over ``device`` (a host's own PV path)."""
        runner, vg = self.pool.domain.runner, self.pool.domain.vg
        pe_start = lvm.vg_info(runner, vg).pvs[0].pe_start
        found = []
        for name in lvs:
            info = lvm.lv_info(runner, vg, name)
            offset = pe_start + info.segments[0].first_pe * info.extent_size
            found += [d.path for d in lvloop.find(device, offset)]
        return found

    def client(self, host_id: int, reoffer_timeout: float = 60.0) -> HSMMailbox:
        """This trial's running HSM mailbox client of ``host_id``, started on
        first use. One per host id, as on a real host: a second client would
        write the same inbox block from its own image, and the two would
        erase each other's requests (the SPM then rightly drops the reply of
        a request that vanished, and the verdict blames the SPM)."""
        for hsm in self.clients:
            if hsm.host_id == host_id and hsm.alive:
                return hsm
        hsm = self.pool.hsm(host_id=host_id, reoffer_timeout=reoffer_timeout)
        hsm.start()
        self.clients.append(hsm)
        return hsm

    def hsm_daemon(self, host: int, host_id: int, name: str) -> subprocess.Popen[bytes]:
        """``xtnd hsm`` in SPM host ``host``'s namespace with ``host_id``,
        pointed at a libvirt socket that does not exist (it keeps trying:
        this rig has no guests); its log is DIR/NAME.log."""
        conf = os.path.join(self.dir, f"{name}.conf")
        with open(conf, "w") as f:
            f.write(
                f"[host]\nhost_id = {host_id}\nmaster_domain = {self.pool.uuid}\n"
                f"storage_config = {self.pool.storage_config}\nrun_dir = {os.path.join(self.dir, name + '-run')}\n"
                "control_socket =\n[metrics]\nlisten =\n[api]\nsocket =\n"
                f"[libvirt]\nuri = qemu:///system?socket={os.path.join(self.dir, 'no-libvirt.sock')}\n"
            )
        env = {**os.environ, history.ENV: self.history, history.ENV_NAME: name}
        with open(os.path.join(self.dir, f"{name}.log"), "ab") as out:
            proc = self.rig.hosts[host - 1].popen([sys.executable, "-m", "xtnd.tools.cli", "hsm", "--config", conf],
                                                 env=env, stdout=out, stderr=subprocess.STDOUT)
        self.processes.append(proc)
        return proc

    def log_of(self, name: str) -> str:
        with open(os.path.join(self.dir, f"{name}.log"), errors="replace") as f:
            return f.read()

    def client_process(self, host_id: int, asks: list[tuple[uuidlib.UUID, int]],
                       name: str = "") -> subprocess.Popen[bytes]:
        """An HSM client in its own process (xtnd.tools.inject.client)."""
        name = name or f"hsm{host_id}"
        mbx = self.rig.mailbox
        argv = [sys.executable, "-m", "xtnd.tools.inject.client", mbx.inbox, mbx.outbox, str(host_id),
                str(self.pool.uuid), *(f"{v}:{s}" for v, s in asks)]
        env = {**os.environ, history.ENV: self.history, history.ENV_NAME: name}
        with open(os.path.join(self.dir, f"{name}.log"), "ab") as logf:
            proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                    preexec_fn=sanlockd.die_with_parent)
        self.processes.append(proc)
        return proc

    def kill_process(self, proc: subprocess.Popen[bytes], name: str) -> None:
        history.record("killed", target=proc.pid, name=name, signal="SIGKILL")
        proc.kill()
        proc.wait()

    def terminate(self, spm: Spm, timeout: float = 30.0) -> int:
        """SIGTERM (a stop on purpose, not a death); its exit code."""
        spm.killed = True
        history.record("signal", target=spm.pid, name=spm.name, signal="SIGTERM")
        spm.proc.proc.send_signal(signal.SIGTERM)
        return spm.proc.wait(timeout=timeout)

    def kill(self, spm: Spm, sig: signal.Signals = signal.SIGKILL) -> None:
        spm.killed = sig == signal.SIGKILL
        history.record("killed" if spm.killed else "signal", target=spm.pid, name=spm.name, signal=sig.name)
        spm.proc.proc.send_signal(sig)
        if spm.killed:
            spm.proc.proc.wait()

    def burst(self, hosts: list[int], volumes_per_host: int, steps: int) -> dict[Any, Future[int]]:
        """Each host asks steps growing sizes for its own volumes, all at once."""
        futures: dict[Any, Future[int]] = {}
        for host in hosts:
            hsm = self.client(host)
            vols = [self.volume() for _ in range(volumes_per_host)]
            for step in range(1, steps + 1):
                for vol in vols:
                    size = 8 * MiB + step * EXTENT
                    futures[(host, vol, size)] = hsm.submit(self.pool.uuid, vol, size)
        return futures

    def wait_answers(self, futures: dict[Any, Future[int]], timeout: float | None = None) -> int:
        """Wait for every future (bounded); returns how many were answered."""
        deadline = time.monotonic() + (timeout or self.bound)
        answered = 0
        for fut in futures.values():
            try:
                fut.exception(timeout=max(0.0, deadline - time.monotonic()))
                answered += 1
            except TimeoutError:
                pass
        return answered

    def events(self, ev: str) -> list[dict[str, Any]]:
        return [e for e in history.read(self.history) if e["ev"] == ev]

    def wait_event(self, ev: str, count: int = 1, timeout: float = 30.0) -> None:
        """Wait until the history holds ``count`` events ``ev``."""
        wait_for(lambda: len(self.events(ev)) >= count, timeout=timeout, interval=0.02,
                 what=f"{count} {ev} event(s) in the history")

    def wait_taken(self, count: int, timeout: float = 60.0) -> None:
        """Wait until ``count`` answers were taken by this trial's clients."""
        wait_for(lambda: sum(c.stats["replies"] + c.stats["failures"] for c in self.clients) >= count,
                 timeout=timeout, interval=0.01, what=f"{count} answers")

    # End of trial

    def finish(self) -> checker.TrialResult:
        for hsm in self.clients:
            hsm.stop(timeout=5)
        for proc in self.processes:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        for spm in self.spms:
            if not spm.killed and not spm.alive():
                history.record("died", target=spm.pid, name=spm.name, rc=spm.proc.proc.returncode)
        for spm in self.spms:
            if spm.alive():
                try:
                    spm.proc.proc.send_signal(signal.SIGCONT)
                    rc = spm.proc.terminate(timeout=30)
                except AssertionError:
                    spm.proc.proc.kill()
                    spm.proc.proc.wait()
                    rc = -9
                if rc != 0:
                    history.record("died", target=spm.pid, name=spm.name, rc=rc)
        sizes = {}
        for vol in self.volumes:
            try:
                sizes[str(vol)] = (self.sizes_before[str(vol)], self.pool.lv_size(vol))
            except lvm.LVMError as e:
                self.fail(f"cannot read size of {vol}: {e}")
        history.disable()
        for gv in self.guest_volumes:
            gv.teardown()
        # Free the trial's space for the next trial (the SPMs are stopped).
        if self.volumes:
            vg = self.pool.domain.vg
            with contextlib.suppress(lvm.LVMError):
                # One command for all of them.
                self.pool.domain.runner.run("lvremove", "--autobackup", "n", "--force",
                                            *(f"{vg}/{v}" for v in self.volumes))
        result = checker.check(history.read(self.history), bound=self.bound, extent=EXTENT, sizes=sizes,
                               may_die=self.may_die)
        result.violations[:0] = self.violations
        return result


# Files above this size (a FUSE scenario's 1 GiB backing disk) are not kept
# with a failed trial: three failed FUSE trials kept 3.3 GB of disk images.
KEEP_MAX_BYTES = 16 * 1024 * 1024
SKIPPED = "skipped.txt"


def keep(trial: Trial) -> str:
    """Copy a failed trial's logs and history out of the rig (removed at its
    end). Large files (disk images) are left out and listed in skipped.txt."""
    dest = os.path.join(WORK_BASE, "failed", f"{os.path.basename(trial.rig.workdir)}-{os.path.basename(trial.dir)}")
    skipped: list[str] = []

    def large(directory: str, names: list[str]) -> list[str]:
        out = []
        for name in names:
            path = os.path.join(directory, name)
            try:
                size = os.lstat(path).st_size
            except OSError:
                continue
            if os.path.isfile(path) and size > KEEP_MAX_BYTES:
                out.append(name)
                skipped.append(f"{os.path.relpath(path, trial.dir)} {size}")
        return out

    shutil.copytree(trial.dir, dest, dirs_exist_ok=True, ignore=large)
    if skipped:
        with open(os.path.join(dest, SKIPPED), "w") as f:
            f.write(f"# not kept (path, bytes): larger than {KEEP_MAX_BYTES} bytes\n")
            f.writelines(line + "\n" for line in skipped)
    return dest


OWNER = "owner"


def _start_time(pid: int) -> str:
    """A process's start time (field 22 of /proc/PID/stat): pids are reused."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[-1].split()[19]
    except (OSError, IndexError):
        return ""


def _under(path: str) -> Callable[[str], bool]:
    return lambda backing: backing.startswith(path + "/")


def clean_stale() -> list[str]:
    """Tear down rigs of harnesses that died outright (SIGKILL, power cut of
    the process): their loop devices, then their files. Returns their dirs."""
    removed = []
    for name in os.listdir(WORK_BASE):
        path = os.path.join(WORK_BASE, name)
        try:
            with open(os.path.join(path, OWNER)) as f:
                pid_text, _, started = f.read().strip().partition(" ")
        except OSError:
            continue  # not a rig (failed/ holds kept logs)
        pid = int(pid_text) if pid_text.isdigit() else 0
        if pid and _start_time(pid) == started:
            continue  # its harness still runs
        from xtnd.tools.inject import guestrig  # libvirt: only when cleaning

        guestrig.sweep(path)  # its guests and their libvirtd hold loop devices
        loops.detach_stale(_under(path))
        fusefile.unmount_under(path)  # scenarios 12, 13: after the loops over them
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    if removed:
        log.warning("removed rigs of dead harnesses: %s", " ".join(removed))
    return removed


class Rig:
    """Loop PV, master domain, sanlock daemons; torn down on exit."""

    def __init__(self, scenario: str, sanlock_hosts: int = 2, max_hosts: int = 10):
        self.scenario = scenario
        self.max_hosts = max_hosts
        self.nhosts = sanlock_hosts
        self.hosts: list[sanlockd.SanlockDaemon] = []
        self.own_devices: list[str] = []
        self._stack = contextlib.ExitStack()
        self.workdir = ""
        self.pool: Pool
        self._guests: GuestRig | None = None

    def __enter__(self) -> Rig:
        why = sanlockd.missing()
        if why:
            raise SetupError(f"cannot build the rig: {why}")
        if lvm.device_mapper_available():
            raise SetupError("the rig maps LVs with loop devices; this machine has device-mapper")
        try:
            os.makedirs(WORK_BASE, exist_ok=True)
            clean_stale()
            self.workdir = os.path.join(WORK_BASE, f"{self.scenario}-{uuidlib.uuid4().hex[:8]}")
            os.makedirs(self.workdir)
            progress(f"rig in {self.workdir}")
            with open(os.path.join(self.workdir, OWNER), "w") as f:
                f.write(f"{os.getpid()} {_start_time(os.getpid())}\n")
            self._stack.callback(shutil.rmtree, self.workdir, True)
            self._stack.callback(lambda: loops.detach_stale(lambda b: b.startswith(self.workdir + "/")))
            pvs = self._stack.enter_context(loops.loop_pvs(self.workdir, count=1, size=PV_SIZE))
            self.pool = Pool(self.workdir, pvs, max_hosts=self.max_hosts)
            self._stack.callback(self.pool.remove)
            # Looked up once: scenarios may hold the VG lock later.
            self.mailbox = self.pool.domain.mailbox()
            self._stack.callback(self._detach_own)
            for i in range(self.nhosts):
                daemon = sanlockd.SanlockDaemon(f"inject-host{i + 1}", self.workdir)
                self._stack.callback(daemon.stop)
                self.hosts.append(daemon.start())
        except BaseException:
            self._stack.close()
            raise
        return self

    def guests(self) -> GuestRig:
        """The run's guest rig (guestrig.GuestRig: private libvirtd, guest
        kernel), built on first use, torn down with the rig."""
        if self._guests is None:
            from xtnd.tools.inject import guestrig  # libvirt: only for guest scenarios

            progress("starting a private libvirtd for guests")
            self._guests = guestrig.GuestRig(self.workdir)
            self._stack.callback(self._guests.close)
        return self._guests

    def _detach_own(self) -> None:
        """Hosts' own PV devices and the LV mappings over them."""
        for device in self.own_devices:
            self.detach_over(device)

    @staticmethod
    def detach_over(device: str) -> None:
        """Detach a host's own PV device and the LV mappings over it."""
        loops.restore_storage(device)
        for dev in lvloop.devices():
            if lvloop.over(dev, device):
                loops.detach(dev.path)
        loops.detach(device)

    def at_close(self, func: Callable[[], object]) -> None:
        """Call func when the rig is torn down (before what was set up earlier)."""
        self._stack.callback(func)

    def __exit__(self, *exc: object) -> None:
        self._stack.close()


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM tears the rig down like Ctrl-C does."""

    def handler(signo: int, frame: Any) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


TrialFunc = Callable[[Trial], None]
