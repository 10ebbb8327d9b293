from __future__ import annotations

import pytest
from xtnd import lvm

MiB = 1024**2
EXTENT = 4 * MiB


def lvextend_count(runner: lvm.Runner) -> int:
    return sum(1 for r in runner.history.records() if r.argv[1] == "lvextend")


def test_vg_info(runner: lvm.Runner, vg: str, pvs: list[str]) -> None:
    info = lvm.vg_info(runner, vg)
    assert info.name == vg
    assert info.extent_size == EXTENT
    assert info.free_extents == info.extent_count > 100
    assert [pv.name for pv in info.pvs] == [pvs[0]]
    assert info.pvs[0].pe_start > 0
    assert lvm.vgs(runner) == [vg]


def test_vgextend(runner: lvm.Runner, vg: str, pvs: list[str]) -> None:
    before = lvm.vg_info(runner, vg)
    lvm.pvcreate(runner, pvs[1])
    lvm.vgextend(runner, vg, pvs[1])
    after = lvm.vg_info(runner, vg)
    assert sorted(pv.name for pv in after.pvs) == sorted(pvs)
    assert after.free_extents > before.free_extents


def test_lvcreate_tags_segments(runner: lvm.Runner, vg: str, pvs: list[str]) -> None:
    lvm.lvcreate(runner, vg, "a", 8 * MiB, tags=("xtnd_cap=123", "xtnd_fmt=raw"))
    lvm.lvcreate(runner, vg, "b", 5 * MiB)  # rounded up to 2 extents
    a = lvm.lv_info(runner, vg, "a")
    assert a.size == 8 * MiB
    assert set(a.tags) == {"xtnd_cap=123", "xtnd_fmt=raw"}
    assert a.segments == (lvm.Segment(pvs[0], 0, 2, 0),)
    b = lvm.lv_info(runner, vg, "b")
    assert b.size == 8 * MiB
    assert b.segments[0].first_pe == 2
    assert [i.name for i in lvm.lvs(runner, vg)] == ["a", "b"]


def test_change_tags(runner: lvm.Runner, vg: str) -> None:
    lvm.lvcreate(runner, vg, "a", 4 * MiB, tags=("old",))
    lvm.change_tags(runner, vg, "a", add=("new",), delete=("old",))
    assert lvm.lv_info(runner, vg, "a").tags == ("new",)


def test_lvremove(runner: lvm.Runner, vg: str) -> None:
    lvm.lvcreate(runner, vg, "a", 4 * MiB)
    lvm.lvremove(runner, vg, "a")
    assert lvm.lvs(runner, vg) == []


def test_extend_rounds_up_to_extent(runner: lvm.Runner, vg: str) -> None:
    lvm.lvcreate(runner, vg, "a", 4 * MiB)
    assert lvm.extend(runner, vg, "a", 9 * MiB) == 12 * MiB
    assert lvm.lv_info(runner, vg, "a").size == 12 * MiB


def test_extend_idempotent(runner: lvm.Runner, vg: str) -> None:
    lvm.lvcreate(runner, vg, "a", 4 * MiB)
    assert lvm.extend(runner, vg, "a", 16 * MiB) == 16 * MiB
    runs = lvextend_count(runner)
    assert lvm.extend(runner, vg, "a", 16 * MiB) == 16 * MiB
    assert lvm.extend(runner, vg, "a", 13 * MiB) == 16 * MiB
    assert lvextend_count(runner) == runs


def test_extend_never_shrinks(runner: lvm.Runner, vg: str) -> None:
    lvm.lvcreate(runner, vg, "a", 16 * MiB)
    assert lvm.extend(runner, vg, "a", 4 * MiB) == 16 * MiB
    assert lvm.lv_info(runner, vg, "a").size == 16 * MiB


def test_extend_not_enough_free_extents(runner: lvm.Runner, vg: str) -> None:
    lvm.lvcreate(runner, vg, "a", 4 * MiB)
    free = lvm.vg_info(runner, vg).free_extents
    runs = lvextend_count(runner)
    with pytest.raises(lvm.NotEnoughFreeExtents) as e:
        lvm.extend(runner, vg, "a", 4 * MiB + (free + 1) * EXTENT)
    assert (e.value.free, e.value.needed) == (free, free + 1)
    assert lvextend_count(runner) == runs, "lvextend must not run"
    assert lvm.lv_info(runner, vg, "a").size == 4 * MiB
    assert lvm.vg_info(runner, vg).free_extents == free


class StaleReportRunner(lvm.Runner):
    """Reports plenty of free space, as a report taken before a race would."""

    def report(self, subcmd: str, *args: str) -> list[dict[str, str]]:
        rows = super().report(subcmd, *args)
        for row in rows:
            if "vg_free_count" in row:
                row["vg_free_count"] = "100000"
        return rows


def test_extend_maps_lvextend_insufficient_space(pvs: list[str], vg: str) -> None:
    runner = StaleReportRunner(pvs)
    lvm.lvcreate(runner, vg, "a", 4 * MiB)
    free = lvm.vg_info(lvm.Runner(pvs), vg).free_extents
    with pytest.raises(lvm.NotEnoughFreeExtents) as e:
        lvm.extend(runner, vg, "a", 4 * MiB + (free + 10) * EXTENT)
    assert (e.value.free, e.value.needed) == (free, free + 10)
    assert e.value.cmd[1] == "lvextend"
    assert lvm.lv_info(runner, vg, "a").size == 4 * MiB


def test_extend_contiguous_keeps_one_segment(runner: lvm.Runner, vg: str) -> None:
    lvm.lvcreate(runner, vg, "a", 4 * MiB)
    lvm.lvcreate(runner, vg, "b", 4 * MiB)
    with pytest.raises(lvm.LVMError):
        lvm.extend(runner, vg, "a", 8 * MiB, alloc="contiguous")
    assert lvm.extend(runner, vg, "b", 8 * MiB, alloc="contiguous") == 8 * MiB
    assert lvm.lv_info(runner, vg, "b").seg_count == 1
