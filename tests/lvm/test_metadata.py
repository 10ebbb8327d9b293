"""Reading an LV's size and segments from the PV's metadata area, checked
against real LVM's own report of the same LV (xtnd.lvm.metadata)."""

from __future__ import annotations

import os
import struct
import threading
import uuid

import pytest
from xtnd import lvm
from xtnd.lvm import metadata
from xtnd.tools.rig import loops

MiB = 1024**2
EXTENT = 4 * MiB


@pytest.fixture
def rw(pvs: list[str], shell: lvm.LvmShell) -> lvm.Runner:
    return lvm.Runner(pvs, shell=shell)


def new_vg(rw: lvm.Runner, devices: list[str], small: bool = False) -> str:
    """small: a 60 KiB metadata area (LVM pads a smaller one up to the data
    alignment, 1 MiB by default), which a few dozen commits go round."""
    name = f"xtnd-mda-{uuid.uuid4().hex[:8]}"
    if small:
        rw.run("pvcreate", "--yes", "--metadatasize", "40k", "--dataalignment", "64k", *devices)
    else:
        lvm.pvcreate(rw, *devices)
    lvm.vgcreate(rw, name, devices, EXTENT)
    return name


def same(reader: metadata.Reader, rw: lvm.Runner, vg: str, lv: str) -> lvm.LVInfo:
    info = reader.lv_info(vg, lv)
    assert info == lvm.lv_info(rw, vg, lv)
    return info


def test_lv_as_lvs_reports_it(rw: lvm.Runner, pvs: list[str]) -> None:
    vg = new_vg(rw, pvs[:1])
    lvm.lvcreate(rw, vg, "first", EXTENT, tags=("xtnd.volume", "xtnd.cap_8"))
    lvm.lvcreate(rw, vg, "second", 2 * EXTENT)
    reader = metadata.Reader(pvs)
    info = same(reader, rw, vg, "first")
    assert info.size == EXTENT and info.tags == ("xtnd.cap_8", "xtnd.volume")
    # Fragmented: "first" grows after "second" took the extents behind it.
    lvm.lvextend(rw, vg, "first", 3 * EXTENT)
    info = same(reader, rw, vg, "first")
    assert info.seg_count == 2 and info.size == 3 * EXTENT
    same(reader, rw, vg, "second")
    # A segment on the second PV, added to the VG after the labels were read.
    lvm.pvcreate(rw, pvs[1])
    lvm.vgextend(rw, vg, pvs[1])
    rw.run("lvextend", "--autobackup", "n", "--size", f"{4 * EXTENT}b", f"{vg}/second", pvs[1])
    info = same(reader, rw, vg, "second")
    assert {s.pv for s in info.segments} == set(pvs)
    # Each lookup: two reads (header, text), plus labels when a PV is new.
    assert reader.counters.lookups == 4
    with pytest.raises(metadata.Unavailable):
        reader.lv_info(vg, "missing")
    with pytest.raises(metadata.Unavailable):
        reader.lv_info("no-such-vg", "first")


def mda_state(pv: str) -> tuple[int, int, int]:
    """(area size, text offset, text size) of the committed text on pv."""
    label = metadata.parse_label(metadata.read_direct(pv, 0, 2048))
    offset = label.mdas[0][0]
    size, text_offset, text_size, _ = metadata.parse_mda_header(metadata.read_direct(pv, offset, 512), offset)
    return size, text_offset, text_size


def test_wrapped_circular_buffer(rw: lvm.Runner, pvs: list[str]) -> None:
    """A small metadata area: the text soon runs past its end and continues
    after the header; every state reads the same as lvs."""
    vg = new_vg(rw, pvs[:1], small=True)
    for i in range(8):  # a longer text, so that it wraps sooner
        lvm.lvcreate(rw, vg, f"lv{i}", EXTENT, tags=(f"padding-tag-{'x' * 40}-{i}",))
    reader = metadata.Reader(pvs)
    wrapped = 0
    size = EXTENT
    for _ in range(80):
        size += EXTENT
        lvm.lvextend(rw, vg, "lv7", size)
        area, offset, length = mda_state(pvs[0])
        wrapped += offset + length > area
        assert same(reader, rw, vg, "lv7").size == size
        if wrapped:
            break
    assert wrapped, "the metadata text never wrapped"


