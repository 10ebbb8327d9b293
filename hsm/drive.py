"""One monitored thin drive of a VM and the life cycle of its extends.

    UNSET ──arm──▶ ARMED ──exceeded──▶ EXCEEDED ──begin_extend──▶ EXTENDING
      ▲  │           │ ▲                 │  ▲                         │
      │  │           └─┘ arm (re-arm)    │  └──────extend_failed──────┤
      │  └──────────exceeded─────────────┘                            │
      └───────────────────────────extend_done─────────────────────────┘

    UNSET / ARMED / EXCEEDED ──disable──▶ DISABLED ──enable──▶ UNSET

- UNSET: no threshold armed in libvirt (new drive, or just extended).
- ARMED: libvirt will send one block-threshold event at `threshold`.
- EXCEEDED: the drive needs space (threshold event, ENOSPC pause or the
  periodic stats check); an extend should start.
- EXTENDING: a request for `requested_size` is with the SPM; the drive
  leaves this state only through extend_done or extend_failed.
- DISABLED: not monitored: at max size, or refused because the image
  reported an improbable allocation (see sizing).

Illegal transitions raise IllegalTransition: they are bugs in the caller,
not conditions to retry. Triggers that race with an extend already under
way (a late threshold event, ENOSPC while extending) are legal and report
that there is nothing new to do.

Pure logic: no libvirt, no I/O, no clock.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from xtnd.hsm import sizing


class State(enum.Enum):
    UNSET = "unset"
    ARMED = "armed"
    EXCEEDED = "exceeded"
    EXTENDING = "extending"
    DISABLED = "disabled"


class DisabledReason(enum.Enum):
    AT_MAX_SIZE = "at-max-size"
    IMPROBABLE_ALLOCATION = "improbable-allocation"


class IllegalTransition(Exception):
    """A drive was asked for a transition its state does not allow."""

    def __init__(self, drive: str, state: State, action: str):
        self.drive = drive
        self.state = state
        self.action = action
        super().__init__(f"drive {drive}: cannot {action} in state {state.value}")


# Which states each action may start from.
_ALLOWED: dict[str, frozenset[State]] = {
    "arm": frozenset({State.UNSET, State.ARMED}),
    "exceeded": frozenset({State.UNSET, State.ARMED, State.EXCEEDED, State.EXTENDING}),
    "begin_extend": frozenset({State.EXCEEDED}),
    "extend_done": frozenset({State.EXTENDING}),
    "extend_failed": frozenset({State.EXTENDING}),
    "disable": frozenset({State.UNSET, State.ARMED, State.EXCEEDED}),
    "enable": frozenset({State.DISABLED}),
    "reset": frozenset({State.UNSET, State.ARMED}),
}


@dataclass
class Drive:
    """A VM's qcow2 drive on a thin volume, as the HSM tracks it.

    Sizes are in bytes, as libvirt's block stats report them: capacity is
    the virtual size, allocation the highest offset written in the image,
    physical the size of the volume.
    """

    vm_id: str
    name: str  # the target device, e.g. "vda"
    index: int  # libvirt's index of the top image, as in "vda[1]"
    path: str
    domain_id: str
    volume_id: str
    capacity: int = 0
    allocation: int = 0
    physical: int = 0
    replicating: bool = False
    state: State = State.UNSET
    threshold: int | None = None
    requested_size: int | None = None
    disabled_reason: DisabledReason | None = None
    # The guest's write rate in bytes/s (sizing.write_rate) from the
    # allocation samples of update(now=...), and the last sample.
    write_rate: float = 0.0
    rate_at: float | None = None
    rate_allocation: int = 0
    # How far past its threshold the guest was when the last events came
    # (bytes): its write size plus the event's delay; a pause raises it
    # (outran). Halves at each threshold event.
    burst: int = 0

    @property
    def target(self) -> str:
        """The name setBlockThreshold and its event use for this image."""
        return f"{self.name}[{self.index}]"

    @property
    def monitored(self) -> bool:
        return self.state is not State.DISABLED

    def update(self, capacity: int, allocation: int, physical: int, now: float | None = None) -> None:
        """New sizes from libvirt's stats; legal in any state. With now
        (seconds, any monotonic clock), the allocation also feeds the
        write rate estimate."""
        self.capacity = capacity
        self.allocation = allocation
        self.physical = physical
        if now is None:
            return
        if self.rate_at is None:
            self.rate_at, self.rate_allocation = now, allocation
        elif now - self.rate_at >= sizing.RATE_MIN_INTERVAL:
            self.write_rate = sizing.write_rate(self.write_rate, self.rate_at, self.rate_allocation, now, allocation)
            self.rate_at, self.rate_allocation = now, allocation

    def saw_excess(self, excess: int) -> None:
        """A block-threshold event said the guest was excess bytes past it."""
        self.burst = max(excess, self.burst // 2)

    def outran(self, chunk: int) -> None:
        """The guest ran out of space during an extend of chunk bytes: the
        headroom was too small (rate underestimated while it was paused),
        so the burst grows to the whole chunk; the recheck after the extend
        then sizes the next one with it."""
        self.burst = max(self.burst, chunk)

    def load(self, latency: float = 0.0) -> sizing.Load:
        """The guest's load on this drive, for an extend latency of latency seconds."""
        return sizing.Load(self.replicating, self.write_rate, latency, self.burst)

    def decide(self, config: sizing.SizingConfig, latency: float = 0.0) -> sizing.Decision:
        """The sizing decision now, for an extend latency of latency seconds."""
        return sizing.decide(self.capacity, self.allocation, self.physical, config, self.load(latency))

    def arm(self, threshold: int) -> None:
        """The threshold was set in libvirt."""
        self._check("arm")
        self.threshold = threshold
        self.state = State.ARMED

    def exceeded(self) -> bool:
        """The drive needs space; True if an extend should start now.

        False when one is already pending or under way: a second trigger
        for the same shortage.
        """
        self._check("exceeded")
        if self.state in (State.EXCEEDED, State.EXTENDING):
            return False
        # libvirt drops a threshold once it fired.
        self.threshold = None
        self.state = State.EXCEEDED
        return True

    def begin_extend(self, new_size: int) -> None:
        self._check("begin_extend")
        if new_size <= self.physical:
            raise ValueError(f"drive {self.name}: new size {new_size} is not above physical {self.physical}")
        self.requested_size = new_size
        self.state = State.EXTENDING

    def extend_done(self, physical: int) -> None:
        """The volume was extended and refreshed to physical bytes; re-arm next."""
        self._check("extend_done")
        self.physical = physical
        self.requested_size = None
        self.threshold = None
        self.state = State.UNSET

    def extend_failed(self) -> None:
        """The extend failed or timed out; the shortage remains."""
        self._check("extend_failed")
        self.requested_size = None
        self.state = State.EXCEEDED

    def disable(self, reason: DisabledReason) -> None:
        self._check("disable")
        self.threshold = None
        self.disabled_reason = reason
        self.state = State.DISABLED

    def enable(self) -> None:
        """Monitor again, e.g. after the disk was resized."""
        self._check("enable")
        self.disabled_reason = None
        self.state = State.UNSET

    def reset(self) -> None:
        """Forget the armed threshold (e.g. libvirt may have lost it)."""
        self._check("reset")
        self.threshold = None
        self.state = State.UNSET

    def _check(self, action: str) -> None:
        if self.state not in _ALLOWED[action]:
            raise IllegalTransition(f"{self.vm_id}/{self.name}", self.state, action)
