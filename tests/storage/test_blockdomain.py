from __future__ import annotations

import logging
import os
import shlex
import uuid

import pytest
from xtnd import lvm, storage
from xtnd.common import cmd
from xtnd.mailbox.directio import DirectFile
from xtnd.storage import blockdomain, qemuimg, sanlockdirect
from xtnd.storage import constants as c
from xtnd.tools.rig import loops

MiB = 1024**2
EXTENT = 4 * MiB
CHUNK = 16 * MiB


def test_create_two_pvs_progress(pvs: list[str]) -> None:
    lines: list[str] = []
    sd = uuid.uuid4()
    domain = storage.create_block_domain(
        sd, pvs, master=False, extent_size=EXTENT, progress=lines.append, activation="loop"
    )
    assert any("sanlock lockspace" in line for line in lines)
    assert lines[-1] == f"domain {sd} created"
    info = domain.info()
    assert info.kind == "block"
    assert not info.master
    assert info.max_hosts == c.DEFAULT_MAX_HOSTS
    assert sorted(info.pvs) == sorted(pvs)
    assert info.extent_size == EXTENT
    special = sum(c.SPECIAL_SIZES.values())
    assert info.size - info.free == special
    assert info.free == info.free_extents * EXTENT
    assert info.volumes == ()
    assert set(info.special) == set(c.SPECIAL_NAMES)
    assert all(path is None for path in info.special.values()), "create leaves nothing active"


def test_create_exists(domain: storage.BlockDomain, pvs: list[str]) -> None:
    with pytest.raises(storage.DomainExists):
        storage.create_block_domain(domain.uuid, pvs[:1], extent_size=EXTENT, activation="loop")


def test_open(domain: storage.BlockDomain, pvs: list[str]) -> None:
    opened = storage.open_domain(domain.uuid, pvs=pvs[:1], activation="loop")
    info = opened.info()
    assert info.master
    assert info.max_hosts == 10
    assert info.spm_lease_offset == MiB
    with pytest.raises(storage.DomainNotFound):
        storage.open_domain(uuid.uuid4(), pvs=pvs[:1], activation="loop")


def test_sanlock_areas(domain: storage.BlockDomain) -> None:
    try:
        ls = domain.lockspace()
        assert ls.name == str(domain.uuid)
        assert ls.offset == 0
        leader = sanlockdirect.read_lockspace_leader(ls.name, ls.path, ls.offset)
        assert leader["magic"] == "0x12212010"  # delta lease
        assert leader["space_name"] == str(domain.uuid)
        lease = domain.spm_lease()
        assert (lease.lockspace, lease.resource, lease.offset) == (str(domain.uuid), "SDM", MiB)
        rows = sanlockdirect.dump(lease.path, lease.offset).splitlines()
        assert rows[1].split()[:3] == [f"{MiB:08d}", str(domain.uuid), "SDM"]
    finally:
        domain.deactivate_special()


def test_io_timeout(pvs: list[str]) -> None:
    lines: list[str] = []
    domain = storage.create_block_domain(
        uuid.uuid4(), pvs[:1], master=True, extent_size=EXTENT, io_timeout=3, progress=lines.append, activation="loop"
    )
    assert any("io_timeout 3 s" in line for line in lines)
    info = domain.info()
    assert info.io_timeout == 3
    assert all(path is None for path in info.special.values()), "read through the PV, nothing activated"
    try:
        ls = domain.lockspace()
        assert sanlockdirect.read_lockspace_leader(ls.name, ls.path, ls.offset)["io_timeout"] == "3"
    finally:
        domain.deactivate_special()


def test_default_io_timeout(domain: storage.BlockDomain) -> None:
    assert domain.info().io_timeout == c.DEFAULT_IO_TIMEOUT


def test_bad_io_timeout_touches_nothing(pvs: list[str]) -> None:
    sd = uuid.uuid4()
    with pytest.raises(storage.InvalidArgument, match="io_timeout"):
        storage.create_block_domain(sd, pvs[:1], extent_size=EXTENT, io_timeout=0, activation="loop")
    assert str(sd) not in lvm.vgs(lvm.Runner(pvs[:1]))


def test_spm_lease_leader(domain: storage.BlockDomain, pvs: list[str]) -> None:
    leader = domain.spm_lease_leader()
    assert leader is not None
    assert (leader.lockspace, leader.resource, leader.owner_id, leader.held) == (str(domain.uuid), "SDM", 0, False)
    assert domain.info().special[c.LEASES] is None, "read through the PV, nothing activated"
    other = storage.create_block_domain(uuid.uuid4(), pvs[1:], master=False, extent_size=EXTENT, activation="loop")
    assert other.spm_lease_leader() is None, "not a master domain"


