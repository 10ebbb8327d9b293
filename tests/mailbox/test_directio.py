"""Direct I/O on real files and loop devices with 512 and 4096-byte sectors."""

from __future__ import annotations

import os

import pytest
from xtnd.mailbox import directio
from xtnd.tools.rig import loops

SIZE = 1024 * 1024


def _roundtrip(f: directio.Storage) -> None:
    data = os.urandom(4096)
    f.write(8192, data)
    assert f.read(8192, 4096) == data
    assert f.read(0, 4096) == bytes(4096)
    big = os.urandom(65536)
    f.write(65536, big)
    assert f.read(65536, 65536) == big
    assert f.counters.writes == 2
    assert f.counters.reads == 3


def test_file(workdir: str) -> None:
    path = loops.make_file(os.path.join(workdir, "area"), SIZE)
    with directio.DirectFile(path) as f:
        assert not f.is_block_device
        assert f.size == SIZE
        _roundtrip(f)


@pytest.mark.parametrize("sector_size", [512, 4096])
def test_loop_device(workdir: str, need_root: None, sector_size: int) -> None:
    path = loops.make_file(os.path.join(workdir, "area"), SIZE)
    with loops.loop_device(path, sector_size) as dev, directio.DirectFile(dev) as f:
        assert f.is_block_device
        assert f.sector_size == sector_size
        assert f.size == SIZE
        _roundtrip(f)


def test_memory_twin() -> None:
    _roundtrip(directio.MemoryStorage(SIZE))


@pytest.mark.parametrize("offset,length", [(1, 4096), (0, 100), (512, 4096), (0, 0)])
def test_unaligned_rejected(workdir: str, offset: int, length: int) -> None:
    path = loops.make_file(os.path.join(workdir, "area"), SIZE)
    with directio.DirectFile(path) as f:
        with pytest.raises(ValueError):
            f.read(offset, length)
        with pytest.raises(ValueError):
            f.write(offset, bytes(length))


def test_short_read_is_error(workdir: str) -> None:
    path = loops.make_file(os.path.join(workdir, "area"), 8192)
    with directio.DirectFile(path) as f, pytest.raises(directio.StorageError):
        f.read(4096, 8192)


def test_readonly(workdir: str) -> None:
    path = loops.make_file(os.path.join(workdir, "area"), SIZE)
    with directio.DirectFile(path, readonly=True) as f:
        f.read(0, 4096)
        with pytest.raises(directio.StorageError):
            f.write(0, bytes(4096))


def test_missing_file(workdir: str) -> None:
    with pytest.raises(directio.StorageError):
        directio.DirectFile(os.path.join(workdir, "missing"))


def test_memory_fault_injection() -> None:
    m = directio.MemoryStorage(SIZE)

    def fail(op: str, offset: int, length: int) -> None:
        raise directio.StorageError(5, f"injected {op}")

    m.fault = fail
    with pytest.raises(directio.StorageError, match="injected read"):
        m.read(0, 4096)
