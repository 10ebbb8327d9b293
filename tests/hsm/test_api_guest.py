"""Growing a running guest's disk after its storage grew out of band
(xtnd.hsm.growdisk), against one real guest shared by every test here.

The guest (xtnd.tools.rig.guest, hold + watch_size) prints XTND-SIZE
sectors=N whenever /sys/block/vda/size changes, so "the guest sees it" is
read from the guest itself. Its disks, all on volume links of a real block
domain (loop-activated LVs, 4 MiB extents):

- vda: a raw volume, grown by lvextend + refresh + blockResize;
- vdb: a qcow2 thin volume, monitored by the HSM;
- hdc: a cdrom on a volume link (a disk type that cannot be grown).

One in-process HSM (hold_host_id=False: no SPM is needed here) serves it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass

import libvirt
import pytest
from xtnd.hsm import growdisk, links
from xtnd.hsm.daemon import HSM
from xtnd.hsm.libvirtconn import EventLoop
from xtnd.tools.rig import guest, hsmrig, loops
from xtnd.tools.rig.wait import wait_for

MiB = 1024**2
GiB = 1024**3

pytestmark = [pytest.mark.root, pytest.mark.timeout(240)]


@dataclass
class Setup:
    pool: hsmrig.Pool
    hsm: HSM
    guest: guest.Guest
    stopped: guest.Guest  # defined, never started
    raw: str  # volume uuids
    thin: str
    cdrom: str

    @property
    def vm(self) -> str:
        return str(self.guest.dom.UUIDString())

    def raw_extend(self, size: int) -> None:
        """What an orchestrator does: grow the LV (SPM side, metadata only)."""
        self.pool.domain.extend_volume(self.raw, size)

    def wait_guest_size(self, size: int, timeout: float = 60.0) -> None:
        wait_for(lambda: self.guest_sizes()[-1] == size, timeout=timeout, what=f"guest sees {size} bytes")

    def guest_sizes(self) -> list[int]:
        return [int(n) * 512 for n in re.findall(r"XTND-SIZE sectors=(\d+)", self.guest.console())]


def _add_disks(xml: str, thin_link: str, cdrom_link: str) -> str:
    root = ET.fromstring(xml)
    devices = root.find("devices")
    assert devices is not None
    disk = ET.SubElement(devices, "disk", type="block", device="disk")
    ET.SubElement(disk, "driver", name="qemu", type="qcow2", cache="none", io="native", error_policy="stop")
    ET.SubElement(disk, "source", dev=thin_link)
    ET.SubElement(disk, "target", dev="vdb", bus="virtio")
    cd = ET.SubElement(devices, "disk", type="file", device="cdrom")
    ET.SubElement(cd, "driver", name="qemu", type="raw")
    ET.SubElement(cd, "source", file=cdrom_link)
    ET.SubElement(cd, "target", dev="hdc", bus="ide")
    ET.SubElement(cd, "readonly")
    return ET.tostring(root, encoding="unicode")


@pytest.fixture(scope="module")
def setup(libvirtd: None, rig: guest.Rig, libvirt_events: EventLoop) -> Iterator[Setup]:
    workdir = loops.workdir("api-guest")
    conn = libvirt.open("qemu:///system")
    try:
        with hsmrig.pool(workdir) as pool, contextlib.ExitStack() as stack:
            d = pool.domain
            raw = uuid.uuid4()
            d.create_volume(raw, 16 * MiB, fmt="raw")
            raw_link = links.create(pool.uuid, raw, d.prepare_volume(raw), pool.run_dir)
            # Room after the raw LV: a loop-mapped LV grows in place only.
            gap = uuid.uuid4()
            d.create_volume(gap, 1 * GiB, initial_size=128 * MiB)
            thin_link = pool.thin_volume(initial=16 * MiB)
            d.remove_volume(gap)
            iso = os.path.join(workdir, "cdrom.iso")
            with open(iso, "wb") as f:
                f.truncate(MiB)
            cdrom, cdrom_domain = uuid.uuid4(), uuid.uuid4()
            cdrom_link = links.create(cdrom_domain, cdrom, iso, pool.run_dir)
            stack.callback(links.remove, cdrom_domain, cdrom, pool.run_dir)

            config = pool.config(chunk_mb=16)
            hsm = HSM(config, event_loop=libvirt_events, hold_host_id=False)
            hsm.start()
            stack.callback(hsm.stop)
            assert hsm.connection.wait_connected(30)

            name = guest.DOMAIN_PREFIX + "api-" + uuid.uuid4().hex[:8]
            console = os.path.join(workdir, name + ".console")
            workload = guest.Workload(write_mb=1, hold=True, watch_size=True)
            xml = guest.domain_xml(name, rig, raw_link, workload, console, disk_format="raw")
            g = guest.Guest(conn, name, _add_disks(xml, thin_link, cdrom_link), console)
            stack.callback(g.remove)
            stopped = guest.Guest(conn, name + "-off", xml.replace(name, name + "-off"), console + "-off")
            stack.callback(stopped.remove)
            g.start()
            g.wait_console("XTND-SIZE sectors=", timeout=180)
            thin = str(hsmrig.volume_of(pool, thin_link))
            yield Setup(pool, hsm, g, stopped, str(raw), thin, str(cdrom))
    finally:
        conn.close()
        shutil.rmtree(workdir, ignore_errors=True)


# The primitive (xtnd.hsm.growdisk)


def test_grow_raw_to_device(setup: Setup) -> None:
    """lvextend on the "SPM", then one call: refresh + blockResize; the guest sees it."""
    grower = setup.hsm.grower
    before = grower.device_size(setup.vm, setup.raw)
    assert setup.guest_sizes()[-1] == before
    setup.raw_extend(before + 8 * MiB)
    assert grower.device_size(setup.vm, setup.raw) == before  # not refreshed yet
    grown = grower.grow_to_device(setup.vm, setup.raw)
    assert (grown.before, grown.after, grown.device) == (before, before + 8 * MiB, before + 8 * MiB)
    assert grower.device_size(setup.vm, setup.raw) == before + 8 * MiB
    setup.wait_guest_size(before + 8 * MiB)
    # Again: nothing to do, nothing changes.
    again = grower.grow_to_device(setup.vm, setup.raw)
    assert not again.changed and again.after == before + 8 * MiB


def test_grow_qcow2_to_bytes_updates_drive(setup: Setup) -> None:
    """A qcow2 disk's virtual size grows; the monitor's drive follows."""
    grower = setup.hsm.grower
    vm = setup.vm

    def capacity() -> int:
        drives = setup.hsm.monitor.snapshot().get(vm, {})
        return drives["vdb"].capacity if "vdb" in drives else -1

    wait_for(lambda: capacity() == GiB, timeout=30)
    grown = grower.grow_to(vm, setup.thin, 2 * GiB)
    assert (grown.before, grown.after) == (GiB, 2 * GiB)
    wait_for(lambda: capacity() == 2 * GiB, timeout=30)
    drive = setup.hsm.monitor.snapshot()[vm]["vdb"]
    assert drive.state.value == "armed" and drive.threshold is not None


def test_grow_errors(setup: Setup) -> None:
    grower = setup.hsm.grower
    with pytest.raises(growdisk.NoSuchVM):
        grower.grow_to_device(str(uuid.uuid4()), setup.raw)
    with pytest.raises(growdisk.NoSuchVM):
        grower.grow_to_device("not-a-uuid", setup.raw)
    with pytest.raises(growdisk.NotRunning):
        grower.grow_to_device(setup.stopped.dom.UUIDString(), setup.raw)
    with pytest.raises(growdisk.NoSuchVolume):
        grower.grow_to_device(setup.vm, str(uuid.uuid4()))
    with pytest.raises(growdisk.UnsupportedDisk):
        grower.grow_to(setup.vm, setup.cdrom, 2 * MiB)
    size = grower.device_size(setup.vm, setup.raw)
    with pytest.raises(growdisk.StateNotAllowed, match="shrink"):
        grower.grow_to(setup.vm, setup.raw, size - MiB)
    with pytest.raises(growdisk.GrowFailed, match="blockResize"):
        grower.grow_to(setup.vm, setup.raw, size + 64 * MiB)  # raw past its device
    assert setup.guest_sizes()[-1] == size
