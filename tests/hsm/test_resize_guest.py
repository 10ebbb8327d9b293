"""``xtnd volume resize`` under a real guest: the guest's own disk grows.

One TCG guest (xtnd.tools.rig.guest) runs on a thin qcow2 volume of a block
domain (loop PV, real LVM) with the real HSM (in this process) and an SPM
serving its extends; it prints /sys/block/vda/size whenever it changes
(Workload.watch_size). The resize is the real CLI, which records the
capacity and writes the resize notice into the outbox; the HSM reads it
and grows the disk through libvirt. Running and paused VM, refusals, and
the latency from the command to the guest seeing the new size.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import statistics
import time
import uuid
from collections.abc import Iterator

import libvirt
import pytest
from testlib.cli import xtnd
from testlib.hsmrun import Running, running
from xtnd.hsm.libvirtconn import EventLoop
from xtnd.mailbox import notice
from xtnd.mailbox.directio import DirectFile
from xtnd.tools.rig import guest, hsmrig
from xtnd.tools.rig.wait import wait_for

MiB = 1024**2

log = logging.getLogger("test")

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]


class Setup:
    def __init__(self, pool: hsmrig.Pool, disk: str, g: guest.Guest, running: Running):
        self.pool = pool
        self.disk = disk
        self.volume = hsmrig.volume_of(pool, disk)
        self.guest = g
        self.running = running

    def resize(self, size: str) -> int:
        return xtnd(
            "volume", "resize", "--domain", str(self.pool.uuid), "--uuid", str(self.volume), "--size", size,
            "--local", "--storage-config", self.pool.storage_config,
        )  # fmt: skip

    def capacity(self) -> int:
        return self.pool.domain.volume_info(self.volume).capacity

    def notice_id(self) -> object:
        with DirectFile(self.pool.domain.mailbox().outbox, readonly=True) as f:
            n = notice.read(f)
        return n.id if n else None

    def sizes(self) -> list[int]:
        """Every size of vda the guest printed, in bytes."""
        return [int(n) * 512 for n in re.findall(r"XTND-SIZE sectors=(\d+)", self.guest.console())]

    def wait_sectors(self, size: int, timeout: float = 60.0) -> float:
        """Wait for the guest to print its disk at size bytes; when it did."""
        self.guest.wait_console("XTND-SIZE", timeout=timeout)
        wait_for(lambda: self.sizes()[-1] == size, timeout=timeout, interval=0.02, what=f"the guest sees {size}")
        return time.monotonic()

    def drive_capacity(self) -> int:
        drives = self.running.hsm.monitor.snapshot().get(self.guest.dom.UUIDString(), {})
        return drives["vda"].capacity if "vda" in drives else 0


@contextlib.contextmanager
def setup(
    pool: hsmrig.Pool, conn: libvirt.virConnect, rig: guest.Rig, events: EventLoop, workdir: str
) -> Iterator[Setup]:
    disk = pool.thin_volume(capacity=64 * MiB, initial=16 * MiB)
    config = pool.config(chunk_mb=16, stats_interval=0.5)
    workload = guest.Workload(write_mb=4, hold=True, watch_size=True)
    with hsmrig.spm(pool), running(config, events) as r:
        with guest.guest(conn, rig, disk, workload, workdir) as g:
            g.start()
            s = Setup(pool, disk, g, r)
            s.wait_sectors(64 * MiB, timeout=180)
            wait_for(lambda: s.drive_capacity() == 64 * MiB, timeout=30, what="the HSM watches vda")
            yield s


def test_resize_running_and_paused_guest(
    pool: hsmrig.Pool, conn: libvirt.virConnect, rig: guest.Rig, libvirt_events: EventLoop, workdir: str
) -> None:
    with setup(pool, conn, rig, libvirt_events, workdir) as s:
        # Running: the guest's own device grows without a reboot.
        start = time.monotonic()
        assert s.resize("96M") == 0
        seen = s.wait_sectors(96 * MiB)
        log.info("resize latency running: %.0f ms", (seen - start) * 1000)
        assert s.capacity() == 96 * MiB
        # The HSM's sizing follows: its drive now has the new capacity (max size 96 x 1.1).
        wait_for(lambda: s.drive_capacity() == 96 * MiB, timeout=30, what="the HSM sees the new capacity")

        # Paused: QEMU grows the disk while paused; the guest sees it once resumed.
        s.guest.dom.suspend()
        s.guest.wait_state(libvirt.VIR_DOMAIN_PAUSED)
        assert s.resize("128M") == 0
        wait_for(lambda: s.guest.dom.blockInfo("vda")[0] == 128 * MiB, timeout=30, what="QEMU grows the paused disk")
        assert s.guest.state()[0] == libvirt.VIR_DOMAIN_PAUSED  # not resumed by the HSM
        s.guest.dom.resume()
        s.wait_sectors(128 * MiB)

        # Refusals change nothing and write no notice.
        before = s.notice_id()
        assert before is not None
        assert s.resize("64M") == 2  # shrink
        assert s.resize("128M") == 0  # same size: nothing to do
        assert s.resize("4G") == 1  # above the domain's free space
        assert s.capacity() == 128 * MiB
        assert s.notice_id() == before
        assert s.guest.dom.blockInfo("vda")[0] == 128 * MiB
        assert s.sizes() == [64 * MiB, 96 * MiB, 128 * MiB]


@pytest.mark.soak
def test_resize_latency(
    pool: hsmrig.Pool, conn: libvirt.virConnect, rig: guest.Rig, libvirt_events: EventLoop, workdir: str
) -> None:
    """Command -> guest sees the new size, 20 resizes of a running guest; prints the figures."""
    trials = int(os.environ.get("XTND_RESIZE_TRIALS", "20"))
    total: list[float] = []
    command: list[float] = []
    load_start = open("/proc/loadavg").read().split()[:3]
    with setup(pool, conn, rig, libvirt_events, workdir) as s:
        size = 64 * MiB
        for _ in range(trials):
            size += 4 * MiB
            start = time.monotonic()
            assert s.resize(f"{size // MiB}M") == 0
            command.append((time.monotonic() - start) * 1000)
            total.append((s.wait_sectors(size) - start) * 1000)
    load_end = open("/proc/loadavg").read().split()[:3]
    print()
    for name, values in (("command -> guest sees it", total), ("the command itself", command)):
        values.sort()
        p99 = values[min(len(values) - 1, int(len(values) * 0.99))]
        print(
            f"resize latency, {name}: n={len(values)} p50={statistics.median(values):.0f} ms p99={p99:.0f} ms "
            f"max={values[-1]:.0f} ms"
        )
    print(f"load average at start {' '.join(load_start)}, at end {' '.join(load_end)}; HSM stats_interval 0.5 s")


def test_resize_raw_block_guest(
    pool: hsmrig.Pool, conn: libvirt.virConnect, rig: guest.Rig, libvirt_events: EventLoop, workdir: str
) -> None:
    """A raw LV under a running guest: the SPM side grows and zeroes the LV,
    the HSM refreshes its mapping and grows the disk to the new capacity."""
    disk = pool.volume(32 * MiB, fmt="raw")
    vol = hsmrig.volume_of(pool, disk)
    config = pool.config(chunk_mb=16, stats_interval=0.5)
    name = guest.DOMAIN_PREFIX + uuid.uuid4().hex[:12]
    console = os.path.join(workdir, name + ".console")
    workload = guest.Workload(write_mb=4, hold=True, watch_size=True)
    xml = guest.domain_xml(name, rig, disk, workload, console, disk_format="raw")
    with running(config, libvirt_events) as r:
        g = guest.Guest(conn, name, xml, console)
        try:
            g.start()
            s = Setup(pool, disk, g, r)
            s.wait_sectors(32 * MiB, timeout=180)
            wait_for(lambda: g.dom.UUIDString() in r.hsm.monitor.vm_names(), timeout=30, what="the HSM knows the vm")
            assert s.resize("48M") == 0
            s.wait_sectors(48 * MiB)
            info = pool.domain.volume_info(vol)
            assert (info.capacity, info.size) == (48 * MiB, 48 * MiB)
            assert g.dom.blockInfo("vda")[0] == 48 * MiB
            assert s.sizes() == [32 * MiB, 48 * MiB]
        finally:
            g.remove()
