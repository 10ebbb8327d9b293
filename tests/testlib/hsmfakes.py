"""Fakes of libvirt, the mailbox and the volumes for Monitor unit tests.

They model only what the monitor relies on: a domain's state and pause
reason, diskErrors, bulk block stats of the top image, thresholds that
fire once, and an SPM whose replies grow the device.
"""

from __future__ import annotations

import uuid as uuidlib
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import libvirt
from xtnd.hsm import links

MiB = 1024**2
GiB = 1024**3
RUN = "/run/xtnd-test"


def disk_xml(name: str, index: int, path: str, fmt: str = "qcow2") -> str:
    return (
        f"<disk type='block' device='disk'><driver name='qemu' type='{fmt}'/>"
        f"<source dev='{path}' index='{index}'/><target dev='{name}' bus='virtio'/></disk>"
    )


class FakeDisk:
    def __init__(self, name: str, capacity: int = 1 * GiB, physical: int = 16 * MiB, allocation: int = 1 * MiB):
        self.name = name
        self.index = 1
        self.domain = uuidlib.uuid4()
        self.volume = uuidlib.uuid4()
        self.path = links.link_path(self.domain, self.volume, RUN)
        self.capacity = capacity
        self.physical = physical
        self.allocation = allocation
        self.threshold: int | None = None


class FakeDomain:
    def __init__(self, name: str, *disks: FakeDisk, extra_xml: str = ""):
        self._uuid = str(uuidlib.uuid4())
        self._name = name
        self.disks = {d.name: d for d in disks}
        self.extra_xml = extra_xml
        self.status = (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_BOOTED)
        self.errors: dict[str, int] = {}
        self.resumes = 0
        self.suspends = 0
        self.thresholds: list[tuple[str, int]] = []
        self.armed_at_physical: list[int] = []  # the disk's physical size when each threshold was set
        self.active = True

    def UUIDString(self) -> str:
        return self._uuid

    def name(self) -> str:
        return self._name

    def XMLDesc(self, flags: int = 0) -> str:
        disks = "".join(disk_xml(d.name, d.index, d.path) for d in self.disks.values())
        return f"<domain><name>{self._name}</name><devices>{disks}{self.extra_xml}</devices></domain>"

    def state(self) -> list[int]:
        return list(self.status)

    def isActive(self) -> int:
        return int(self.active)

    def diskErrors(self) -> dict[str, int]:
        return dict(self.errors)

    def resume(self) -> None:
        self.resumes += 1
        self.status = (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_UNPAUSED)
        self.errors = {}

    def suspend(self) -> None:
        self.suspends += 1
        self.status = (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_USER)

    def setBlockThreshold(self, target: str, threshold: int) -> None:
        name = target.partition("[")[0]
        self.disks[name].threshold = threshold
        self.thresholds.append((target, threshold))
        self.armed_at_physical.append(self.disks[name].physical)

    def pause_enospc(self, name: str) -> None:
        self.status = (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_IOERROR)
        self.errors[name] = libvirt.VIR_DOMAIN_DISK_ERROR_NO_SPACE

    def stats(self) -> dict[str, Any]:
        s: dict[str, Any] = {"state.state": self.status[0], "state.reason": self.status[1]}
        s["block.count"] = len(self.disks)
        for i, d in enumerate(self.disks.values()):
            p = f"block.{i}."
            s.update({p + "name": d.name, p + "path": d.path, p + "backingIndex": d.index})
            s.update({p + "capacity": d.capacity, p + "allocation": d.allocation, p + "physical": d.physical})
            if d.threshold is not None:
                s[p + "threshold"] = d.threshold
        return s


class FakeConn:
    def __init__(self, *domains: FakeDomain):
        self.domains = {d.UUIDString(): d for d in domains}
        self.bulk_calls = 0
        self.list_calls = 0  # domainListGetStats: fresh stats of one VM

    def getAllDomainStats(self, stats: int, flags: int) -> list[tuple[FakeDomain, dict[str, Any]]]:
        self.bulk_calls += 1
        return [(d, d.stats()) for d in self.domains.values()]

    def domainListGetStats(self, doms: list[FakeDomain], stats: int, flags: int) -> list[tuple[FakeDomain, Any]]:
        self.list_calls += 1
        return [(d, d.stats()) for d in doms if d.active]

    def lookupByUUIDString(self, uuid: str) -> FakeDomain:
        try:
            return self.domains[uuid]
        except KeyError:
            raise libvirt.libvirtError("no domain") from None

    def listAllDomains(self, flags: int = 0) -> list[FakeDomain]:
        return list(self.domains.values())


class FakeConnection:
    def __init__(self, conn: FakeConn):
        self.conn = conn
        self.errors: list[libvirt.libvirtError] = []

    def get(self) -> FakeConn:
        return self.conn

    def report_error(self, error: libvirt.libvirtError) -> None:
        self.errors.append(error)


class FakeSPM:
    """Mailbox and Volumes at once: a granted extend grows the disk on refresh."""

    def __init__(self, conn: FakeConn):
        self.conn = conn
        self.requests: list[tuple[uuidlib.UUID, int]] = []
        self.fail = False
        self.refreshes = 0

    def _disk(self, volume: uuidlib.UUID) -> FakeDisk:
        for dom in self.conn.domains.values():
            for d in dom.disks.values():
                if d.volume == volume:
                    return d
        raise LookupError(volume)

    def submit(self, domain: uuidlib.UUID, volume: uuidlib.UUID, size: int) -> Future[int]:
        self.requests.append((volume, size))
        f: Future[int] = Future()
        if self.fail:
            f.set_exception(RuntimeError("VG full"))
        else:
            self._disk(volume).granted = size  # type: ignore[attr-defined]
            f.set_result(size)
        return f

    def refresh(self, domain: uuidlib.UUID, volume: uuidlib.UUID, verified: Callable[[int], None] | None = None) -> int:
        self.refreshes += 1
        d = self._disk(volume)
        stored = max(d.physical, getattr(d, "granted", 0))
        if verified is not None:
            verified(stored)  # as a block domain: before the device grows
        d.physical = stored
        return d.physical
