"""How big a thin volume should be, and when to ask for more (mailbox/PROTOCOL.md §4).

A qcow2 image on a thin LV grows by `chunk` at a time. The HSM asks for the
next chunk while `watermark` bytes are still free, early enough that the
SPM round trip and the refresh finish before the guest fills the rest:

    chunk      = chunk_mb MiB (policy fixed), or with policy adaptive
                 max(chunk_mb MiB, need * 100 / (100 - utilization_percent))
                 where need = (write rate x extend latency + burst)
                 x safety_factor and burst is how far past the threshold
                 the guest already was when its event arrived,
                 capped by max_chunk_mb; then doubled while the disk is
                 replicated to another domain (both sides must keep up)
    watermark  = chunk * (100 - utilization_percent) / 100
    threshold  = max(1, physical - watermark)      armed in libvirt
    max size   = round_up(capacity * 1.1, 1 MiB)   room for qcow2 metadata
    next size  = min(round_up(physical + chunk, 1 MiB), max size)

A drive at max size needs nothing more. An allocation beyond the next size
(with the floor chunk) cannot come from a healthy image (qcow2 allocates in clusters at the end
of the file, a chunk at a time is far ahead): it is refused, so a corrupt
image cannot ask for unbounded space.

Adaptive sizing keeps a fast writer from outrunning a small chunk: the
free space kept ahead of the guest (the watermark) covers what it writes
while an extend is under way, with a margin; when it slows, the chunk
shrinks back to the floor so idle disks do not hoard space. The rate comes
from write_rate() (peak-hold with exponential decay), the latency from the
monitor's recent extends.

Pure functions of numbers in bytes and seconds; no libvirt, no clock.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from xtnd.common.units import MiB, round_up
from xtnd.storage.model import max_size

__all__ = ["MiB", "SizingConfig", "max_size", "round_up", "write_rate"]

FIXED = "fixed"
ADAPTIVE = "adaptive"
POLICIES = (FIXED, ADAPTIVE)
# Replication (live storage migration) multiplies the chunk by this: the
# source and its copy both grow while the guest writes.
REPLICATION_FACTOR = 2
# Allocation samples closer than this (seconds) are not rated: the guest
# writes in bursts, and a burst over a few milliseconds is no rate.
RATE_MIN_INTERVAL = 0.5
# Recent extends whose latency (trigger to refreshed) gives the p99.
LATENCY_WINDOW = 50


@dataclass(frozen=True)
class Load:
    """What a guest does to its drive, as far as sizing cares; the fixed
    policy looks at replicating only."""

    # The drive is being copied to another domain (the chunk doubles).
    replicating: bool = False
    # The guest's write rate in bytes/s (write_rate()).
    rate: float = 0.0
    # How long an extend takes, trigger to refreshed, in seconds.
    latency: float = 0.0
    # How far past the threshold the guest was when we heard of it (bytes).
    burst: int = 0


# No writes known: the floor chunk.
IDLE = Load()
# A drive being copied, with no writes known.
REPLICATING = Load(replicating=True)


@dataclass(frozen=True)
class SizingConfig:
    """The [thin] sizing options; chunk and utilization defaults are vdsm's."""

    # Size of one extend, in MiB (the floor of the adaptive policy).
    chunk_mb: int = 2560
    # Extend when the volume is this full within its last chunk: with 20,
    # extend when less than 80% of a chunk (2048 MiB) is free.
    utilization_percent: int = 20
    # fixed: always chunk_mb; adaptive: grow with the guest's write rate.
    policy: str = ADAPTIVE
    # The adaptive chunk never exceeds this nor goes below chunk_mb (a cap
    # below the floor leaves the floor); replication doubles the result.
    max_chunk_mb: int = 10240
    # Free space kept ahead = rate x latency x this.
    safety_factor: float = 2.0

    def __post_init__(self) -> None:
        if self.chunk_mb <= 0:
            raise ValueError(f"chunk_mb must be positive, got {self.chunk_mb}")
        if not 0 <= self.utilization_percent <= 100:
            raise ValueError(f"utilization_percent must be in 0..100, got {self.utilization_percent}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if self.max_chunk_mb <= 0:
            raise ValueError(f"max_chunk_mb must be positive, got {self.max_chunk_mb}")
        if not self.safety_factor >= 1:
            raise ValueError(f"safety_factor must be at least 1, got {self.safety_factor}")

    def chunk(self, load: Load = IDLE) -> int:
        """Bytes of one extend for a guest writing load.rate bytes/s when
        an extend takes load.latency seconds and the guest is load.burst
        bytes past the threshold when we hear of it."""
        size = self.chunk_mb * MiB
        need = (load.rate * load.latency + load.burst) * self.safety_factor
        if self.policy == ADAPTIVE and need > 0:
            # The watermark is (100 - u)% of the chunk: size the chunk so
            # that the watermark covers need (with u = 100 there is no
            # watermark by choice: the chunk alone covers need).
            free_share = (100 - self.utilization_percent) / 100 if self.utilization_percent < 100 else 1.0
            wanted = round_up(math.ceil(need / free_share), MiB)
            size = max(size, min(wanted, self.max_chunk_mb * MiB))
        return replicated(size, load.replicating)

    def watermark(self, load: Load = IDLE) -> int:
        return self.chunk(load) * (100 - self.utilization_percent) // 100


def replicated(chunk: int, replicating: bool) -> int:
    """The chunk of a drive being copied to another domain (the one place
    replication changes sizing)."""
    return chunk * REPLICATION_FACTOR if replicating else chunk


def write_rate(
    rate: float, last_t: float, last_allocation: int, t: float, allocation: int, decay: float = 30.0
) -> float:
    """The guest's write rate (bytes/s) after a new allocation sample.

    Peak-hold with exponential decay: a burst is taken at once (a pause
    costs more than a chunk too big for a while), a slowdown lowers the
    estimate with time constant decay seconds, so one quiet sample does
    not undo it. Allocation that went down (a new image) counts as 0.
    """
    dt = t - last_t
    if dt <= 0:
        return rate
    now = max(0, allocation - last_allocation) / dt
    if now >= rate:
        return now
    keep = math.exp(-dt / decay)
    return rate * keep + now * (1 - keep)


def threshold(physical: int, config: SizingConfig, load: Load = IDLE) -> int:
    """The write offset at which libvirt should tell us to extend."""
    return max(1, physical - config.watermark(load))


def next_size(physical: int, capacity: int, config: SizingConfig, load: Load = IDLE) -> int:
    return min(round_up(physical + config.chunk(load), MiB), max_size(capacity))


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
    chunk: int = 0  # bytes of the chunk the decision used


def decide(capacity: int, allocation: int, physical: int, config: SizingConfig, load: Load = IDLE) -> Decision:
    """What to do with a drive given its current sizes in bytes and the
    guest's load on it."""
    limit = max_size(capacity)
    chunk = config.chunk(load)
    new_size = min(round_up(physical + chunk, MiB), limit)
    watermark = chunk * (100 - config.utilization_percent) // 100
    mark = max(1, physical - watermark)
    # Improbable is judged against the floor: a healthy image never gets
    # past its device, and a jump in allocation must not widen its own bound
    # by raising the estimated rate.
    floor = config.chunk(Load(replicating=load.replicating))
    if allocation > min(round_up(physical + floor, MiB), limit):
        action = Action.IMPROBABLE
    elif physical >= limit:
        action = Action.AT_MAX
    elif physical - allocation < watermark:
        action = Action.EXTEND
    else:
        action = Action.ARM
    return Decision(action=action, threshold=mark, new_size=new_size, chunk=chunk)
