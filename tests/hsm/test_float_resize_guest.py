"""A floating qcow2 volume resized, then a real guest started on it.

``xtnd volume resize`` of a qcow2 volume no VM runs records the new
capacity only; the image's header is grown by ``qemu-img resize`` when the
volume is next prepared (xtnd.storage.resize.catch_up_header). Here that
chain ends in a real TCG guest (xtnd.tools.rig.guest): it must see the new
size in /sys/block/vda/size, write and read back its pattern beyond the
old capacity (the LV growing by thin extension, real HSM and SPM), and the
data written before the resize must still be there.

The resize crosses 512 MiB of virtual size, where a qcow2 image with 64
KiB clusters needs a larger L1 table: qemu-img must allocate it inside the
LV, so this is the case where growing the header writes to the volume.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator

import libvirt
import pytest
from testlib.cli import xtnd
from testlib.hsmrun import running
from xtnd.hsm import links
from xtnd.hsm.libvirtconn import EventLoop
from xtnd.tools.rig import guest, hsmrig

MiB = 1024**2

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

OLD = 64 * MiB
NEW = 768 * MiB
# The guest writes here: beyond the old capacity, inside the new one.
OFFSET_MB = 600
WRITE_MB = 6


@pytest.fixture
def pool(workdir: str, need_root: None, libvirtd: None) -> Iterator[hsmrig.Pool]:
    # 2 GiB (a sparse loop file): the resize needs the new capacity free.
    with hsmrig.pool(workdir, pv_size=2048 * MiB) as p:
        yield p


def qemu_io(path: str, command: str) -> str:
    proc = subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", command, path], capture_output=True, text=True, check=True
    )  # fmt: skip
    return proc.stdout


def virtual_size(path: str) -> int:
    out = subprocess.run(["qemu-img", "info", "--output=json", "-U", path], capture_output=True, text=True, check=True)
    return int(json.loads(out.stdout)["virtual-size"])


def test_floating_qcow2_resize_then_guest(
    pool: hsmrig.Pool, conn: libvirt.virConnect, rig: guest.Rig, libvirt_events: EventLoop, workdir: str
) -> None:
    link = pool.thin_volume(capacity=OLD, initial=16 * MiB)
    volume = hsmrig.volume_of(pool, link)
    sd = str(pool.uuid)
    # Data from the volume's earlier life, at its last old MiB.
    qemu_io(link, f"write -P 0xa5 {OLD - MiB} 1M")
    # Floating: no VM, not even active on this host.
    host_args = ["--domain", sd, "--uuid", str(volume), "--storage-config", pool.storage_config]
    assert xtnd("volume", "teardown", *host_args, "--run-dir", pool.run_dir) == 0
    assert pool.domain.activator.device(pool.domain.vg, str(volume)) is None

    assert xtnd("volume", "resize", *host_args, "--size", f"{NEW // MiB}M", "--local") == 0
    assert pool.domain.volume_info(volume).capacity == NEW
    # Nothing wrote the header yet: only the capacity is recorded.
    assert xtnd("volume", "prepare", *host_args, "--run-dir", pool.run_dir) == 0
    assert links.parse(link, pool.run_dir) == (pool.uuid, volume)
    assert virtual_size(link) == NEW
    assert "No errors were found" in subprocess.run(["qemu-img", "check", link], capture_output=True, text=True).stdout

    config = pool.config(chunk_mb=16, stats_interval=0.5)
    workload = guest.Workload(write_mb=WRITE_MB, offset_mb=OFFSET_MB, hold=True, watch_size=True)
    with hsmrig.spm(pool), running(config, libvirt_events):
        with guest.guest(conn, rig, link, workload, workdir) as g:
            g.start()
            text = g.wait_console("XTND-SIZE", timeout=180)
            text = g.wait_console("XTND-VERIFY-OK", timeout=180)
            assert f"XTND-WRITE-DONE mb={WRITE_MB}" in text
            sizes = [int(n) * 512 for n in re.findall(r"XTND-SIZE sectors=(\d+)", text)]
            assert sizes == [NEW], sizes
            assert g.dom.blockInfo("vda")[0] == NEW
            g.dom.destroy()
    # The old data survived the header's growth; the new region holds the guest's.
    assert "Pattern verification failed" not in qemu_io(link, f"read -P 0xa5 {OLD - MiB} 1M")
    out = subprocess.run(["qemu-img", "check", "--output=json", link], capture_output=True, text=True)
    assert json.loads(out.stdout).get("corruptions", 0) == 0, out.stdout
    # Thin extension carried the guest's writes (the LV started at 16 MiB).
    assert pool.domain.volume_info(volume).size > 16 * MiB
