"""Making a running guest see a larger disk: the HSM side of every resize.

Three callers grow a guest's disk after its storage grew out of band: the
host API (``POST /v1/events`` volume-extended, ``.../extend``), the udev
watcher (a LUN or loop device under a VM grew) and ``xtnd volume resize``.
They share this module; its names are kept stable for them:

- ``DiskGrower.locate(vm, volume) -> Target``: the VM's disk on the volume
  link ``<run_dir>/<domain>/<volume>`` (raises the errors below).
- ``DiskGrower.rescan(vm, volume) -> int``: refresh this host's mapping of
  the volume (``xtnd.lvm.activation``: ``lvchange --refresh`` or a new
  loop size limit) and return the device's size in bytes.
- ``DiskGrower.device_size(vm, volume) -> int``: the size this host sees,
  without refreshing.
- ``DiskGrower.grow_to_device(vm, volume) -> Grown``: rescan, then grow a
  raw disk to the device's size (libvirt ``blockResize`` in bytes). A qcow2
  disk's virtual size is its image's own: only the rescan applies (the
  monitor then re-arms its threshold on the larger device).
- ``DiskGrower.grow_to(vm, volume, size) -> Grown``: ``blockResize`` to
  size bytes (qcow2 or raw; raw cannot pass its device).
- ``DiskGrower.grow_device(device) -> list[Grown]``: every disk of every
  running VM whose source resolves to device (udev), grown to its size.

After a resize the monitor is told (``Monitor.resized``): its check reads
the new capacity from libvirt, so the drive's max size follows it, a drive
disabled at its old max size is watched again, and the block threshold is
armed again for the new physical size.

Errors, by what the caller answers: NoSuchVM and NoSuchVolume (not here),
NotRunning (defined here, not running), StateNotAllowed (crashed,
suspended to memory, or a shrink), UnsupportedDisk (not a disk on a block
device or file: cdrom, network, ...), GrowFailed (libvirt or storage
failed). All derive from GrowError and carry a one-line message.

Every call is blocking (libvirt, LVM): run it on a worker thread.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import uuid as uuidlib
import xml.etree.ElementTree as ET
from typing import Any, Protocol

import libvirt
from xtnd import lvm, storage
from xtnd.common.cmd import CommandError
from xtnd.hsm import links
from xtnd.hsm.libvirtconn import NotConnected
from xtnd.hsm.volumes import device_size

log = logging.getLogger("xtnd.hsm.grow")


class GrowError(Exception):
    """A disk could not be grown; str() is a one-line reason."""


class NoSuchVM(GrowError):
    def __init__(self, vm: str):
        self.vm = vm
        super().__init__(f"no such vm {vm} on this host")


class NoSuchVolume(GrowError):
    def __init__(self, vm: str, volume: str):
        self.vm = vm
        self.volume = volume
        super().__init__(f"vm {vm} has no disk on volume {volume}")


class StateNotAllowed(GrowError):
    def __init__(self, vm: str, why: str):
        self.vm = vm
        self.why = why
        super().__init__(f"vm {vm}: {why}")


class NotRunning(StateNotAllowed):
    """Defined on this host but not running here."""

    def __init__(self, vm: str):
        super().__init__(vm, "not running on this host")


class UnsupportedDisk(GrowError):
    def __init__(self, vm: str, drive: str, kind: str):
        self.vm = vm
        self.drive = drive
        self.kind = kind
        super().__init__(f"vm {vm} drive {drive}: cannot grow a {kind} disk")


class GrowFailed(GrowError):
    def __init__(self, vm: str, what: str, error: Exception):
        self.vm = vm
        self.error = error
        super().__init__(f"vm {vm}: {what} failed: {error}")


class Connection(Protocol):
    def get(self) -> Any: ...


class Volumes(Protocol):
    def refresh(self, domain: uuidlib.UUID, volume: uuidlib.UUID) -> int: ...


class Monitor(Protocol):
    def resized(self, vm_id: str, name: str) -> None: ...


@dataclasses.dataclass(frozen=True)
class Target:
    """A running VM's disk on a volume."""

    dom: Any  # libvirt.virDomain
    vm: str  # uuid
    drive: str  # target dev, e.g. "vda"
    path: str  # source path as in the XML (the volume link)
    format: str  # "raw", "qcow2"
    domain: uuidlib.UUID | None
    volume: uuidlib.UUID | None


