"""Typed LVM errors, grouped by what the caller can do about them.

LVMError carries the failed command, its exit code and stderr so a log line
or a failure reply can say exactly what LVM refused. Subclasses name the
conditions a caller handles on its own: a missing VG or LV (bad request, or
a domain this host does not see), and a VG without room (reply "failed",
an operator must add a PV).
"""

from __future__ import annotations

from collections.abc import Sequence


class LVMError(Exception):
    """An LVM command failed."""

    def __init__(self, cmd: Sequence[str], rc: int, err: str, msg: str = ""):
        self.cmd = list(cmd)
        self.rc = rc
        self.err = err
        self.msg = msg or "LVM command failed"
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.msg}: cmd={self.cmd} rc={self.rc} err={self.err.strip()!r}"


class VGNotFound(LVMError):
    def __init__(self, vg: str, cmd: Sequence[str] = (), rc: int = 0, err: str = ""):
        self.vg = vg
        super().__init__(cmd, rc, err, f"volume group {vg!r} not found")


class LVNotFound(LVMError):
    def __init__(self, vg: str, lv: str, cmd: Sequence[str] = (), rc: int = 0, err: str = ""):
        self.vg = vg
        self.lv = lv
        super().__init__(cmd, rc, err, f"logical volume {vg}/{lv} not found")


class NotEnoughFreeExtents(LVMError):
    """The VG cannot grow the LV: ``needed`` extents asked, ``free`` left."""

    def __init__(self, vg: str, lv: str, free: int, needed: int, cmd: Sequence[str] = (), rc: int = 0, err: str = ""):
        self.vg = vg
        self.lv = lv
        self.free = free
        self.needed = needed
        super().__init__(cmd, rc, err, f"not enough free extents in {vg} for {lv}: needed={needed} free={free}")


class ActivationError(Exception):
    """An LV could not be activated, refreshed or deactivated."""


class MultiSegmentLV(ActivationError):
    """Loop activation maps one contiguous range; this LV has several.

    Device-mapper stitches segments together; a loop device cannot. On a host
    without device-mapper keep LVs single-segment (extend with
    alloc="contiguous", or keep the growing LV last in its VG).
    """

    def __init__(self, vg: str, lv: str, segments: int):
        self.vg = vg
        self.lv = lv
        self.segments = segments
        super().__init__(
            f"cannot activate {vg}/{lv} with a loop device: it has {segments} segments "
            "(loop activation needs a single contiguous segment; device-mapper is not available)"
        )
