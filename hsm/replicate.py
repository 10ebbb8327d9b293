"""Keeping both sides of a live storage migration extended (the HSM side).

While libvirt copies a running VM's disk to another domain (blockCopy,
driven by ``xtnd volume move``, xtnd.tools.move_cli), the guest keeps
writing: QEMU writes each guest write to the source and, mirrored, to the
destination. A thin block destination that falls behind pauses the VM
(ENOSPC on the mirror) or fails the copy, so the HSM extends it too:

- block destination, block source: every extend of the source (the
  monitor's, xtnd.hsm.monitor) first extends the destination to the same
  size (``before_source_extend``), then the source. The destination never
  is smaller than the source, and the source's threshold fires first.
- file destination: a file grows by itself; only a block source is
  extended, by the monitor as usual.
- file source, block destination: the monitor does not watch a file
  source; the loop here (thread "xtnd-hsm-replicate") follows the copy and
  extends the destination ahead of it. A qcow2 destination holds at most
  what the source holds, so the source's allocation (bulk stats) bounds
  the destination's; the destination's own threshold, armed on the
  mirror's index ``vda[N]``, fires when the copy gets near its end.

While a drive replicates its chunk is doubled (sizing.SizingConfig.chunk):
two volumes must keep up with one guest.

The job's phase follows libvirt's VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2 events:
starting -> copying (the mirror appears) -> ready (READY) -> pivoted
(COMPLETED) or aborted (CANCELED, FAILED). The caller that drives the copy
tells ``start`` and ``stop`` through the HSM's control socket.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import threading
import time
import uuid as uuidlib
import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import Any, Protocol

import libvirt
from xtnd.common import history
from xtnd.common.worker import Worker
from xtnd.hsm import links, sizing, stats, volumes
from xtnd.hsm.disks import disk_element
from xtnd.hsm.drive import Drive

log = logging.getLogger("xtnd.hsm.replicate")

STARTING = "starting"
COPYING = "copying"
READY = "ready"
PIVOTED = "pivoted"
ABORTED = "aborted"

_JOB_PHASES = {
    libvirt.VIR_DOMAIN_BLOCK_JOB_READY: READY,
    libvirt.VIR_DOMAIN_BLOCK_JOB_COMPLETED: PIVOTED,
    libvirt.VIR_DOMAIN_BLOCK_JOB_FAILED: ABORTED,
    libvirt.VIR_DOMAIN_BLOCK_JOB_CANCELED: ABORTED,
}


class Mailbox(Protocol):
    def submit(self, domain: uuidlib.UUID, volume: uuidlib.UUID, size: int) -> concurrent.futures.Future[int]: ...


class Volumes(Protocol):
    def refresh(self, domain: uuidlib.UUID, volume: uuidlib.UUID) -> int: ...


class Monitor(Protocol):
    def set_replicating(self, vm_id: str, drive: str, on: bool) -> None: ...


class Connection(Protocol):
    def get(self) -> Any: ...


class NotReplicating(Exception):
    def __init__(self, vm: str, drive: str):
        super().__init__(f"drive {drive} of vm {vm} is not being replicated")


class DestinationTooSmall(Exception):
    def __init__(self, volume: str, expected: int, actual: int):
        super().__init__(f"destination {volume} is {actual} bytes after refresh, expected at least {expected}")


@dataclasses.dataclass
class Replica:
    """One drive being copied to another domain, and its destination's state."""

    vm_id: str
    drive: str
    src_block: bool
    dst_domain: str
    dst_volume: str
    dst_block: bool
    dst_physical: int = 0
    dst_index: int | None = None
    dst_threshold: int | None = None
    dst_crossed: bool = False  # the destination's threshold fired since the last extend
    phase: str = STARTING
    extends_src: int = 0
    extends_dst: int = 0
    started: float = 0.0
    adopted: bool = False  # found in libvirt after a restart: nobody will call end()
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    @property
    def dst_target(self) -> str | None:
        return f"{self.drive}[{self.dst_index}]" if self.dst_index is not None else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "vm_uuid": self.vm_id,
            "drive": self.drive,
            "phase": self.phase,
            "src_block": self.src_block,
            "dst_domain": self.dst_domain,
            "dst_volume": self.dst_volume,
            "dst_block": self.dst_block,
            "dst_physical": self.dst_physical,
            "dst_target": self.dst_target,
            "dst_threshold": self.dst_threshold,
            "extends_src": self.extends_src,
            "extends_dst": self.extends_dst,
        }


