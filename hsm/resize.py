"""Growing the disks of this host's VMs after ``xtnd volume resize``.

The lease holder records the larger capacity and writes a resize notice
into outbox block 0 (xtnd.mailbox.notice says why that path). This
watcher reads that block every ``interval`` seconds while the monitor
has VMs (an HSM without VMs does no storage I/O for it) and, when the
notice changed, compares every disk of those VMs that sits on a volume
link with the capacity recorded on storage (one ``lvs`` per disk, through
the HSM's read-only LVM shell). A disk whose guest sees less grows, whether
the VM runs or is paused, through the HSM's one grow primitive
(xtnd.hsm.growdisk):

- qcow2: libvirt blockResize of the image's virtual size, in bytes (QEMU
  writes the header; the LV keeps growing by thin extension);
- raw: this host's mapping is refreshed first (the SPM grew the LV), then
  blockResize to the recorded capacity.

QEMU then tells the guest (virtio-blk's config change); the monitor checks
the drive again (Monitor.resized): its max size follows the new capacity
and a drive disabled at its old max size is watched again. The first read
after the start compares every disk too: a notice written while this HSM
was down is not lost.
"""

from __future__ import annotations

import logging
import uuid as uuidlib
from typing import Protocol

import libvirt
from xtnd import lvm, storage
from xtnd.common.worker import Worker
from xtnd.hsm.growdisk import DiskGrower, GrowError, GrowFailed, Target
from xtnd.hsm.libvirtconn import NotConnected
from xtnd.mailbox import notice
from xtnd.mailbox.directio import Storage

log = logging.getLogger("xtnd.hsm.resize")


class Volumes(Protocol):
    def domain(self, uuid: uuidlib.UUID) -> storage.Domain: ...


class Monitor(Protocol):
    def vm_names(self) -> dict[str, str]: ...


_NEVER = uuidlib.UUID(int=0)


class ResizeWatcher(Worker):
    def __init__(
        self,
        outbox: Storage,
        volumes: Volumes,
        monitor: Monitor,
        grower: DiskGrower,
        interval: float,
    ):
        self._outbox = outbox
        self._volumes = volumes
        self._monitor = monitor
        self._grower = grower
        self.interval = interval
        self._seen: uuidlib.UUID | None = _NEVER
        self.grown = 0
        super().__init__("xtnd-hsm-resize")

    def _run(self) -> None:
        while self._pause(self.interval):
            try:
                self.poll()
            except Exception:
                log.exception("resize check failed")

    def poll(self) -> int:
        """One look at the notice (none while no VM runs here); the number of disks grown."""
        if not self._monitor.vm_names():
            return 0
        current = notice.read(self._outbox)
        current_id = current.id if current else None
        if current_id == self._seen:
            return 0
        self._seen = current_id
        if current is not None:
            log.info(
                "resize notice domain=%s volume=%s capacity=%d notice=%s",
                current.domain, current.volume, current.capacity, current.id,
            )  # fmt: skip
        return self.check_all()

    def check_all(self) -> int:
        """Grow every linked disk of the monitored VMs that the guest sees smaller than recorded."""
        grown = 0
        for vm_id in self._monitor.vm_names():
            try:
                targets = self._grower.targets(vm_id)
            except GrowFailed as e:
                if isinstance(e.error, NotConnected):
                    self._seen = _NEVER  # look again once connected
                    return grown
                log.warning("cannot read the disks of vm=%s: %s", vm_id, e)
                continue
            except GrowError as e:
                log.debug("vm not running here while checking sizes vm=%s: %s", vm_id, e)
                continue
            for t in targets:
                try:
                    grown += self.grow(t)
                except (GrowError, libvirt.libvirtError, storage.StorageError, lvm.LVMError) as e:
                    log.error("cannot grow disk vm=%s drive=%s volume=%s error=%s", t.vm, t.drive, t.volume, e)
        return grown

    def grow(self, t: Target) -> bool:
        """Make QEMU and the guest see the recorded capacity; True if it grew."""
        assert t.domain is not None and t.volume is not None
        recorded = self._volumes.domain(t.domain).volume_info(t.volume).capacity
        seen = int(t.dom.blockInfo(t.drive)[0])
        if recorded <= seen:
            return False
        size = recorded
        if t.format == "raw":
            # QEMU cannot grow a raw disk past its device: the mapping first.
            size = min(recorded, self._grower.rescan(t.vm, str(t.volume)))
            if size <= seen:
                log.warning("device not grown yet vm=%s drive=%s size=%d", t.vm, t.drive, size)
                return False
        self._grower.grow_to(t.vm, str(t.volume), size)
        self.grown += 1
        return True