def _lv(*segments: lvm.Segment) -> lvm.LVInfo:
    size = sum(s.extents for s in segments) * EXTENT
    return lvm.LVInfo("vg", "leases", size, (), EXTENT, segments)


VG = lvm.VGInfo("vg", "x", EXTENT, 100, 0, (), (lvm.PVInfo("/dev/a", MiB), lvm.PVInfo("/dev/b", 2 * MiB)))


def test_pv_location() -> None:
    lv = _lv(lvm.Segment("/dev/a", 10, 1, 0), lvm.Segment("/dev/b", 3, 2, 1))
    assert blockdomain.pv_location(lv, VG, MiB, MiB) == ("/dev/a", MiB + 10 * EXTENT + MiB)
    # The second segment starts at logical extent 1, physical extent 3 of /dev/b.
    assert blockdomain.pv_location(lv, VG, EXTENT + MiB, MiB) == ("/dev/b", 2 * MiB + 3 * EXTENT + MiB)
    with pytest.raises(storage.StorageError, match="one linear segment"):
        blockdomain.pv_location(lv, VG, EXTENT - MiB, 2 * MiB)  # straddles the two
    striped = _lv(lvm.Segment("/dev/a:0 /dev/b:0", -1, 2, 0))
    with pytest.raises(storage.StorageError, match="one linear segment"):
        blockdomain.pv_location(striped, VG, 0, 512)


def test_mailbox_zeroed(domain: storage.BlockDomain) -> None:
    try:
        mb = domain.mailbox()
        assert mb.max_hosts == 10
        assert domain.mailbox() == mb, "activation is idempotent"
        for path in (mb.inbox, mb.outbox):
            with DirectFile(path, readonly=True) as f:
                assert f.size == 16 * MiB
                assert f.read(0, 11 * 4096) == bytes(11 * 4096)
        info = domain.info()
        assert info.special[c.INBOX] == mb.inbox
    finally:
        domain.deactivate_special()
    assert domain.info().special[c.INBOX] is None


def test_qcow2_volume(domain: storage.BlockDomain) -> None:
    vol = uuid.uuid4()
    img = uuid.uuid4()
    info = domain.create_volume(vol, 1024 * MiB, "qcow2", initial_size=CHUNK, image=img)
    assert (info.uuid, info.format, info.capacity, info.size, info.image) == (vol, "qcow2", 1024 * MiB, CHUNK, img)
    assert info.max_size == 1127 * MiB
    assert info.path is None
    assert domain.list_volumes() == [info]
    assert domain.info().volumes == (vol,)
    path = domain.prepare_volume(vol)
    try:
        image = qemuimg.info(path)
        assert image["format"] == "qcow2"
        assert image["virtual-size"] == 1024 * MiB
        assert domain.extend_volume(vol, 2 * CHUNK) == 2 * CHUNK
        assert domain.refresh_volume(vol) == 2 * CHUNK
        assert domain.volume_info(vol).path == path
    finally:
        domain.teardown_volume(vol)


def test_qcow2_initial_size_capped_by_max_size(domain: storage.BlockDomain) -> None:
    info = domain.create_volume(uuid.uuid4(), 8 * MiB, initial_size=CHUNK)
    assert info.size == 12 * MiB  # max_size 9 MiB, rounded up to extents


def test_raw_volume(domain: storage.BlockDomain) -> None:
    info = domain.create_volume(uuid.uuid4(), 10 * MiB, "raw")
    assert (info.format, info.capacity, info.size) == ("raw", 10 * MiB, 12 * MiB)


def test_remove_volume(domain: storage.BlockDomain) -> None:
    a = domain.create_volume(uuid.uuid4(), 8 * MiB, "raw")
    b = domain.create_volume(uuid.uuid4(), 8 * MiB, "raw")
    domain.prepare_volume(a.uuid)
    domain.remove_volume(a.uuid)
    assert [v.uuid for v in domain.list_volumes()] == [b.uuid]
    with pytest.raises(storage.VolumeNotFound):
        domain.volume_info(a.uuid)
    with pytest.raises(storage.VolumeNotFound):
        domain.remove_volume(a.uuid)