def mirror_index(xml: str, drive: str) -> int | None:
    """The index libvirt gave the mirror (copy destination) of drive, if any."""
    disk = disk_element(ET.fromstring(xml), drive)
    mirror = disk.find("mirror") if disk is not None else None
    if mirror is None:
        return None
    source = mirror.find("source")
    index = source.get("index") if source is not None else None
    return int(index) if index is not None else None


@dataclasses.dataclass(frozen=True)
class Mirror:
    """A copy libvirt runs: a disk with a <mirror> in the live XML."""

    drive: str
    src_block: bool
    path: str
    dst_block: bool
    ready: bool


def mirrors(xml: str) -> list[Mirror]:
    """The disks of a domain's live XML that libvirt copies somewhere."""
    found = []
    for disk in ET.fromstring(xml).iterfind("devices/disk"):
        target, mirror = disk.find("target"), disk.find("mirror")
        source = mirror.find("source") if mirror is not None else None
        if target is None or mirror is None or source is None:
            continue
        path = source.get("dev") or source.get("file") or mirror.get("file")
        if not path:
            continue
        found.append(Mirror(target.get("dev", ""), disk.get("type") == "block", path,
                            mirror.get("type") == "block", mirror.get("ready") == "yes"))  # fmt: skip
    return found


def dest_needs(dst_physical: int, data: int, capacity: int, config: sizing.SizingConfig) -> int | None:
    """The size the destination must grow to for data bytes to fit with a
    watermark to spare (replicating chunk), or None when it has room."""
    limit = sizing.max_size(capacity)
    if dst_physical >= limit or dst_physical - data >= config.watermark(sizing.REPLICATING):
        return None
    size = sizing.next_size(max(dst_physical, data), capacity, config, sizing.REPLICATING)
    return size if size > dst_physical else None


