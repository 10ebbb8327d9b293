"""ResizeWatcher's decisions with fakes (the real path: test_resize_guest.py).

When it reads the notice block, when it compares disks, and which disks it
grows, with an in-memory outbox and a grower that records its calls.
"""

from __future__ import annotations

import uuid
from types import SimpleNamespace
from typing import Any

from xtnd.hsm.growdisk import NotRunning, Target
from xtnd.hsm.resize import ResizeWatcher
from xtnd.mailbox import notice
from xtnd.mailbox.directio import MemoryStorage

MiB = 1024**2
SD = uuid.uuid4()


class Dom:
    def __init__(self, sizes: dict[str, int]):
        self.sizes = sizes

    def blockInfo(self, drive: str) -> list[int]:
        return [self.sizes[drive], 0, 0]


class Grower:
    def __init__(self, targets: dict[str, list[Target]], device: int = 0):
        self.targets_by_vm = targets
        self.device = device
        self.calls: list[tuple[str, ...]] = []

    def targets(self, vm: str) -> list[Target]:
        if vm not in self.targets_by_vm:
            raise NotRunning(vm)
        return self.targets_by_vm[vm]

    def rescan(self, vm: str, volume: str) -> int:
        self.calls.append(("rescan", vm, volume))
        return self.device

    def grow_to(self, vm: str, volume: str, size: int) -> Any:
        self.calls.append(("grow_to", vm, volume, str(size)))


class Volumes:
    def __init__(self, capacities: dict[uuid.UUID, int]):
        self.capacities = capacities
        self.reads = 0

    def domain(self, uuid: uuid.UUID) -> Any:
        def volume_info(vol: uuid.UUID) -> Any:
            self.reads += 1
            return SimpleNamespace(capacity=self.capacities[vol])

        return SimpleNamespace(volume_info=volume_info)


def make(vms: dict[str, str], targets: dict[str, list[Target]], caps: dict[uuid.UUID, int], device: int = 0) -> Any:
    outbox = MemoryStorage(8 * 4096)
    monitor = SimpleNamespace(vm_names=lambda: vms)
    grower = Grower(targets, device)
    volumes = Volumes(caps)
    watcher = ResizeWatcher(outbox, volumes, monitor, grower, interval=0.5)  # type: ignore[arg-type]
    return watcher, outbox, grower, volumes


def test_no_vms_no_io_then_first_poll_compares_everything() -> None:
    q, raw = uuid.uuid4(), uuid.uuid4()
    dom = Dom({"vda": 64 * MiB, "vdb": 32 * MiB})
    targets = [
        Target(dom, "vm1", "vda", "/l/q", "qcow2", SD, q),
        Target(dom, "vm1", "vdb", "/l/raw", "raw", SD, raw),
    ]
    vms: dict[str, str] = {}
    watcher, outbox, grower, volumes = make(vms, {"vm1": targets}, {q: 96 * MiB, raw: 48 * MiB}, device=40 * MiB)
    assert watcher.poll() == 0
    assert outbox.counters.snapshot()["reads"] == 0, "an HSM without VMs reads nothing"

    vms["vm1"] = "one"
    # No notice ever written, but the first look compares every disk (a
    # notice sent while this HSM was down is not lost).
    assert watcher.poll() == 2
    assert grower.calls == [
        ("grow_to", "vm1", str(q), str(96 * MiB)),
        ("rescan", "vm1", str(raw)),
        ("grow_to", "vm1", str(raw), str(40 * MiB)),  # a raw disk stops at its device
    ]
    grower.calls.clear()
    assert watcher.poll() == 0 and grower.calls == [], "no new notice: nothing compared"
    reads = volumes.reads

    dom.sizes.update(vda=96 * MiB, vdb=48 * MiB)
    notice.announce(outbox, SD, q, 96 * MiB)
    assert watcher.poll() == 0, "already the recorded size"
    assert volumes.reads == reads + 2 and grower.calls == []


def test_gone_vm_skipped() -> None:
    q = uuid.uuid4()
    dom = Dom({"vda": 64 * MiB})
    watcher, outbox, grower, _ = make(
        {"vm1": "one", "gone": "two"}, {"vm1": [Target(dom, "vm1", "vda", "/l/q", "qcow2", SD, q)]}, {q: 80 * MiB}
    )
    notice.announce(outbox, SD, q, 80 * MiB)
    assert watcher.poll() == 1
    assert grower.calls == [("grow_to", "vm1", str(q), str(80 * MiB))]