def test_special_lvs_are_not_volumes(domain: storage.BlockDomain) -> None:
    with pytest.raises(storage.InvalidArgument):
        domain.volume_info("ids")
    with pytest.raises(storage.VolumeExists):
        vol = uuid.uuid4()
        domain.create_volume(vol, 8 * MiB, "raw")
        domain.create_volume(vol, 8 * MiB, "raw")


def test_extend_errors(domain: storage.BlockDomain) -> None:
    with pytest.raises(storage.VolumeNotFound):
        domain.extend_volume(uuid.uuid4(), 8 * MiB)
    vol = domain.create_volume(uuid.uuid4(), 8 * MiB, "raw")
    free = domain.info().free
    with pytest.raises(lvm.NotEnoughFreeExtents):
        domain.extend_volume(vol.uuid, vol.size + free + EXTENT)
    assert domain.volume_info(vol.uuid).size == vol.size


def test_failed_create_removes_vg(pvs: list[str]) -> None:
    # Too many hosts for a mailbox of 16 MiB is impossible; use an
    # impossible extent size instead to fail half way (special LVs).
    sd = uuid.uuid4()
    with pytest.raises(lvm.LVMError):
        storage.create_block_domain(sd, pvs[:1], extent_size=256 * MiB, activation="loop")
    assert str(sd) not in lvm.vgs(lvm.Runner(pvs[:1]))
    assert not os.path.exists(f"/dev/{sd}")


class Lost(Exception):
    pass


class StepFence:
    """A fence that lets `passes` calls through and then fails on every call,
    as a lost lease does; records how many LVM commands had run at each call."""

    def __init__(self, runner: lvm.Runner, passes: int = 1000):
        # A history long enough to hold every command of the test.
        runner.history = lvm.CommandHistory(size=1000)
        self.runner = runner
        self.passes = passes
        self.marks: list[int] = []

    def __call__(self) -> None:
        self.marks.append(len(self.runner.history.records()))
        if len(self.marks) > self.passes:
            raise Lost()

    def commands(self) -> list[str]:
        return [r.argv[1] for r in self.runner.history.records()]


def test_fence_before_every_write(domain: storage.BlockDomain) -> None:
    fence = StepFence(domain.runner)
    vol = uuid.uuid4()
    domain.create_volume(vol, 100 * MiB, "qcow2", initial_size=CHUNK, fence=fence)
    # lvcreate, activation, qcow2 header, deactivation (loop activation runs
    # no LVM write, so only lvcreate shows in the LVM history).
    assert len(fence.marks) == 4
    writes = [cmd for cmd in fence.commands() if cmd not in ("lvs", "vgs")]
    assert writes == ["lvcreate"]
    created = len(fence.commands())
    domain.remove_volume(vol, fence=fence)
    # deactivation, lvremove
    assert len(fence.marks) == 6
    assert fence.marks[5] < len(fence.commands()) and fence.commands()[-1] == "lvremove"
    assert fence.marks[4] >= created


@pytest.mark.parametrize("passes", [0, 1, 2, 3])
def test_create_stops_at_lost_fence(domain: storage.BlockDomain, passes: int) -> None:
    """Whichever step finds the lease lost, nothing is written after it,
    not even the lvremove that would clean up a half-made volume."""
    fence = StepFence(domain.runner, passes)
    vol = uuid.uuid4()
    with pytest.raises(Lost):
        domain.create_volume(vol, 100 * MiB, "qcow2", initial_size=CHUNK, fence=fence)
    lost_at = fence.marks[passes]
    assert len(fence.commands()) == lost_at, f"LVM ran after the loss: {fence.commands()[lost_at:]}"
    names = {lv.name for lv in lvm.lvs(domain.runner, domain.vg)}
    assert (str(vol) in names) == (passes >= 1)
    if passes == 2:
        # Activated, but the header was not written.
        device = domain.activator.device(domain.vg, str(vol))
        assert device is not None
        with open(device, "rb") as f:
            assert f.read(4) != b"QFI\xfb"
    if passes >= 1:
        domain.activator.deactivate(domain.vg, str(vol))


def test_remove_stops_at_lost_fence(domain: storage.BlockDomain) -> None:
    vol = uuid.uuid4()
    domain.create_volume(vol, 100 * MiB, "qcow2", initial_size=CHUNK)
    fence = StepFence(domain.runner, passes=1)
    with pytest.raises(Lost):
        domain.remove_volume(vol, fence=fence)
    assert len(fence.commands()) == fence.marks[1]
    assert "lvremove" not in fence.commands()
    assert domain.volume_info(vol).uuid == vol


