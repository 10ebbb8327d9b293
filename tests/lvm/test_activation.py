from __future__ import annotations

import os

import pytest
from xtnd import lvm
from xtnd.lvm import loop, metadata

MiB = 1024**2


@pytest.fixture
def activator(runner: lvm.Runner) -> lvm.Activator:
    """Loop activation, forced: it runs on any kernel (production hosts with
    device-mapper can use it too, e.g. to test it)."""
    return lvm.make_activator(runner, "loop")


def test_auto_chooses_by_kernel(runner: lvm.Runner) -> None:
    expected = lvm.DeviceMapperActivator if lvm.device_mapper_available() else lvm.LoopActivator
    assert isinstance(lvm.make_activator(runner), expected)


@pytest.fixture
def dm_activator(runner: lvm.Runner) -> lvm.Activator:
    if not lvm.device_mapper_available():
        pytest.skip("device-mapper activation needs a kernel with device-mapper (this one has none)")
    return lvm.make_activator(runner, "dm")


def test_dm_activate_refresh_deactivate(runner: lvm.Runner, vg: str, dm_activator: lvm.Activator) -> None:
    lvm.lvcreate(runner, vg, "a", 8 * MiB)
    dev = dm_activator.activate(vg, "a")
    assert dm_activator.is_active(vg, "a") and os.path.exists(dev)
    with open(dev, "rb") as f:
        assert f.seek(0, os.SEEK_END) == 8 * MiB
    lvm.lvextend(runner, vg, "a", 16 * MiB)
    assert dm_activator.refresh(vg, "a") == 16 * MiB
    dm_activator.deactivate(vg, "a")
    assert not dm_activator.is_active(vg, "a")