@dataclasses.dataclass(frozen=True)
class Grown:
    vm: str
    drive: str
    volume: str
    before: int  # bytes the guest saw
    after: int  # bytes the guest sees now
    device: int  # the device's size in bytes
    seconds: float

    @property
    def changed(self) -> bool:
        return self.after != self.before


# Failures of the storage side of a rescan.
_STORAGE_ERRORS = (storage.StorageError, lvm.LVMError, lvm.ActivationError, CommandError, OSError)


class DiskGrower:
    def __init__(self, connection: Connection, volumes: Volumes, monitor: Monitor, run_dir: str = links.RUN_DIR):
        self._connection = connection
        self._volumes = volumes
        self._monitor = monitor
        self._run_dir = run_dir

    # Looking up

    def locate(self, vm: str, volume: str) -> Target:
        dom = self._running(vm)
        try:
            want = uuidlib.UUID(volume)
        except ValueError:
            raise NoSuchVolume(vm, volume) from None
        for t in self._disks(dom, vm):
            if t.volume == want:
                return t
        raise NoSuchVolume(vm, volume)

    def targets(self, vm: str) -> list[Target]:
        """The running VM's block and file disks on volume links (what
        ``xtnd volume resize`` may have to grow)."""
        dom = self._running(vm)
        return [t for t in self._disks(dom, vm) if t.volume is not None and not t.format.startswith("unsupported:")]

    def device_size(self, vm: str, volume: str) -> int:
        t = self.locate(vm, volume)
        try:
            return device_size(t.path)
        except OSError as e:
            raise GrowFailed(vm, "reading the device size", e) from None

    # Growing

    def rescan(self, vm: str, volume: str) -> int:
        return self._rescan(self.locate(vm, volume))

    def grow_to_device(self, vm: str, volume: str) -> Grown:
        start = time.monotonic()
        t = self.locate(vm, volume)
        size = self._rescan(t)
        if t.format != "raw":
            # The image's virtual size is not the device's; the monitor
            # re-arms the threshold for the larger device.
            before = self._capacity(t)
            self._monitor.resized(t.vm, t.drive)
            return Grown(t.vm, t.drive, str(t.volume), before, before, size, time.monotonic() - start)
        return self._resize(t, size, size, start)

    def grow_to(self, vm: str, volume: str, size: int) -> Grown:
        start = time.monotonic()
        t = self.locate(vm, volume)
        try:
            device = device_size(t.path)
        except OSError as e:
            raise GrowFailed(vm, "reading the device size", e) from None
        return self._resize(t, size, device, start)

    def grow_device(self, device: str) -> list[Grown]:
        """Every disk of a running VM on device (a path whose realpath is
        compared) grown to the device's size; failures are logged."""
        real = os.path.realpath(device)
        try:
            doms = self._conn().listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
        except libvirt.libvirtError as e:
            raise GrowFailed("-", "listing vms", e) from None
        grown = []
        for dom in doms:
            try:
                vm = dom.UUIDString()
                targets = [t for t in self._disks(dom, vm) if os.path.realpath(t.path) == real]
            except (GrowError, libvirt.libvirtError) as e:
                log.debug("vm gone while matching device=%s: %s", device, e)
                continue
            for t in targets:
                start = time.monotonic()
                try:
                    size = device_size(real)
                    if t.format == "raw":
                        grown.append(self._resize(t, size, size, start))
                    else:
                        self._monitor.resized(t.vm, t.drive)
                except (GrowError, OSError) as e:
                    log.error("cannot grow disk vm=%s drive=%s device=%s error=%s", t.vm, t.drive, device, e)
        return grown

    # Internals

    def _conn(self) -> Any:
        try:
            return self._connection.get()
        except NotConnected as e:
            raise GrowFailed("-", "connecting to libvirt", e) from None

    def _running(self, vm: str) -> Any:
        conn = self._conn()
        try:
            dom = conn.lookupByUUIDString(vm)
        except libvirt.libvirtError as e:
            if e.get_error_code() in (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_INVALID_ARG):
                raise NoSuchVM(vm) from None
            raise GrowFailed(vm, "looking up the vm", e) from None
        try:
            state = dom.state()[0]
        except libvirt.libvirtError as e:
            raise GrowFailed(vm, "reading the vm state", e) from None
        if state in (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTDOWN, libvirt.VIR_DOMAIN_NOSTATE):
            raise NotRunning(vm)
        if state not in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_BLOCKED):
            raise StateNotAllowed(vm, f"state {state} does not allow a resize")
        return dom

    def _disks(self, dom: Any, vm: str) -> list[Target]:
        """The VM's disks on volume links; UnsupportedDisk for a volume
        link used by anything but a block or file disk."""
        try:
            root = ET.fromstring(dom.XMLDesc(0))
        except libvirt.libvirtError as e:
            raise GrowFailed(vm, "reading the vm's xml", e) from None
        found = []
        for disk in root.iterfind("devices/disk"):
            source, target, driver = disk.find("source"), disk.find("target"), disk.find("driver")
            if source is None or target is None or not target.get("dev"):
                continue
            path = source.get("dev") or source.get("file") or ""
            ids = links.parse(path, self._run_dir) if path else None
            name = target.get("dev", "")
            kind = f"{disk.get('type', '?')} {disk.get('device', 'disk')}"
            if disk.get("type") not in ("block", "file") or disk.get("device", "disk") != "disk":
                if ids is not None:
                    found.append(Target(dom, vm, name, path, "unsupported:" + kind, ids[0], ids[1]))
                continue
            fmt = driver.get("type", "raw") if driver is not None else "raw"
            found.append(Target(dom, vm, name, path, fmt, ids[0] if ids else None, ids[1] if ids else None))
        return found

    def _rescan(self, t: Target) -> int:
        self._supported(t)
        assert t.domain is not None and t.volume is not None
        try:
            size = self._volumes.refresh(t.domain, t.volume)
        except _STORAGE_ERRORS as e:
            raise GrowFailed(t.vm, f"refreshing volume {t.volume}", e) from None
        log.info("volume rescanned vm=%s drive=%s volume=%s size=%d", t.vm, t.drive, t.volume, size)
        return size

    def _supported(self, t: Target) -> None:
        if t.format.startswith("unsupported:"):
            raise UnsupportedDisk(t.vm, t.drive, t.format.partition(":")[2])

    def _capacity(self, t: Target) -> int:
        try:
            return int(t.dom.blockInfo(t.drive)[0])
        except libvirt.libvirtError as e:
            raise GrowFailed(t.vm, "reading the disk's size", e) from None

    def _resize(self, t: Target, size: int, device: int, start: float) -> Grown:
        self._supported(t)
        before = self._capacity(t)
        volume = str(t.volume) if t.volume else t.path
        if size < before:
            raise StateNotAllowed(t.vm, f"drive {t.drive} is {before} bytes; refusing to shrink it to {size}")
        if size > before:
            try:
                t.dom.blockResize(t.drive, size, libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)
            except libvirt.libvirtError as e:
                raise GrowFailed(t.vm, f"blockResize of {t.drive} to {size}", e) from None
            self._monitor.resized(t.vm, t.drive)
        after = self._capacity(t)
        grown = Grown(t.vm, t.drive, volume, before, after, device, time.monotonic() - start)
        log.info(
            "disk grown vm=%s drive=%s volume=%s from=%d to=%d device=%d duration_ms=%.1f",
            t.vm, t.drive, volume, before, after, device, grown.seconds * 1000,
        )  # fmt: skip
        return grown
