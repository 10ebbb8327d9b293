"""Logical volumes: report, create, remove, tag, extend.

extend() is the SPM's hot path: it changes LVM metadata only (the SPM never
maps the volumes it grows; the requesting host refreshes its own mapping),
takes an absolute size so that a repeated or resent request is harmless,
never shrinks, and checks free space first so the common failure is a typed
error with counts instead of an lvextend message to parse.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time

from xtnd.common.units import round_up

from .errors import LVMError, LVNotFound, NotEnoughFreeExtents
from .runner import Runner
from .vg import split_tags

log = logging.getLogger("xtnd.lvm")

_INSUFFICIENT = re.compile(r"Insufficient free space: (\d+) extents needed, but only (\d+) available")
# lvextend refuses a size equal to or below the current one; with concurrent
# extends of one LV (resent requests) that just means someone won the race.
_NOT_LARGER = re.compile(r"matches existing size|not larger than existing size")

_LV_FIELDS = "vg_name,lv_name,lv_size,lv_tags,seg_count,seg_start_pe,seg_size,seg_pe_ranges,vg_extent_size"


@dataclasses.dataclass(frozen=True)
class Segment:
    pv: str
    first_pe: int  # first physical extent on pv
    extents: int
    start_le: int  # first logical extent of the LV this segment maps


@dataclasses.dataclass(frozen=True)
class LVInfo:
    vg: str
    name: str
    size: int
    tags: tuple[str, ...]
    extent_size: int
    segments: tuple[Segment, ...]

    @property
    def seg_count(self) -> int:
        return len(self.segments)


def _segment(row: dict[str, str], extent_size: int) -> Segment:
    # seg_pe_ranges is "PV:FIRST-LAST" for a linear segment; a PV path may
    # itself contain ':' (by-path names), so split from the right.
    ranges = row["seg_pe_ranges"].split()
    if len(ranges) != 1:
        # Striped or mirrored: xtnd never creates them; describe, don't map.
        return Segment(row["seg_pe_ranges"], -1, int(row["seg_size"]) // extent_size, int(row["seg_start_pe"]))
    pv, _, pe = ranges[0].rpartition(":")
    first, _, last = pe.partition("-")
    return Segment(pv, int(first), int(last) - int(first) + 1, int(row["seg_start_pe"]))


def lvs(runner: Runner, vg: str, lv: str | None = None) -> list[LVInfo]:
    """All LVs of vg (or just lv), with their segments."""
    target = f"{vg}/{lv}" if lv else vg
    rows = runner.report("lvs", "--segments", "-o", _LV_FIELDS, target)
    by_name: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_name.setdefault(row["lv_name"], []).append(row)
    result = []
    for name, segs in by_name.items():
        first = segs[0]
        extent_size = int(first["vg_extent_size"])
        result.append(
            LVInfo(
                vg=first["vg_name"],
                name=name,
                size=int(first["lv_size"]),
                tags=split_tags(first["lv_tags"]),
                extent_size=extent_size,
                segments=tuple(sorted((_segment(r, extent_size) for r in segs), key=lambda s: s.start_le)),
            )
        )
    return sorted(result, key=lambda i: i.name)


def lv_info(runner: Runner, vg: str, lv: str) -> LVInfo:
    """One LV (raises VGNotFound or LVNotFound)."""
    found = lvs(runner, vg, lv)
    if not found:
        raise LVNotFound(vg, lv)
    return found[0]


def lvcreate(runner: Runner, vg: str, lv: str, size: int, tags: tuple[str, ...] = ()) -> None:
    """Create an inactive LV of at least size bytes (LVM rounds up to extents).

    Not activated and not zeroed here (both need device-mapper); mapping is
    the activator's job.
    """
    args = ["--autobackup", "n", "--name", lv, "--size", f"{size}b", "--activate", "n", "--zero", "n"]
    for tag in tags:
        args += ["--addtag", tag]
    runner.run("lvcreate", *args, vg)
    log.info("lvcreate vg=%s lv=%s size=%d tags=%s", vg, lv, size, list(tags))


def lvremove(runner: Runner, vg: str, lv: str) -> None:
    runner.run("lvremove", "--autobackup", "n", "--force", f"{vg}/{lv}")
    log.info("lvremove vg=%s lv=%s", vg, lv)


def change_tags(runner: Runner, vg: str, lv: str, add: tuple[str, ...] = (), delete: tuple[str, ...] = ()) -> None:
    args: list[str] = ["--autobackup", "n"]
    for tag in add:
        args += ["--addtag", tag]
    for tag in delete:
        args += ["--deltag", tag]
    runner.run("lvchange", *args, f"{vg}/{lv}")


def extend(runner: Runner, vg: str, lv: str, size: int, alloc: str | None = None) -> int:
    """Grow vg/lv to at least size bytes; return its size in bytes.

    The size is absolute and rounded up to the VG extent size. An LV that is
    already that large is left alone (one report, no lvextend). alloc is an
    LVM allocation policy: "contiguous" keeps the LV one segment (needed
    where LVs are mapped with loop devices) at the price of failing when the
    extents right after it are taken.
    """
    start = time.monotonic()
    rows = runner.report("lvs", "-o", "lv_size,vg_extent_size,vg_free_count", f"{vg}/{lv}")
    if not rows:
        raise LVNotFound(vg, lv)
    current = int(rows[0]["lv_size"])
    extent_size = int(rows[0]["vg_extent_size"])
    free = int(rows[0]["vg_free_count"])
    target = round_up(size, extent_size)
    if target <= current:
        log.debug("extend not needed vg=%s lv=%s size=%d current=%d", vg, lv, size, current)
        return current
    needed = (target - current) // extent_size
    if needed > free:
        log.warning("extend refused vg=%s lv=%s size=%d needed=%d free=%d", vg, lv, target, needed, free)
        raise NotEnoughFreeExtents(vg, lv, free, needed)
    size = lvextend(runner, vg, lv, target, alloc)
    log.info("extended vg=%s lv=%s from=%d to=%d duration=%.3f", vg, lv, current, size, time.monotonic() - start)
    return size


def lvextend(runner: Runner, vg: str, lv: str, size: int, alloc: str | None = None) -> int:
    """One lvextend to size bytes (a multiple of the extent size); return the LV size.

    No report first: for a caller that already knows the LV (the SPM keeps
    its volumes in memory), this halves the cost of an extend. LVM's refusals
    map to the same results as extend(): NotEnoughFreeExtents with counts,
    and an LV already at or above size is success (one lvs to learn its size).
    """
    args = ["--autobackup", "n", "--size", f"{size}b"]
    if alloc:
        args += ["--alloc", alloc]
    try:
        runner.run("lvextend", *args, f"{vg}/{lv}")
    except LVMError as e:
        m = _INSUFFICIENT.search(e.err)
        if m:
            raise NotEnoughFreeExtents(vg, lv, int(m.group(2)), int(m.group(1)), e.cmd, e.rc, e.err) from None
        if _NOT_LARGER.search(e.err):
            return lv_info(runner, vg, lv).size
        raise
    return size