def test_activate_maps_lv_bytes(runner: lvm.Runner, vg: str, pvs: list[str], activator: lvm.Activator) -> None:
    lvm.lvcreate(runner, vg, "a", 4 * MiB)
    lvm.lvcreate(runner, vg, "b", 8 * MiB)
    assert not activator.is_active(vg, "b")
    dev = activator.activate(vg, "b")
    assert activator.is_active(vg, "b")
    assert activator.device(vg, "b") == dev
    assert activator.activate(vg, "b") == dev, "activation must be idempotent"
    assert activator.active_devices(vg) == {"b": dev}
    assert loop.size(dev) == 8 * MiB
    fd = os.open(dev, os.O_WRONLY)
    try:
        os.pwrite(fd, b"xtnd" * 128, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    # b starts after a's single extent: pe_start + 1 extent into the PV.
    pe_start = lvm.vg_info(runner, vg).pvs[0].pe_start
    with open(pvs[0], "rb") as f:
        f.seek(pe_start + 4 * MiB)
        data = f.read(512)
    assert data == b"xtnd" * 128
    activator.deactivate(vg, "b")
    assert not activator.is_active(vg, "b")
    activator.deactivate(vg, "b")  # nothing mapped: no error


def test_refresh_grows_open_device(runner: lvm.Runner, vg: str, activator: lvm.Activator) -> None:
    lvm.lvcreate(runner, vg, "a", 8 * MiB)
    dev = activator.activate(vg, "a")
    try:
        fd = os.open(dev, os.O_RDWR)  # held open, as QEMU holds its disk
        try:
            assert lvm.extend(runner, vg, "a", 20 * MiB) == 20 * MiB
            assert loop.size(dev) == 8 * MiB, "extend changes metadata only"
            assert activator.refresh(vg, "a") == 20 * MiB
            assert os.lseek(fd, 0, os.SEEK_END) == 20 * MiB
            os.pwrite(fd, b"end!", 20 * MiB - 4)
        finally:
            os.close(fd)
        assert activator.activate(vg, "a") == dev
    finally:
        activator.deactivate(vg, "a")


def test_refresh_reads_the_metadata_area(runner: lvm.Runner, vg: str) -> None:
    """A refresh reads the new size from the PV (two O_DIRECT reads), not
    through LVM; when that cannot be read it asks LVM, whose errors stand."""
    activator = lvm.LoopActivator(runner)
    lvm.lvcreate(runner, vg, "a", 4 * MiB)
    dev = activator.activate(vg, "a")
    try:
        lvm.extend(runner, vg, "a", 8 * MiB)
        before = runner.history.counts()
        seen: list[tuple[int, int]] = []  # (size on storage, device size) when told

        def verified(size: int) -> None:
            seen.append((size, loop.size(dev)))

        assert activator.refresh(vg, "a", verified) == 8 * MiB
        assert seen == [(8 * MiB, 4 * MiB)], "told before the device grew"
        assert runner.history.counts() == before, "no LVM command"
        assert activator.metadata.counters.lookups == 1 and activator.fallbacks == 0
        assert loop.size(dev) == 8 * MiB
        # Nothing readable (no device to read from): lvs answers.
        activator.metadata = metadata.Reader([])
        lvm.extend(runner, vg, "a", 12 * MiB)
        lvs = runner.history.counts()["lvs"]
        assert activator.refresh(vg, "a") == 12 * MiB
        assert runner.history.counts()["lvs"] == lvs + 1
        assert activator.fallbacks == 1
    finally:
        activator.deactivate(vg, "a")
    activator.metadata = metadata.Reader(runner.devices)
    with pytest.raises(lvm.LVNotFound):
        activator.refresh(vg, "gone")


def test_refresh_after_the_device_changed(runner: lvm.Runner, vg: str, activator: lvm.Activator) -> None:
    """refresh remembers the device it found; a detached or replaced one is
    noticed (one ioctl) and the mapping looked up again."""
    lvm.lvcreate(runner, vg, "a", 4 * MiB)
    first = activator.activate(vg, "a")
    try:
        lvm.extend(runner, vg, "a", 8 * MiB)
        assert activator.refresh(vg, "a") == 8 * MiB
        (offset,) = [d.offset for d in loop.devices() if d.path == first]
        assert loop.still(first, runner.devices[0], offset)
        assert not loop.still(first, runner.devices[0], offset + 4096)
        activator.deactivate(vg, "a")
        assert not loop.still(first, runner.devices[0], offset)
        with pytest.raises(lvm.ActivationError):
            activator.refresh(vg, "a")
        second = activator.activate(vg, "a")
        lvm.extend(runner, vg, "a", 12 * MiB)
        assert activator.refresh(vg, "a") == 12 * MiB
        assert loop.size(second) == 12 * MiB
    finally:
        activator.deactivate(vg, "a")


def test_refresh_inactive(runner: lvm.Runner, vg: str, activator: lvm.Activator) -> None:
    lvm.lvcreate(runner, vg, "a", 4 * MiB)
    with pytest.raises(lvm.ActivationError):
        activator.refresh(vg, "a")


def test_multi_segment(runner: lvm.Runner, vg: str, activator: lvm.Activator) -> None:
    lvm.lvcreate(runner, vg, "a", 4 * MiB)
    lvm.lvcreate(runner, vg, "b", 4 * MiB)
    lvm.extend(runner, vg, "a", 8 * MiB)
    assert lvm.lv_info(runner, vg, "a").seg_count == 2
    with pytest.raises(lvm.MultiSegmentLV) as e:
        activator.activate(vg, "a")
    assert e.value.segments == 2
    assert "2 segments" in str(e.value)


def test_multi_segment_refresh(runner: lvm.Runner, vg: str, activator: lvm.Activator) -> None:
    lvm.lvcreate(runner, vg, "a", 4 * MiB)
    activator.activate(vg, "a")
    try:
        lvm.lvcreate(runner, vg, "b", 4 * MiB)
        lvm.extend(runner, vg, "a", 8 * MiB)
        with pytest.raises(lvm.MultiSegmentLV):
            activator.refresh(vg, "a")
    finally:
        activator.deactivate(vg, "a")
