"""The FUSE fault layer of ``xtnd inject`` (scenarios 12, 13): real FUSE
mount, real loop device with direct I/O over it, real O_DIRECT I/O."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from xtnd.mailbox.directio import DirectFile, StorageError
from xtnd.tools.inject.fusefile import FaultFile, Faults, unmount_under
from xtnd.tools.rig import loops

BLOCK = 4096


@pytest.fixture
def layer(tmp_path: str) -> Iterator[tuple[FaultFile, DirectFile, str]]:
    backing = os.path.join(str(tmp_path), "backing")
    with open(backing, "wb") as f:
        f.truncate(16 * 1024 * 1024)
    fs = FaultFile(backing, os.path.join(str(tmp_path), "mnt"), os.path.join(str(tmp_path), "fuse.log"))
    device = loops.attach_loop(fs.disk)
    disk = DirectFile(device)
    try:
        yield fs, disk, backing
    finally:
        disk.close()
        loops.detach(device)
        fs.close()
    assert not os.path.ismount(fs.mountpoint)


def test_every_direct_io_reaches_the_layer(layer: tuple[FaultFile, DirectFile, str]) -> None:
    fs, disk, _ = layer
    with open(f"/sys/block/{os.path.basename(disk.path)}/loop/dio") as f:
        assert f.read().strip() == "1"
    before = fs.stats()["totals"]
    for i in range(20):
        disk.write(i * BLOCK, b"a" * BLOCK)
        disk.read(i * BLOCK, BLOCK)
        disk.read(i * BLOCK, BLOCK)  # again: a cache would answer this one
    after = fs.stats()["totals"]
    assert after["writes"] - before["writes"] == 20
    assert after["reads"] - before["reads"] == 40


def test_delay_eio_and_torn_writes_by_range(layer: tuple[FaultFile, DirectFile, str]) -> None:
    fs, disk, backing = layer
    disk.write(8 * BLOCK, b"o" * BLOCK)
    fs.set([{"op": "read", "start": 0, "end": 2 * BLOCK, "eio": 1, "count": 2},
            {"op": "write", "start": 4 * BLOCK, "end": 5 * BLOCK, "delay": 0.3},
            {"op": "write", "start": 8 * BLOCK, "end": 9 * BLOCK, "torn": BLOCK // 2, "count": 1}])
    for _ in range(2):
        with pytest.raises(StorageError, match="Input/output error"):
            disk.read(0, BLOCK)
    disk.read(0, BLOCK)  # the budget of 2 is spent
    disk.read(2 * BLOCK, BLOCK)  # outside the range
    began = time.monotonic()
    disk.write(4 * BLOCK, b"d" * BLOCK)
    assert time.monotonic() - began >= 0.3
    disk.write(8 * BLOCK, b"n" * BLOCK)  # torn: half new, half old
    with open(backing, "rb") as f:
        f.seek(8 * BLOCK)
        assert f.read(BLOCK) == b"n" * (BLOCK // 2) + b"o" * (BLOCK // 2)
    eio, delay, torn = fs.stats()["rules"]
    assert (eio["reads"], eio["eios"], delay["delayed"], torn["torns"]) == (3, 2, 1, 1)
    fs.set([])
    disk.read(0, BLOCK)


def test_bad_control_write_is_refused(layer: tuple[FaultFile, DirectFile, str]) -> None:
    fs, _, _ = layer
    with pytest.raises(OSError):
        with open(fs.ctl, "w") as f:
            f.write('{"rules": [{"op": "erase"}]}')
    assert fs.proc.poll() is None


def test_faults_decide_is_seeded() -> None:
    runs = []
    for _ in range(2):
        faults = Faults()
        faults.set({"rules": [{"op": "any", "eio": 0.5}], "seed": 7})
        runs.append([faults.decide("read", 0, BLOCK)[1] for _ in range(50)])
    assert runs[0] == runs[1] and any(runs[0]) and not all(runs[0])


def test_missing_layer_is_one_typed_line(tmp_path: str) -> None:
    res = subprocess.run([sys.executable, "-m", "xtnd.tools.inject.fusefile", str(tmp_path), "/nonexistent"],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 1
    assert res.stderr.startswith("fusefile: ") and "Traceback" not in res.stderr


def test_layer_of_a_dead_harness_is_unmounted(tmp_path: str) -> None:
    backing = os.path.join(str(tmp_path), "backing")
    with open(backing, "wb") as f:
        f.truncate(1024 * 1024)
    fs = FaultFile(backing, os.path.join(str(tmp_path), "trial", "mnt"), os.path.join(str(tmp_path), "fuse.log"))
    try:
        assert unmount_under(str(tmp_path)) == [fs.mountpoint]
        assert fs.proc.wait(timeout=10) == 0
        assert not os.path.ismount(fs.mountpoint)
    finally:
        fs.close()
