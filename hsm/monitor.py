"""Watching the thin drives of this host's VMs and extending them in time.

The Monitor is the libvirt Listener of the HSM (xtnd.hsm.libvirtconn). It
keeps a Drive (xtnd.hsm.drive) for every qcow2 disk whose source is a
volume link (xtnd.hsm.links) of every running VM, and reacts to:

- a block-threshold event: extend at once (trigger=threshold);
- an ENOSPC pause (io_error event with reason enospc, a SUSPENDED/IOERROR
  lifecycle event, or a paused VM whose diskErrors say no space): extend
  at once, then resume (trigger=enospc);
- the periodic bulk stats pass, one getAllDomainStats call for all VMs:
  arms thresholds that are missing, extends what was missed
  (trigger=stats), retries failed extends when their backoff expires
  (trigger=retry) and finds VMs no event told about. It also compares each
  VM's disks (top image path and index per disk) with the last pass and
  with what is tracked: a snapshot, a block commit or copy pivot, a
  hotplug or an unplug makes it read the VM's XML again, so the new top
  image is watched and its threshold armed on its own index;
- connected(): everything is re-read after (re)connecting, since libvirt
  does not replay events.

Threads: event callbacks (libvirt's event loop thread) and connected() only
schedule jobs; jobs run on a small pool ("xtnd-hsm-worker-N") because an
extend waits for the SPM; the stats pass has its own thread
("xtnd-hsm-stats"). One job at a time owns a drive (Tracked.busy); a trigger
arriving meanwhile is remembered and handled when that job ends.

An extend: fresh stats for the VM (for the event of the threshold this
monitor armed, the event's own numbers: see _from_event), sizing decision
(mailbox/PROTOCOL.md §4), request via the mailbox, refresh of this host's
mapping and verification of the new size, threshold re-armed on the
indexed target (set in libvirt while the device grows, once storage
reports the new size), resume if and only if the
VM is paused because this drive ran out of space (never a VM paused by its
user or for any other reason). A refused or failed extend leaves the VM as
it is and is retried with a capped exponential backoff; once space is
added (a LUN added to the VG), a retry succeeds and the VM resumes.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import logging
import threading
import time
import uuid as uuidlib
from collections.abc import Callable
from typing import Any, Protocol

import libvirt
from xtnd.common import history
from xtnd.common.ratelimit import RateLimitedLog
from xtnd.common.stats import percentile
from xtnd.hsm import disks, links, sizing, stats
from xtnd.hsm.drive import DisabledReason, Drive, State
from xtnd.hsm.libvirtconn import NotConnected
from xtnd.hsm.metrics import ExtendRecord

log = logging.getLogger("xtnd.hsm")

THRESHOLD = "threshold"
ENOSPC = "enospc"
STATS = "stats"
RETRY = "retry"
LOAD = "load"
RECHECK = "recheck"
# Triggers that mean "this drive needs space now", whatever the numbers say.
_URGENT = frozenset({THRESHOLD, ENOSPC, RETRY})

_STATS_FLAGS = libvirt.VIR_DOMAIN_STATS_STATE | libvirt.VIR_DOMAIN_STATS_BLOCK
_STATS_ALL = libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE | libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_BACKING


class Mailbox(Protocol):
    def submit(self, domain: uuidlib.UUID, volume: uuidlib.UUID, size: int) -> concurrent.futures.Future[int]: ...


class Volumes(Protocol):
    def refresh(self, domain: uuidlib.UUID, volume: uuidlib.UUID, verified: Callable[[int], None] | None = None) -> int:
        """Grow this host's mapping after an extend; return the device's size
        now. verified(size), if called, gets the volume's size on storage
        before the device grows (see StorageVolumes.refresh)."""
        ...


class LibvirtConnection(Protocol):
    def get(self) -> Any: ...

    def report_error(self, error: libvirt.libvirtError) -> None: ...


@dataclasses.dataclass(frozen=True)
class MonitorConfig:
    sizing: sizing.SizingConfig = dataclasses.field(default_factory=sizing.SizingConfig)
    run_dir: str = links.RUN_DIR
    workers: int = 4  # 0: run jobs inline (tests)
    stats_interval: float = 2.0
    extend_timeout: float = 120.0
    backoff_initial: float = 1.0
    backoff_max: float = 60.0


class RefreshTooSmall(Exception):
    def __init__(self, expected: int, actual: int):
        self.expected = expected
        self.actual = actual
        super().__init__(f"device is {actual} bytes after refresh, expected at least {expected}")


def _same_image(block: stats.BlockStats | None, drive: Drive) -> bool:
    """Are these stats of the image drive tracks (same top path and index)?"""
    if block is None:
        return False
    return block.path == drive.path and (block.index is None or block.index == drive.index)


@dataclasses.dataclass(frozen=True)
class ThresholdEvent:
    """What a block-threshold event said: the guest wrote up to threshold +
    excess of the image at path (libvirt index, if the target named one)."""

    threshold: int
    excess: int
    path: str
    index: int | None
    at: float  # monitor clock


def _target_index(dev: str) -> int | None:
    """The index in a target such as "vda[1]" (None for a plain "vda")."""
    _, bracket, rest = dev.partition("[")
    number = rest.rstrip("]")
    return int(number) if bracket and number.isdigit() else None


@dataclasses.dataclass
class Tracked:
    """A Drive plus what the monitor needs to schedule work for it."""

    drive: Drive
    busy: bool = False
    pending: tuple[str, float] | None = None  # a trigger that came while busy
    failures: int = 0
    retry_at: float | None = None
    extended_at: float = float("-inf")  # when the last extend completed
    event: ThresholdEvent | None = None  # the last block-threshold event, until a check takes it


@dataclasses.dataclass
class VM:
    uuid: str
    name: str
    drives: dict[str, Tracked]
    # name -> (top image path, index) of every disk in the last stats pass;
    # None until the first pass after a (re)load.
    layout: dict[str, tuple[str, int | None]] | None = None


class Monitor:
    def __init__(
        self,
        connection: LibvirtConnection,
        mailbox: Mailbox,
        volumes: Volumes,
        config: MonitorConfig,
        clock: Callable[[], float] = time.monotonic,
        on_extend: Callable[[ExtendRecord], None] | None = None,
    ):
        self._connection = connection
        self._mailbox = mailbox
        self._volumes = volumes
        self.config = config
        self._clock = clock
        self._on_extend = on_extend
        # Called before a source volume is extended while its drive is
        # copied to another domain (xtnd.hsm.replicate: destination first).
        self.before_extend: Callable[[Drive, int], None] | None = None
        self._replicating: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._cond = threading.Condition()
        self._vms: dict[str, VM] = {}
        self._stopping = False
        self._wakeup = False
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        # Sets thresholds while the worker that asked resizes the device.
        self._arming: concurrent.futures.ThreadPoolExecutor | None = None
        self._thread: threading.Thread | None = None
        self._rlog = RateLimitedLog(log, interval=60.0)
        self.records: collections.deque[ExtendRecord] = collections.deque(maxlen=1000)
        self.counters = collections.Counter[str]()
        # Trigger-to-refreshed seconds of recent extends (adaptive sizing),
        # taken just before the threshold is re-armed.
        self._latencies: collections.deque[float] = collections.deque(maxlen=sizing.LATENCY_WINDOW)
        # When the stats loop last went round (the daemon's systemd watchdog
        # tells a stuck loop from a slow one by its age).
        self.heartbeat = clock()

    # Life cycle

    def start(self, stats_thread: bool = True) -> None:
        workers = max(1, self.config.workers)
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="xtnd-hsm-worker")
        if self.config.workers > 0:
            self._arming = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="xtnd-hsm-arm")
        if stats_thread:
            self._thread = threading.Thread(target=self._run, name="xtnd-hsm-stats", daemon=True)
            self._thread.start()

    def stop_scheduling(self, timeout: float = 10.0) -> None:
        """No new jobs; the stats thread ends. Running jobs go on (see join())."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("stats thread did not stop in %.1f seconds", timeout)

    def join(self) -> None:
        """Wait for running jobs (stop the mailbox first, so that none waits for the SPM)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        if self._arming is not None:
            self._arming.shutdown(wait=True)

    def stop(self, timeout: float = 10.0) -> None:
        self.stop_scheduling(timeout)
        self.join()

    @property
    def alive(self) -> bool:
        """The stats thread runs (the daemon's systemd watchdog checks it)."""
        return self._thread is not None and self._thread.is_alive()

    def clock(self) -> float:
        """Now on the monitor's clock (the one of ExtendRecord times)."""
        return self._clock()

    def extend_latency(self) -> float:
        """p99 of recent extends' trigger-to-refreshed time on this host (0: none yet)."""
        with self._lock:
            recent = list(self._latencies)
        return percentile(recent, 99) if recent else 0.0

    def drive_sizing(self) -> list[tuple[str, str, float, int]]:
        """(vm name, drive, write rate bytes/s, chunk bytes now) of every drive (metrics)."""
        latency = self.extend_latency()
        chunk = self.config.sizing.chunk
        with self._lock:
            drives = [(vm.name, name, t.drive) for vm in self._vms.values() for name, t in vm.drives.items()]
            return [(vm, name, d.write_rate, chunk(d.load(latency))) for vm, name, d in drives]

    def vm_names(self) -> dict[str, str]:
        """VM uuid -> name of every monitored VM."""
        with self._lock:
            return {vm.uuid: vm.name for vm in self._vms.values()}

    def snapshot(self) -> dict[str, dict[str, Drive]]:
        """VM uuid -> drive name -> a copy of its Drive (for tests and tools)."""
        with self._lock:
            return {
                vm.uuid: {name: dataclasses.replace(t.drive) for name, t in vm.drives.items()}
                for vm in self._vms.values()
            }

    def resized(self, vm_id: str, name: str) -> None:
        """Disk name of vm_id grew (xtnd volume resize, hsm/resize.py): a
        check reads the new capacity, so the max size follows it; a drive
        disabled at its old max size is watched again."""
        with self._lock:
            vm = self._vms.get(vm_id)
            t = vm.drives.get(name) if vm else None
            if t is None:
                return
            if t.drive.state is State.DISABLED and t.drive.disabled_reason is DisabledReason.AT_MAX_SIZE:
                t.drive.enable()
        self._submit(self._check_job, vm_id, name, RECHECK, self._clock())

    def set_replicating(self, vm_id: str, name: str, on: bool) -> None:
        """The drive is (no longer) copied to another domain: its chunk doubles."""
        with self._lock:
            if on:
                self._replicating.add((vm_id, name))
            else:
                self._replicating.discard((vm_id, name))
            vm = self._vms.get(vm_id)
            t = vm.drives.get(name) if vm else None
            if t is not None:
                t.drive.replicating = on

    # Listener (libvirtconn): events only schedule work

    def connected(self, conn: Any) -> None:
        active = set()
        for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
            active.add(dom.UUIDString())
            self._load(dom, reconnected=True)
        with self._lock:
            for gone in set(self._vms) - active:
                del self._vms[gone]
        self.wake()

    def disconnected(self) -> None:
        log.warning("libvirt connection lost; thresholds are re-armed after reconnecting")

    def lifecycle(self, dom: Any, event: int, detail: int) -> None:
        vm_id = dom.UUIDString()
        if event in (libvirt.VIR_DOMAIN_EVENT_STARTED, libvirt.VIR_DOMAIN_EVENT_RESUMED):
            with self._lock:
                known = vm_id in self._vms
            if not known:
                self._submit(self._load_job, vm_id)
        elif event == libvirt.VIR_DOMAIN_EVENT_STOPPED:
            with self._lock:
                vm = self._vms.pop(vm_id, None)
            if vm is not None:
                log.info("vm stopped vm=%s", vm.name)
        elif event == libvirt.VIR_DOMAIN_EVENT_SUSPENDED and detail == libvirt.VIR_DOMAIN_EVENT_SUSPENDED_IOERROR:
            self.counters["paused"] += 1
            self._submit(self._paused_job, vm_id, self._clock())

    def block_threshold(self, dom: Any, dev: str, path: str, threshold: int, excess: int) -> None:
        now = self._clock()
        name = dev.partition("[")[0]
        log.info("threshold crossed vm=%s target=%s threshold=%d excess=%d", dom.name(), dev, threshold, excess)
        with self._lock:
            vm = self._vms.get(dom.UUIDString())
            t = vm.drives.get(name) if vm else None
            if t is not None:
                t.drive.saw_excess(excess)
                t.event = ThresholdEvent(threshold, excess, path, _target_index(dev), now)
        self._submit(self._check_job, dom.UUIDString(), name, THRESHOLD, now)

    def io_error(self, dom: Any, src_path: str, dev_alias: str, action: int, reason: str) -> None:
        history.record("paused", vm=dom.UUIDString(), path=src_path, reason=reason)
        if reason != "enospc":
            log.warning("vm i/o error vm=%s path=%s reason=%s (not ours to fix)", dom.name(), src_path, reason)
            return
        now = self._clock()
        vm_id = dom.UUIDString()
        with self._lock:
            vm = self._vms.get(vm_id)
            name = next((n for n, t in vm.drives.items() if t.drive.path == src_path), None) if vm else None
        log.info("vm out of space vm=%s path=%s", dom.name(), src_path)
        if name is None:
            self._submit(self._paused_job, vm_id, now)
        else:
            self._submit(self._check_job, vm_id, name, ENOSPC, now)

    # Periodic stats pass

    def wake(self) -> None:
        """Run the stats pass now (e.g. after connecting)."""
        with self._cond:
            self._wakeup = True
            self._cond.notify_all()

    def _run(self) -> None:
        next_pass = self._clock()
        while True:
            self.heartbeat = self._clock()
            # Lock order: _lock is never taken while holding _cond.
            deadline = min(next_pass, self._next_retry())

            def ready(deadline: float = deadline) -> bool:
                return self._stopping or self._wakeup or self._clock() >= deadline

            with self._cond:
                self._cond.wait_for(ready, max(0.0, deadline - self._clock()))
                if self._stopping:
                    return
                self._wakeup = False
            try:
                self.tick()
            except Exception:
                self.counters["stats_pass_errors"] += 1
                log.exception("stats pass failed")
            if self._clock() >= next_pass:
                next_pass = self._clock() + self.config.stats_interval

    def _next_retry(self) -> float:
        with self._lock:
            times = [t.retry_at for vm in self._vms.values() for t in vm.drives.values() if t.retry_at is not None]
        return min(times, default=float("inf"))

    def tick(self) -> None:
        """One bulk stats pass over all VMs (the step hook of the stats thread)."""
        try:
            conn = self._connection.get()
            result = conn.getAllDomainStats(_STATS_FLAGS, _STATS_ALL)
        except NotConnected:
            return
        except libvirt.libvirtError as e:
            self._libvirt_error("stats", e)
            return
        now = self._clock()
        self.counters["stats_passes"] += 1
        for dom, raw in result:
            vm_id = dom.UUIDString()
            st = stats.parse(raw)
            with self._lock:
                vm = self._vms.get(vm_id)
            if vm is None:
                if any(links.parse(b.path, self.config.run_dir) for b in st.blocks.values()):
                    self._submit(self._load_job, vm_id)
                continue
            if self._layout_changed(vm, st):
                self._submit(self._load_job, vm_id)
                continue
            for name, trigger in self._due(vm, st, now):
                self._submit(self._check_job, vm_id, name, trigger, now)
            if st.state == libvirt.VIR_DOMAIN_PAUSED and st.reason == libvirt.VIR_DOMAIN_PAUSED_IOERROR:
                self._submit(self._paused_job, vm_id, now)

    def _layout_changed(self, vm: VM, st: stats.VMStats) -> bool:
        """Did vm's disks change since it was loaded (snapshot, block commit
        or copy pivot, hotplug, unplug)? Then its XML must be read again:
        the threshold of a new top image is armed on its own index."""
        layout = {name: (b.path, b.index) for name, b in st.blocks.items()}
        with self._lock:
            previous, vm.layout = vm.layout, layout
            moved = [name for name, t in vm.drives.items() if not _same_image(st.blocks.get(name), t.drive)]
        if not moved and (previous is None or previous == layout):
            return False
        self.counters["reloads"] += 1
        log.info("vm disks changed vm=%s drives=%s; reading its disks again", vm.name, ",".join(moved) or "-")
        return True

    def _due(self, vm: VM, st: stats.VMStats, now: float) -> list[tuple[str, str]]:
        """Drives of vm that need a job after this stats pass, and why."""
        due = []
        latency = self.extend_latency()
        with self._lock:
            for name, t in vm.drives.items():
                block = st.blocks.get(name)
                d = t.drive
                if block is None or t.busy or d.state is State.DISABLED:
                    continue
                d.update(block.capacity, block.allocation, block.physical, now)
                if d.state is State.EXCEEDED:
                    if t.retry_at is None or t.retry_at <= now:
                        due.append((name, RETRY if t.retry_at is not None else STATS))
                elif d.state is State.UNSET or (d.state is State.ARMED and block.threshold is None):
                    due.append((name, STATS))
                elif d.decide(self.config.sizing, latency).action is not sizing.Action.ARM:
                    due.append((name, STATS))
        return due

    # Jobs (worker threads)

    def _submit(self, fn: Callable[..., None], *args: Any) -> None:
        """Run fn(*args) on a worker (inline with workers=0: tests step through)."""
        with self._cond:
            if self._stopping or self._pool is None:
                return
            if self.config.workers > 0:
                with contextlib.suppress(RuntimeError):  # shutting down
                    self._pool.submit(self._job, fn, *args)
                return
        self._job(fn, *args)

    def _job(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except NotConnected:
            log.debug("job %s skipped: not connected", fn.__name__)
        except libvirt.libvirtError as e:
            self._libvirt_error(fn.__name__, e)
        except Exception:
            self.counters["job_errors"] += 1
            log.exception("job %s%r failed", fn.__name__, args)

    def _libvirt_error(self, what: str, e: libvirt.libvirtError) -> None:
        if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            log.debug("%s: domain is gone: %s", what, e)
            return
        self.counters["libvirt_errors"] += 1
        self._rlog.log(logging.WARNING, what, "libvirt call failed in %s: %s", what, e)
        self._connection.report_error(e)

    def _dom(self, vm_id: str) -> Any:
        return self._connection.get().lookupByUUIDString(vm_id)

    def _load_job(self, vm_id: str) -> None:
        self._load(self._dom(vm_id))

    def _load(self, dom: Any, reconnected: bool = False) -> None:
        """(Re)read a VM's thin disks and schedule a first check of each."""
        vm_id = dom.UUIDString()
        found = disks.thin_disks(dom.XMLDesc(0), self.config.run_dir)
        with self._lock:
            vm = self._vms.get(vm_id)
            if vm is None:
                vm = self._vms[vm_id] = VM(vm_id, dom.name(), {})
            old = vm.drives
            vm.drives = {}
            for disk in found:
                t = old.get(disk.name)
                if t is None or (t.drive.index, t.drive.path) != (disk.index, disk.path):
                    drive = Drive(vm_id, disk.name, disk.index, disk.path, str(disk.domain), str(disk.volume))
                    drive.replicating = (vm_id, disk.name) in self._replicating
                    t = Tracked(drive)
                elif reconnected and not t.busy and t.drive.state is State.ARMED:
                    # A new libvirtd may not know a threshold armed through
                    # the old one: arm it again.
                    t.drive.reset()
                vm.drives[disk.name] = t
            names = list(vm.drives)
        log.info("vm monitored vm=%s drives=%s", dom.name(), ",".join(names) or "-")
        now = self._clock()
        for name in names:
            self._submit(self._check_job, vm_id, name, LOAD, now)

    def _paused_job(self, vm_id: str, since: float) -> None:
        """A VM paused on an I/O error: check each drive that has no space."""
        dom = self._dom(vm_id)
        state, reason = dom.state()
        if state != libvirt.VIR_DOMAIN_PAUSED or reason != libvirt.VIR_DOMAIN_PAUSED_IOERROR:
            return
        with self._lock:
            known = vm_id in self._vms
        if not known:
            self._load(dom)
        for name, error in dom.diskErrors().items():
            if error == libvirt.VIR_DOMAIN_DISK_ERROR_NO_SPACE:
                with self._lock:
                    vm = self._vms.get(vm_id)
                    t = vm.drives.get(name) if vm else None
                    waiting = t is not None and t.retry_at is not None and t.retry_at > self._clock()
                if t is not None and not waiting:
                    self._check_job(vm_id, name, ENOSPC, since)

    def _check_job(self, vm_id: str, name: str, trigger: str, since: float) -> None:
        with self._lock:
            vm = self._vms.get(vm_id)
            t = vm.drives.get(name) if vm else None
            if t is not None:
                if t.busy:
                    # Handled when the running job ends; an urgent trigger wins.
                    if t.pending is None or trigger in _URGENT:
                        t.pending = (trigger, since)
                    return
                if t.drive.state is State.DISABLED:
                    log.debug("drive disabled vm=%s drive=%s trigger=%s", vm_id, name, trigger)
                    return
                t.busy = True
        if vm is None or t is None:
            if vm is None and trigger != LOAD:
                self._submit(self._load_job, vm_id)
            return
        try:
            while True:
                self._check(vm, t, trigger, since)
                with self._lock:
                    if t.pending is None or self._stopping:
                        break
                    trigger, since = t.pending
                    t.pending = None
        finally:
            with self._lock:
                t.busy = False
                t.pending = None

    def _check(self, vm: VM, t: Tracked, trigger: str, since: float) -> None:
        d = t.drive
        dom = self._dom(vm.uuid)
        block = self._from_event(t, trigger, since)
        if block is not None:
            if not dom.isActive():
                log.debug("vm gone before its check vm=%s drive=%s", vm.name, d.name)
                return
        else:
            found = self._connection.get().domainListGetStats([dom], _STATS_FLAGS, _STATS_ALL)
            if not found:
                # It stopped since the check was scheduled (libvirt lists only
                # running domains): its stop event drops it.
                log.debug("vm gone before its check vm=%s drive=%s", vm.name, d.name)
                return
            block = stats.parse(found[0][1]).blocks.get(d.name)
            if block is None:
                return
        if not _same_image(block, d):
            # The disk's top image changed (snapshot, block commit or copy
            # pivot): these numbers are not this volume's. Read the VM again;
            # its new drive gets a check of its own.
            log.info(
                "drive top image changed vm=%s drive=%s path=%s index=%s; reading the vm again",
                vm.name,
                d.name,
                block.path,
                block.index,
            )
            self.counters["reloads"] += 1
            self._submit(self._load_job, vm.uuid)
            return
        latency = self.extend_latency()
        with self._lock:
            if d.state is State.DISABLED:
                return
            d.update(block.capacity, block.allocation, block.physical, self._clock())
            decision = d.decide(self.config.sizing, latency)
        if decision.action is sizing.Action.IMPROBABLE:
            self._refuse(dom, vm, t, decision)
            return
        if decision.action is sizing.Action.AT_MAX:
            with self._lock:
                d.disable(DisabledReason.AT_MAX_SIZE)
            log.warning("drive at max size, not monitored vm=%s drive=%s physical=%d", vm.name, d.name, d.physical)
            return
        # A trigger older than the last extend was answered by it (two
        # triggers for one shortage, e.g. the threshold event and the stats
        # pass): only the numbers decide then, and a pause is just resumed.
        urgent = (trigger in _URGENT and since > t.extended_at) or d.state is State.EXCEEDED
        if urgent or decision.action is sizing.Action.EXTEND:
            self._extend(dom, vm, t, trigger, since, decision.new_size, decision.chunk)
            return
        if d.state is State.UNSET or block.threshold != decision.threshold:
            self._arm(dom, t, decision.threshold)
        if trigger == ENOSPC and self._maybe_resume(dom, vm, t):
            log.info("vm resumed after a pause its last extend already fixed vm=%s drive=%s", vm.name, d.name)

    def _from_event(self, t: Tracked, trigger: str, since: float) -> stats.BlockStats | None:
        """The drive's numbers from the threshold event this check answers,
        instead of fresh stats (a QEMU roundtrip through libvirtd: 2 ms on
        a quiet host, tens on a busy one, before the request can go out).

        Only for the event of the threshold this monitor armed, on the image
        it tracks, with a sane allocation: the guest wrote up to threshold
        + excess (allocation is the highest offset written), and capacity
        and physical are what the drive saw last (physical changes only by
        its own extends, capacity by a resize, which rechecks with stats).
        None: read the stats.
        """
        with self._lock:
            e, t.event = t.event, None
            d = t.drive
            if trigger != THRESHOLD or e is None or e.at != since:
                return None
            if d.state is not State.ARMED or d.threshold != e.threshold or e.path != d.path:
                return None
            if e.index is not None and e.index != d.index:
                return None
            allocation = max(d.allocation, e.threshold + e.excess)
            if not (d.capacity and d.physical) or allocation > d.physical:
                return None
            self.counters["checks_from_event"] += 1
            return stats.BlockStats(d.name, d.index, d.path, d.capacity, allocation, d.physical, None)

    def _refuse(self, dom: Any, vm: VM, t: Tracked, decision: sizing.Decision) -> None:
        d = t.drive
        with self._lock:
            if d.state is State.EXTENDING:
                return
            d.disable(DisabledReason.IMPROBABLE_ALLOCATION)
        log.error(
            "improbable allocation, pausing vm and refusing to extend vm=%s drive=%s allocation=%d next_size=%d",
            vm.name, d.name, d.allocation, decision.new_size,
        )  # fmt: skip
        self.counters["refused"] += 1
        dom.suspend()

    def _arm(self, dom: Any, t: Tracked, threshold: int) -> None:
        dom.setBlockThreshold(t.drive.target, threshold)
        self._armed(dom, t, threshold)

    def _armed(self, dom: Any, t: Tracked, threshold: int) -> None:
        """libvirt has the threshold: the drive is armed at it."""
        d = t.drive
        with self._lock:
            if d.state is State.ARMED:
                d.reset()
            d.arm(threshold)
        log.debug("threshold armed vm=%s target=%s threshold=%d", dom.name(), d.target, threshold)

    def _in_background(self, fn: Callable[..., None], *args: Any) -> concurrent.futures.Future[None]:
        """fn(*args) on the arming thread (inline with workers=0: tests step through)."""
        if self._arming is not None:
            with contextlib.suppress(RuntimeError):  # shutting down: inline
                return self._arming.submit(fn, *args)
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        try:
            fn(*args)
            done.set_result(None)
        except Exception as e:  # noqa: BLE001 - handed to whoever waits for it
            done.set_exception(e)
        return done

    def _extend(self, dom: Any, vm: VM, t: Tracked, trigger: str, since: float, new_size: int, chunk: int = 0) -> None:
        d = t.drive
        with self._lock:
            if d.state is not State.EXCEEDED:
                d.exceeded()
            old_size = d.physical
            d.begin_extend(new_size)
        t_request = self._clock()
        domain, volume = uuidlib.UUID(d.domain_id), uuidlib.UUID(d.volume_id)
        log.info(
            "extend requested vm=%s drive=%s volume=%s old_mb=%d new_mb=%d trigger=%s",
            vm.name, d.name, volume, old_size // sizing.MiB, new_size // sizing.MiB, trigger,
        )  # fmt: skip
        # (volume size on storage, threshold for it, its setBlockThreshold)
        early: tuple[int, int, concurrent.futures.Future[None]] | None = None

        def verified(stored: int) -> None:
            """Storage has the volume at stored bytes and the device grows
            next: the threshold for that size goes to libvirt meanwhile (the
            loop resize waits for its queue to drain, libvirt for QEMU).
            This extend's latency counts at once: the threshold keeps the
            headroom for it."""
            nonlocal early
            if stored < new_size:
                return  # too small: the refresh fails below
            with self._lock:
                self._latencies.append(self._clock() - since)
            threshold = sizing.threshold(stored, self.config.sizing, d.load(self.extend_latency()))
            early = (stored, threshold, self._in_background(dom.setBlockThreshold, d.target, threshold))

        try:
            if self.before_extend is not None:
                self.before_extend(d, new_size)
            self._mailbox.submit(domain, volume, new_size).result(self.config.extend_timeout)
            t_reply = self._clock()
            size = self._volumes.refresh(domain, volume, verified)
            if size < new_size:
                raise RefreshTooSmall(new_size, size)
        except Exception as e:  # noqa: BLE001 - any failure of the extend is retried the same way
            if early is not None:
                # A threshold armed for a size the device did not get fires
                # early at worst: the retry looks again.
                with contextlib.suppress(libvirt.libvirtError):
                    early[2].result()
            self._failed(vm, t, trigger, e)
            return
        with self._lock:
            d.extend_done(size)
            t.extended_at = self._clock()
            t.failures = 0
            t.retry_at = None
            # The guest may already be past the new threshold: look again.
            if t.pending is None:
                t.pending = (RECHECK, self._clock())
        try:
            if early is not None and early[0] == size:
                early[2].result()
                self._armed(dom, t, early[1])
            else:
                if early is None:
                    with self._lock:
                        self._latencies.append(self._clock() - since)
                else:
                    with contextlib.suppress(libvirt.libvirtError):
                        early[2].result()
                self._arm(dom, t, sizing.threshold(size, self.config.sizing, d.load(self.extend_latency())))
        except libvirt.libvirtError as e:
            # Re-armed by the next stats pass or after reconnecting.
            self._libvirt_error("set threshold", e)
        t_refreshed = self._clock()
        resumed = self._maybe_resume(dom, vm, t)
        if resumed:
            with self._lock:
                d.outran(chunk)
        record = ExtendRecord(
            vm=vm.uuid,
            vm_name=vm.name,
            drive=d.name,
            domain=d.domain_id,
            volume=d.volume_id,
            trigger=trigger,
            old_size=old_size,
            new_size=size,
            t_event=since,
            t_request=t_request,
            t_reply=t_reply,
            t_refreshed=t_refreshed,
            t_done=self._clock(),
            resumed=resumed,
            rate=d.write_rate,
            chunk=chunk,
        )
        self.counters["extends"] += 1
        self.records.append(record)
        log.info("%s", record.line())
        if self._on_extend is not None:
            self._on_extend(record)

    def _failed(self, vm: VM, t: Tracked, trigger: str, error: Exception) -> None:
        d = t.drive
        with self._lock:
            d.extend_failed()
            t.failures += 1
            delay = min(self.config.backoff_initial * 2 ** (t.failures - 1), self.config.backoff_max)
            t.retry_at = self._clock() + delay
            failures = t.failures
        self.counters["failures"] += 1
        self._rlog.log(
            logging.WARNING,
            f"extend-failed {vm.uuid} {d.name}",
            "extend-failed vm=%s drive=%s volume=%s trigger=%s attempt=%d retry_in=%.1f error=%s",
            vm.name, d.name, d.volume_id, trigger, failures, delay, error,
        )  # fmt: skip
        self.wake()

    def _maybe_resume(self, dom: Any, vm: VM, t: Tracked) -> bool:
        """Resume only a VM paused because this drive (and no other reason) ran out of space."""
        try:
            state, reason = dom.state()
            if state != libvirt.VIR_DOMAIN_PAUSED or reason != libvirt.VIR_DOMAIN_PAUSED_IOERROR:
                return False
            errors = dom.diskErrors()
            if errors.get(t.drive.name) != libvirt.VIR_DOMAIN_DISK_ERROR_NO_SPACE:
                return False
            with self._lock:
                for name, error in errors.items():
                    if name == t.drive.name or error == libvirt.VIR_DOMAIN_DISK_ERROR_NONE:
                        continue
                    other = vm.drives.get(name)
                    if (
                        error != libvirt.VIR_DOMAIN_DISK_ERROR_NO_SPACE
                        or other is None
                        or other.busy
                        or other.drive.state in (State.EXCEEDED, State.EXTENDING, State.DISABLED)
                    ):
                        log.info("not resuming vm=%s: drive=%s error=%d still pending", vm.name, name, error)
                        return False
            dom.resume()
        except libvirt.libvirtError as e:
            self._libvirt_error("resume", e)
            return False
        log.info("vm resumed vm=%s drive=%s", vm.name, t.drive.name)
        history.record("resumed", vm=vm.uuid, drive=t.drive.name)
        self.counters["resumed"] += 1
        return True
