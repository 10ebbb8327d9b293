"""Plain values describing domains and volumes, shared by SPM, HSM and CLI."""

from __future__ import annotations

import dataclasses
import enum
import uuid as uuidlib
from collections.abc import Callable
from typing import Any

from xtnd.common.units import round_up

from .constants import QCOW2_OVERHEAD_PERCENT, MiB
from .errors import InvalidArgument

# Called right before each command that writes shared storage (LVM metadata,
# a new volume's bytes): the SPM passes its lease's fence(), which raises once
# the lease is lost, so no write follows a detectable loss.
Fence = Callable[[], object]


def no_fence() -> None:
    """For writers that hold no lease: domain creation, --local, tests."""


class Format(enum.StrEnum):
    QCOW2 = "qcow2"
    RAW = "raw"


def max_size(capacity: int) -> int:
    """Largest size a thin volume may grow to: capacity + 10% qcow2 overhead,
    rounded up to a MiB. The one max-size rule: SPM validation and HSM
    sizing both use it (mailbox/PROTOCOL.md, "Sizing")."""
    return round_up((capacity * (100 + QCOW2_OVERHEAD_PERCENT) + 99) // 100, MiB)


def parse_uuid(value: str | uuidlib.UUID) -> uuidlib.UUID:
    if isinstance(value, uuidlib.UUID):
        return value
    try:
        return uuidlib.UUID(value)
    except ValueError:
        raise InvalidArgument(f"not a UUID: {value!r}") from None


@dataclasses.dataclass(frozen=True)
class VolumeInfo:
    uuid: uuidlib.UUID
    domain: uuidlib.UUID
    format: Format
    capacity: int  # virtual size seen by the guest
    size: int  # allocated: LV size, or file size
    image: uuidlib.UUID | None
    path: str | None  # device or file when usable on this host now

    @property
    def max_size(self) -> int:
        return max_size(self.capacity)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(uuid=str(self.uuid), domain=str(self.domain), format=str(self.format), max_size=self.max_size)
        d["image"] = str(self.image) if self.image else None
        return d


@dataclasses.dataclass(frozen=True)
class LockspaceLocation:
    """Where sanlock's delta leases of a domain live (name = domain UUID)."""

    name: str
    path: str
    offset: int


@dataclasses.dataclass(frozen=True)
class LeaseLocation:
    """A sanlock resource (paxos lease), e.g. the SPM lease SDM."""

    lockspace: str
    resource: str
    path: str
    offset: int


@dataclasses.dataclass(frozen=True)
class MailboxLocation:
    inbox: str
    outbox: str
    max_hosts: int


@dataclasses.dataclass(frozen=True)
class DomainInfo:
    uuid: uuidlib.UUID
    kind: str  # "block" or "file"
    version: int
    master: bool
    max_hosts: int
    sector_size: int
    size: int
    free: int
    spm_lease_offset: int
    volumes: tuple[uuidlib.UUID, ...]
    # block: the domain's PVs, extent size and free extents; file: the directory
    pvs: tuple[str, ...] = ()
    extent_size: int = 0
    free_extents: int = 0
    path: str | None = None
    # Special volume name -> device or file path, when usable on this host now.
    special: dict[str, str | None] = dataclasses.field(default_factory=dict)
    # sanlock io_timeout stored in the lockspace (None: could not be read).
    io_timeout: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(uuid=str(self.uuid), volumes=[str(v) for v in self.volumes], pvs=list(self.pvs))
        return d
