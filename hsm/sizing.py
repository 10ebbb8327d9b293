"""How big a thin volume should be, and when to ask for more (mailbox/PROTOCOL.md §4).

A qcow2 image on a thin LV grows by `chunk` at a time. The HSM asks for the
next chunk while `watermark` bytes are still free, early enough that the
SPM round trip and the refresh finish before the guest fills the rest:

    chunk      = chunk_mb MiB, doubled while the disk is replicated to
                 another domain (both sides must keep up)
    watermark  = chunk * (100 - utilization_percent) / 100
    threshold  = max(1, physical - watermark)      armed in libvirt
    max size   = round_up(capacity * 1.1, 1 MiB)   room for qcow2 metadata
    next size  = min(round_up(physical + chunk, 1 MiB), max size)

A drive at max size needs nothing more. An allocation beyond the next size
cannot come from a healthy image (qcow2 allocates in clusters at the end
of the file, a chunk at a time is far ahead): it is refused, so a corrupt
image cannot ask for unbounded space.

Pure functions of numbers in bytes; no libvirt, no clock.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from xtnd.common.units import MiB, round_up
from xtnd.storage.model import max_size

__all__ = ["MiB", "SizingConfig", "max_size", "round_up"]


@dataclass(frozen=True)
class SizingConfig:
    """The [thin] sizing options; defaults are vdsm's."""

    # Size of one extend, in MiB.
    chunk_mb: int = 2560
    # Extend when the volume is this full within its last chunk: with 20,
    # extend when less than 80% of a chunk (2048 MiB) is free.
    utilization_percent: int = 20

    def __post_init__(self) -> None:
        if self.chunk_mb <= 0:
            raise ValueError(f"chunk_mb must be positive, got {self.chunk_mb}")
        if not 0 <= self.utilization_percent <= 100:
            raise ValueError(f"utilization_percent must be in 0..100, got {self.utilization_percent}")

    def chunk(self, replicating: bool = False) -> int:
        size = self.chunk_mb * MiB
        return size * 2 if replicating else size

    def watermark(self, replicating: bool = False) -> int:
        return self.chunk(replicating) * (100 - self.utilization_percent) // 100


def threshold(physical: int, config: SizingConfig, replicating: bool = False) -> int:
    """The write offset at which libvirt should tell us to extend."""
    return max(1, physical - config.watermark(replicating))


def next_size(physical: int, capacity: int, config: SizingConfig, replicating: bool = False) -> int:
    return min(round_up(physical + config.chunk(replicating), MiB), max_size(capacity))


class Action(enum.Enum):
    # Enough free space: arm the threshold and wait.
    ARM = "arm"
    # Free space below the watermark: extend to Decision.new_size.
    EXTEND = "extend"
    # At max size: nothing to extend, stop monitoring until resized.
    AT_MAX = "at-max"
    # Allocation beyond the next size: refuse and pause the VM.
    IMPROBABLE = "improbable"


@dataclass(frozen=True)
class Decision:
    action: Action
    threshold: int
    new_size: int


def decide(capacity: int, allocation: int, physical: int, config: SizingConfig, replicating: bool = False) -> Decision:
    """What to do with a drive given its current sizes in bytes."""
    limit = max_size(capacity)
    new_size = next_size(physical, capacity, config, replicating)
    mark = threshold(physical, config, replicating)
    if allocation > new_size:
        action = Action.IMPROBABLE
    elif physical >= limit:
        action = Action.AT_MAX
    elif physical - allocation < config.watermark(replicating):
        action = Action.EXTEND
    else:
        action = Action.ARM
    return Decision(action=action, threshold=mark, new_size=new_size)