class Replicator(Worker):
    def __init__(
        self,
        connection: Connection,
        mailbox: Mailbox,
        volumes: Volumes,
        monitor: Monitor,
        config: sizing.SizingConfig,
        interval: float = 0.5,
        extend_timeout: float = 120.0,
        dest_first: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ):
        """dest_first=False turns the destination-first rule off (tests
        showing it matters); never in production."""
        self._connection = connection
        self._mailbox = mailbox
        self._volumes = volumes
        self._monitor = monitor
        self.config = config
        self.interval = interval
        self.extend_timeout = extend_timeout
        self.dest_first = dest_first
        self._clock = clock
        self._lock = threading.Lock()
        super().__init__("xtnd-hsm-replicate", self._lock)
        self._replicas: dict[tuple[str, str], Replica] = {}
        self._kick = False

    # Control (from the control socket)

    def begin(self, vm_id: str, drive: str, src_block: bool, dst_domain: str, dst_volume: str, dst_block: bool,
              dst_physical: int) -> Replica:  # fmt: skip
        """A copy of vm_id's drive to (dst_domain, dst_volume) is about to start."""
        replica = Replica(vm_id, drive, src_block, str(uuidlib.UUID(dst_domain)), str(uuidlib.UUID(dst_volume)),
                          dst_block, dst_physical=dst_physical, started=self._clock())  # fmt: skip
        with self._cond:
            self._replicas[(vm_id, drive)] = replica
            self._cond.notify_all()
        self._monitor.set_replicating(vm_id, drive, True)
        history.record(
            "replicate", vm=vm_id, drive=drive, phase=STARTING, dst=replica.dst_volume, dst_size=dst_physical
        )
        log.info(
            "replication started vm=%s drive=%s dst_domain=%s dst_volume=%s src_block=%s dst_block=%s",
            vm_id, drive, replica.dst_domain, replica.dst_volume, src_block, dst_block,
        )  # fmt: skip
        return replica

    def end(self, vm_id: str, drive: str, outcome: str) -> Replica:
        """The copy ended (outcome: pivoted or aborted): stop watching it."""
        with self._cond:
            replica = self._replicas.pop((vm_id, drive), None)
        if replica is None:
            raise NotReplicating(vm_id, drive)
        replica.phase = outcome
        self._monitor.set_replicating(vm_id, drive, False)
        history.record("replicate", vm=vm_id, drive=drive, phase=outcome, dst=replica.dst_volume)
        log.info(
            "replication ended vm=%s drive=%s outcome=%s extends_src=%d extends_dst=%d",
            vm_id, drive, outcome, replica.extends_src, replica.extends_dst,
        )  # fmt: skip
        return replica

    def adopt(self, conn: Any, run_dir: str) -> list[Replica]:
        """Register the copies libvirt runs to volume links under run_dir
        that this HSM does not know (it restarted during a copy): their
        destination is kept ahead of the guest from now on, with no word
        from the command driving the copy. Called on every (re)connect,
        before the monitor looks at the drives (so a source extend already
        goes destination first)."""
        adopted = []
        for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
            try:
                found, vm_id = mirrors(dom.XMLDesc(0)), dom.UUIDString()
            except libvirt.libvirtError as e:
                log.debug("cannot read a domain's disks: %s", e)  # it stopped meanwhile
                continue
            for m in found:
                ids = links.parse(m.path, run_dir)
                if ids is None or self.get(vm_id, m.drive) is not None:
                    continue  # not a volume's copy, or known
                try:
                    physical = volumes.device_size(m.path)
                except OSError as e:
                    log.warning("cannot adopt the copy of vm=%s drive=%s to %s: %s", vm_id, m.drive, m.path, e)
                    continue
                replica = self.begin(vm_id, m.drive, m.src_block, str(ids[0]), str(ids[1]), m.dst_block, physical)
                replica.phase = READY if m.ready else COPYING
                replica.adopted = True
                log.info(
                    "replication found vm=%s drive=%s dst_volume=%s phase=%s dst_mb=%d (a copy from before)",
                    dom.name(), m.drive, ids[1], replica.phase, physical // sizing.MiB,
                )  # fmt: skip
                adopted.append(replica)
        return adopted

    def get(self, vm_id: str, drive: str) -> Replica | None:
        with self._lock:
            return self._replicas.get((vm_id, drive))

    def replicas(self) -> list[Replica]:
        with self._lock:
            return list(self._replicas.values())

    # Hooks (monitor, libvirt events)

    def before_source_extend(self, d: Drive, new_size: int) -> None:
        """Called by the monitor before it extends a source volume: extend
        the block destination to new_size first. Raises if that fails, so
        the source extend fails too and is retried."""
        replica = self.get(d.vm_id, d.name)
        if replica is None:
            return
        replica.extends_src += 1
        if replica.dst_block and self.dest_first:
            self._extend_dst(replica, new_size, "source")
        history.record("replica_extend", side="src", vm=d.vm_id, drive=d.name, volume=d.volume_id, size=new_size,
                       why="requested")  # fmt: skip

    def block_threshold(self, dom: Any, dev: str) -> bool:
        """A threshold event; True if it was a destination's (handled here)."""
        vm_id = dom.UUIDString()
        with self._lock:
            replica = next((r for r in self._replicas.values() if r.vm_id == vm_id and r.dst_target == dev), None)
            if replica is None:
                return False
            replica.dst_threshold = None
            replica.dst_crossed = True
            self._kick = True
            self._cond.notify_all()
        log.info("destination threshold crossed vm=%s target=%s", dom.name(), dev)
        return True

    def block_job(self, dom: Any, disk: str, job_type: int, status: int) -> None:
        phase = _JOB_PHASES.get(status)
        if phase is None:
            return
        replica = self.get(dom.UUIDString(), disk)
        if replica is None:
            return
        replica.phase = phase
        history.record("replicate", vm=replica.vm_id, drive=disk, phase=phase, dst=replica.dst_volume)
        log.info("block job vm=%s drive=%s phase=%s", dom.name(), disk, phase)
        if replica.adopted and phase in (PIVOTED, ABORTED):
            with contextlib.suppress(NotReplicating):
                self.end(replica.vm_id, disk, phase)  # no command will (see adopt)

    # The watch loop

    def _run(self) -> None:
        while self._pause(None, lambda: bool(self._replicas)):
            for replica in self.replicas():
                try:
                    self.check(replica)
                except Exception as e:  # noqa: BLE001 - retried on the next round
                    log.warning("replication check failed vm=%s drive=%s: %s", replica.vm_id, replica.drive, e)
            self._pause(self.interval, lambda: self._kick)
            with self._cond:
                self._kick = False

    def check(self, replica: Replica) -> None:
        """One look at a replication: arm the destination's threshold on the
        mirror's index, extend a block destination the copy is catching up with."""
        conn = self._connection.get()
        try:
            dom = conn.lookupByUUIDString(replica.vm_id)
            index = mirror_index(dom.XMLDesc(0), replica.drive)
        except libvirt.libvirtError:
            if not replica.adopted:
                raise
            index = None  # the vm is gone (a reconnect adopts the copy again if not)
        if index is None:
            if replica.adopted:
                # Found after a restart, so no command will say the copy ended: see it here.
                with contextlib.suppress(NotReplicating):
                    self.end(replica.vm_id, replica.drive, PIVOTED if replica.phase == PIVOTED else ABORTED)
            return  # not copying (yet, or any more)
        if replica.phase == STARTING:
            replica.phase = COPYING
        if not replica.dst_block:
            return
        if index != replica.dst_index:
            replica.dst_index = index
            replica.dst_threshold = None
        raw = conn.domainListGetStats(
            [dom], libvirt.VIR_DOMAIN_STATS_BLOCK, libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_BACKING
        )[0][1]
        block = stats.parse(raw).blocks.get(replica.drive)
        if block is None:
            return
        # The mirror holds at most what the source holds (same guest data,
        # same qcow2 clusters): the source's allocation bounds it.
        data, why = block.allocation, "copy"
        if replica.dst_crossed:
            # The copy wrote past the destination's threshold: extend now.
            data, why = max(data, replica.dst_physical - self.config.watermark(sizing.REPLICATING) + 1), "threshold"
        size = dest_needs(replica.dst_physical, data, block.capacity, self.config)
        if size is not None:
            self._extend_dst(replica, size, why)
        if replica.dst_threshold is None:
            self._arm(dom, replica)

    def _extend_dst(self, replica: Replica, size: int, why: str) -> None:
        with replica.lock:
            if replica.dst_physical >= size:
                return
            domain, volume = uuidlib.UUID(replica.dst_domain), uuidlib.UUID(replica.dst_volume)
            t0 = self._clock()
            log.info(
                "extend requested side=dst vm=%s drive=%s volume=%s old_mb=%d new_mb=%d why=%s",
                replica.vm_id, replica.drive, volume, replica.dst_physical // sizing.MiB, size // sizing.MiB, why,
            )  # fmt: skip
            self._mailbox.submit(domain, volume, size).result(self.extend_timeout)
            physical = self._volumes.refresh(domain, volume)
            if physical < size:
                raise DestinationTooSmall(replica.dst_volume, size, physical)
            replica.dst_physical = physical
            replica.extends_dst += 1
            replica.dst_threshold = None
            replica.dst_crossed = False
            # Recorded under the lock: a source extend that found the
            # destination already big enough (thanks to this one) must not
            # be recorded before it.
            history.record("replica_extend", side="dst", vm=replica.vm_id, drive=replica.drive,
                           volume=replica.dst_volume, size=physical, why=why)  # fmt: skip
        log.info(
            "extend-complete side=dst vm=%s drive=%s volume=%s new_mb=%d ms=%.1f",
            replica.vm_id, replica.drive, volume, physical // sizing.MiB, (self._clock() - t0) * 1000,
        )  # fmt: skip

    def _arm(self, dom: Any, replica: Replica) -> None:
        target = replica.dst_target
        if target is None:
            return
        threshold = sizing.threshold(replica.dst_physical, self.config, sizing.REPLICATING)
        dom.setBlockThreshold(target, threshold)
        replica.dst_threshold = threshold
        log.debug("destination threshold armed vm=%s target=%s threshold=%d", dom.name(), target, threshold)
