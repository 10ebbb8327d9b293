"""Growing a volume's capacity: the checks and steps both domain kinds share.

The capacity recorded in a volume's metadata (LV tag, file domain .meta)
is what the guest may see; ``xtnd volume resize`` raises it. What else
changes depends on the format:

- raw: the volume itself grows to the new capacity (the LV, zeroed beyond
  its old end as a new raw volume is; the file, sparse);
- qcow2: nothing else on storage. The LV keeps growing by thin extension,
  now up to the new max size (capacity x 1.1). The image's own virtual
  size (its header) is grown by whoever has it open: the QEMU of a VM
  running it (libvirt blockResize, the HSM does it on a resize notice),
  or, for a volume no VM runs, ``prepare`` on the host about to run it
  (catch_up_header). Nobody else writes the header: a QEMU on another host
  may have the image open, and it would overwrite a header changed under it.

Refusals come before any change: a shrink (ShrinkRefused), a growth above
the domain's free space (NoSpaceToGrow). The same capacity is a no-op.
"""

from __future__ import annotations

import logging

from xtnd.common.cmd import CommandError
from xtnd.common.units import round_up

from . import qemuimg
from .errors import InvalidArgument, NoSpaceToGrow, ShrinkRefused
from .model import Format, VolumeInfo

log = logging.getLogger("xtnd.storage")

SECTOR = 512


def growth(info: VolumeInfo, capacity: int, free: int, unit: int = 1) -> int:
    """Bytes the domain must give for info to reach capacity (0: nothing to
    do, the capacity is already that); raises the refusals.

    unit: the allocation unit (a block domain's extent size)."""
    if capacity <= 0:
        raise InvalidArgument(f"size must be positive, not {capacity}")
    if capacity % SECTOR:
        raise InvalidArgument(f"size must be a multiple of {SECTOR} bytes (guests count sectors), not {capacity}")
    if capacity < info.capacity:
        raise ShrinkRefused(info.domain, info.uuid, info.capacity, capacity)
    if capacity == info.capacity:
        return 0
    needed = round_up(capacity, unit) - round_up(info.capacity, unit)
    if needed > free:
        raise NoSpaceToGrow(info.domain, info.uuid, free, needed)
    return needed


def catch_up_header(info: VolumeInfo, path: str) -> bool:
    """Grow a qcow2 image whose header is smaller than the recorded capacity
    (resized while no VM ran it) before a VM opens it; True if it grew.

    A failure (the image is open here: its QEMU grows it instead) is logged
    and the image left as it is."""
    if info.format is not Format.QCOW2:
        return False
    virtual = int(qemuimg.info(path)["virtual-size"])
    if virtual >= info.capacity:
        return False
    try:
        qemuimg.resize(path, str(info.format), info.capacity)
    except CommandError as e:
        log.warning("cannot grow image header domain=%s volume=%s error=%s", info.domain, info.uuid, e)
        return False
    log.info(
        "image header grown to the recorded capacity domain=%s volume=%s from=%d to=%d",
        info.domain, info.uuid, virtual, info.capacity,
    )  # fmt: skip
    return True
