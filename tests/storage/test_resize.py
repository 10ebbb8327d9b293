"""Domain.resize_volume on real LVM (loop PVs) and a real file domain.

The refusals change nothing; a raw LV grows and its new part reads zeros
even where a removed volume left data; a qcow2 volume only gets the new
capacity, and its header catches up when it is next prepared.
"""

from __future__ import annotations

import os
import uuid

import pytest
from xtnd import lvm, storage
from xtnd.storage import constants as c
from xtnd.storage import qemuimg

MiB = 1024**2
EXTENT = 4 * MiB


@pytest.fixture
def filedomain(workdir: str) -> storage.FileDomain:
    return storage.create_file_domain(uuid.uuid4(), workdir, master=True, max_hosts=10)


def _capacity_tags(domain: storage.BlockDomain, vol: uuid.UUID) -> list[str]:
    return [t for t in lvm.lv_info(domain.runner, domain.vg, str(vol)).tags if t.startswith(c.TAG_CAPACITY)]


def test_block_raw_grows_zeroed(domain: storage.BlockDomain) -> None:
    # A removed volume leaves 0xff in the extents the raw volume will grow into.
    vol, junk = uuid.uuid4(), uuid.uuid4()
    domain.create_volume(vol, 8 * MiB, "raw")
    domain.create_volume(junk, 16 * MiB, "raw")
    path = domain.prepare_volume(junk)
    with open(path, "r+b") as f:
        f.write(b"\xff" * 16 * MiB)
    domain.teardown_volume(junk)
    domain.remove_volume(junk)
    free = domain.info().free

    assert domain.resize_volume(vol, 24 * MiB)
    info = domain.volume_info(vol)
    assert (info.capacity, info.size) == (24 * MiB, 24 * MiB)
    assert _capacity_tags(domain, vol) == [f"{c.TAG_CAPACITY}{24 * MiB}"]
    assert domain.info().free == free - 16 * MiB
    assert domain.activator.device(domain.vg, str(vol)) is None, "the temporary activation is gone"
    path = domain.prepare_volume(vol)
    try:
        with open(path, "rb") as f:
            assert f.read() == bytes(24 * MiB)
    finally:
        domain.teardown_volume(vol)


def test_block_qcow2_records_capacity_and_prepare_catches_up(domain: storage.BlockDomain) -> None:
    vol = uuid.uuid4()
    domain.create_volume(vol, 64 * MiB, initial_size=8 * MiB)
    assert domain.resize_volume(vol, 128 * MiB)
    info = domain.volume_info(vol)
    assert (info.capacity, info.size, info.max_size) == (128 * MiB, 8 * MiB, storage.max_size(128 * MiB))
    path = domain.prepare_volume(vol)
    try:
        assert qemuimg.info(path)["virtual-size"] == 128 * MiB
    finally:
        domain.teardown_volume(vol)


def test_block_refusals_change_nothing(domain: storage.BlockDomain) -> None:
    vol = uuid.uuid4()
    domain.create_volume(vol, 64 * MiB, initial_size=8 * MiB)
    free = domain.info().free
    with pytest.raises(storage.ShrinkRefused, match="shrinking it to"):
        domain.resize_volume(vol, 32 * MiB)
    with pytest.raises(storage.NoSpaceToGrow, match="needs"):
        domain.resize_volume(vol, 64 * MiB + free + EXTENT)
    with pytest.raises(storage.InvalidArgument, match="multiple of 512"):
        domain.resize_volume(vol, 64 * MiB + 1)
    assert not domain.resize_volume(vol, 64 * MiB)  # the same size: nothing to do
    assert domain.volume_info(vol).capacity == 64 * MiB
    assert _capacity_tags(domain, vol) == [f"{c.TAG_CAPACITY}{64 * MiB}"]
    assert domain.info().free == free


def test_file_raw_and_qcow2(filedomain: storage.FileDomain) -> None:
    raw, q = uuid.uuid4(), uuid.uuid4()
    filedomain.create_volume(raw, 8 * MiB, "raw")
    filedomain.create_volume(q, 8 * MiB)
    assert filedomain.resize_volume(raw, 16 * MiB)
    assert filedomain.resize_volume(q, 16 * MiB)
    path = filedomain.volume_info(raw).path
    assert path is not None
    assert os.stat(path).st_size == 16 * MiB
    assert filedomain.volume_info(raw).capacity == 16 * MiB
    qinfo = filedomain.volume_info(q)
    assert qinfo.capacity == 16 * MiB
    assert qinfo.path is not None
    assert qemuimg.info(qinfo.path)["virtual-size"] == 8 * MiB  # nobody wrote the header yet
    assert filedomain.prepare_volume(q) == qinfo.path
    assert qemuimg.info(qinfo.path)["virtual-size"] == 16 * MiB
    with pytest.raises(storage.ShrinkRefused):
        filedomain.resize_volume(raw, 8 * MiB)
    assert not filedomain.resize_volume(raw, 16 * MiB)
    with pytest.raises(storage.NoSpaceToGrow):
        filedomain.resize_volume(raw, 1 << 60)
    assert filedomain.volume_info(raw).capacity == 16 * MiB