def test_metadata_areas_and_no_autoactivation(pvs: list[str]) -> None:
    domain = storage.create_block_domain(uuid.uuid4(), pvs, extent_size=EXTENT, activation="loop")
    vg = lvm.vg_info(domain.runner, domain.vg)
    # No host maps the shared LVs at boot or when the PVs show up.
    assert not vg.autoactivation
    # vdsm's metadata areas: 128 MiB, two per PV.
    assert vg.mda_size >= c.METADATA_SIZE
    assert vg.mda_count == 2 * len(pvs)


def test_raw_volume_never_shows_old_data(domain: storage.BlockDomain) -> None:
    """A pattern written to a volume, the volume removed, a raw volume made on
    the same extents: it reads zeros."""
    size = 32 * MiB
    pattern = b"xtnd-old-data!\n\x00" * 256  # 4 KiB
    old = uuid.uuid4()
    domain.create_volume(old, size, "raw")
    old_segments = lvm.lv_info(domain.runner, domain.vg, str(old)).segments
    with DirectFile(domain.prepare_volume(old)) as f:
        for offset in range(0, size, 4 * MiB):
            f.write(offset, pattern * 1024)
    domain.teardown_volume(old)
    domain.remove_volume(old)
    new = uuid.uuid4()
    domain.create_volume(new, size, "raw")
    assert lvm.lv_info(domain.runner, domain.vg, str(new)).segments == old_segments, "not the same extents"
    try:
        with DirectFile(domain.prepare_volume(new), readonly=True) as f:
            assert f.size == size
            for offset in range(0, size, 4 * MiB):
                assert f.read(offset, 4 * MiB) == bytes(4 * MiB), f"old data at offset {offset}"
    finally:
        domain.teardown_volume(new)


def test_raw_zeroing_fenced(domain: storage.BlockDomain) -> None:
    fence = StepFence(domain.runner)
    domain.create_volume(uuid.uuid4(), 16 * MiB, "raw", fence=fence)
    # lvcreate, activation, one zeroing chunk, deactivation.
    assert len(fence.marks) == 4


def _lvcreate_batch(runner: lvm.Runner, vg: str, names: list[str], tags: tuple[str, ...]) -> None:
    """Many lvcreates through one `lvm` shell reading commands on stdin:
    the soak test needs thousands, one process each would take an hour."""
    lines = []
    for name in names:
        args = ["--autobackup", "n", "--name", name, "--size", "1m", "--activate", "n", "--zero", "n"]
        for tag in tags:
            args += ["--addtag", tag]
        lines.append(" ".join(shlex.quote(a) for a in runner.argv("lvcreate", *args, vg)[1:]))
    cmd.run([lvm.runner.LVM], input=("\n".join(lines) + "\n").encode(), timeout=3600)


@pytest.mark.soak
@pytest.mark.timeout(3600)
def test_metadata_beyond_old_default(workdir: str, loop_mode: None) -> None:
    """More volumes than LVM's old 1 MiB metadata area can describe: the
    domain keeps working (create, extend, remove, activate)."""
    pv = loops.losetup(loops.make_file(os.path.join(workdir, "bigpv"), 8 * 1024**3))
    try:
        domain = storage.create_block_domain(uuid.uuid4(), [pv], extent_size=MiB, activation="loop")
        tags = (c.TAG_VOLUME, f"{c.TAG_CAPACITY}{100 * MiB}", f"{c.TAG_FORMAT}qcow2")
        created = 0
        # LVM reports free metadata space, not the text size: count growth.
        empty = lvm.vg_info(domain.runner, domain.vg).mda_free
        while True:
            used = empty - lvm.vg_info(domain.runner, domain.vg).mda_free
            if used > 1 * MiB:
                break
            names = [str(uuid.uuid4()) for _ in range(250)]
            _lvcreate_batch(domain.runner, domain.vg, names, tags)
            created += len(names)
        logging.getLogger("xtnd.tests").info("volumes=%d metadata_used=%d", created, used)
        vol = uuid.uuid4()
        domain.create_volume(vol, 100 * MiB, "qcow2", initial_size=4 * MiB)
        assert domain.extend_volume(vol, 8 * MiB) == 8 * MiB
        assert domain.volume_info(vol).size == 8 * MiB
        assert len(domain.list_volumes()) == created + 1
        domain.remove_volume(vol)
        domain.deactivate_special()
        lvm.vgremove(domain.runner, domain.vg)
    finally:
        loops.detach(pv)