def test_concurrent_change(rw: lvm.Runner, pvs: list[str]) -> None:
    """Another process extends a neighbour while this one reads: every read
    is a committed state (a torn one fails its CRC and is read again)."""
    vg = new_vg(rw, pvs[:1], small=True)
    lvm.lvcreate(rw, vg, "ours", 2 * EXTENT)
    lvm.lvcreate(rw, vg, "theirs", EXTENT)
    other = lvm.Runner(pvs)  # one process per command, as another host's SPM
    reader = metadata.Reader(pvs)
    stop = threading.Event()
    extended: list[int] = []

    def writer() -> None:
        size = EXTENT
        while not stop.is_set() and size < 40 * EXTENT:
            size += EXTENT
            lvm.lvextend(other, vg, "theirs", size)
            extended.append(size)

    thread = threading.Thread(target=writer, name="test-mda-writer")
    thread.start()
    seen = []
    try:
        while thread.is_alive() and len(seen) < 2000:
            assert reader.lv_info(vg, "ours").size == 2 * EXTENT
            seen.append(reader.lv_info(vg, "theirs").size)
    finally:
        stop.set()
        thread.join()
    assert len(extended) >= 3
    assert seen == sorted(seen), "a read went back to older metadata"
    assert reader.lv_info(vg, "theirs").size == extended[-1]
    print(f"reads={len(seen)} extends={len(extended)} retries={reader.counters.retries}")


def test_not_a_pv_and_damage(workdir: str, rw: lvm.Runner, pvs: list[str]) -> None:
    with pytest.raises(metadata.Unavailable):
        metadata.Reader([pvs[0]]).lv_info("vg", "lv")  # no label yet
    vg = new_vg(rw, pvs[:1])
    lvm.lvcreate(rw, vg, "lv", EXTENT)
    area = loops.make_file(os.path.join(workdir, "copy"), 2 * MiB)
    with open(pvs[0], "rb") as src, open(area, "r+b") as dst:
        dst.write(src.read(2 * MiB))
    with loops.loop_device(area) as copy:
        reader = metadata.Reader([copy])
        assert reader.lv_info(vg, "lv").size == EXTENT
        offset = metadata.parse_label(metadata.read_direct(copy, 0, 2048)).mdas[0][0]
        header = bytearray(metadata.read_direct(copy, offset, 512))
        text_offset = struct.unpack_from("<Q", header, 40)[0]
        # One byte of the text changed: its CRC fails on every read.
        with open(copy, "r+b") as f:
            f.seek(offset + text_offset + 10)
            byte = f.read(1)
            f.seek(offset + text_offset + 10)
            f.write(bytes([byte[0] ^ 1]))
            f.flush()
            os.fsync(f.fileno())
        with pytest.raises(metadata.Unavailable, match="changed under"):
            reader.lv_info(vg, "lv")
        assert reader.counters.retries >= metadata.READ_TRIES


def test_parse_text_syntax() -> None:
    text = 'vg-1 {\nid = "a\\"b"  # comment\nlist = [\n"x", 0\n]\nempty = []\nsub {\nn = -3\n}\n}\nversion = 1\n'
    assert metadata.parse_text(text) == {
        "vg-1": {"id": 'a"b', "list": ["x", 0], "empty": [], "sub": {"n": -3}},
        "version": 1,
    }
    for bad in ("vg {", "vg { x = }", "vg ] x", 'x = "open'):
        with pytest.raises(metadata.Unavailable):
            metadata.parse_text(bad)
