"""Storage domain and volume errors.

Caller-facing: a request naming something that does not exist or already
exists (the SPM answers "failed"; the CLI prints it) versus a bad argument.
LVM's own errors (xtnd.lvm.errors) pass through unchanged, notably
NotEnoughFreeExtents.
"""

from __future__ import annotations


class StorageError(Exception):
    """Base class of storage domain errors."""


class DomainNotFound(StorageError):
    def __init__(self, uuid: object, where: str = ""):
        self.uuid = uuid
        super().__init__(f"storage domain {uuid} not found" + (f" ({where})" if where else ""))


class DomainExists(StorageError):
    def __init__(self, uuid: object):
        self.uuid = uuid
        super().__init__(f"storage domain {uuid} already exists")


class VolumeNotFound(StorageError):
    def __init__(self, domain: object, volume: object):
        self.domain = domain
        self.volume = volume
        super().__init__(f"volume {volume} not found in storage domain {domain}")


class VolumeExists(StorageError):
    def __init__(self, domain: object, volume: object):
        self.domain = domain
        self.volume = volume
        super().__init__(f"volume {volume} already exists in storage domain {domain}")


class InvalidArgument(StorageError, ValueError):
    """A request that can never succeed as given (bad size, format, name)."""


class StorageConfigError(StorageError):
    """The host storage config (/etc/xtnd/storage.json) cannot be used."""

    def __init__(self, path: str, reason: str):
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class NoSpace(StorageError):
    """A block domain's VG has fewer free extents than a new volume needs."""

    def __init__(self, domain: object, free_extents: int, extent_size: int, size: int, what: str):
        self.domain = domain
        self.free_extents = free_extents
        self.extent_size = extent_size
        self.size = size
        needed = -(-size // extent_size)
        super().__init__(
            f"domain {domain} has {free_extents} free extents ({_gib(free_extents * extent_size)}); "
            f"{what}, {needed} extents ({_gib(needed * extent_size)})"
        )


class ShrinkRefused(StorageError):
    """A resize asked for less than the volume's capacity: a guest's data
    past the new end would be lost, so it is refused and nothing changes."""

    def __init__(self, domain: object, volume: object, capacity: int, requested: int):
        self.domain = domain
        self.volume = volume
        self.capacity = capacity
        self.requested = requested
        super().__init__(
            f"volume {volume} of domain {domain} is {capacity} bytes; shrinking it to {requested} bytes is "
            "not supported (only growing)"
        )


def _gib(n: int) -> str:
    return f"{n / 1024**3:.1f} GiB"


class LeaseAreaError(StorageError):
    """A sanlock area does not hold the leader expected there (never
    formatted, another lockspace or resource, unreadable); raw: what
    sanlock printed."""

    def __init__(self, what: str, path: str, offset: int, reason: str, raw: bytes = b""):
        self.what = what
        self.path = path
        self.offset = offset
        self.reason = reason
        self.raw = raw
        super().__init__(f"cannot read sanlock {what} at {path} offset {offset}: {reason}")


class SpmLeaseHeld(StorageError):
    """Another host holds the pool's SPM lease: only it may change LVM
    metadata, so this host must not run lvcreate/lvremove itself."""

    def __init__(self, master: object, host_id: int, generation: int):
        self.master = master
        self.host_id = host_id
        self.generation = generation
        super().__init__(
            f"host {host_id} holds the SPM lease of master domain {master} (generation {generation}): "
            f"only the SPM may change LVM metadata; run the command on host {host_id}"
        )


class NoSpaceToGrow(StorageError):
    """A resize would take more than the domain has free; refused before
    anything changed."""

    def __init__(self, domain: object, volume: object, free: int, needed: int):
        self.domain = domain
        self.volume = volume
        self.free = free
        self.needed = needed
        super().__init__(f"domain {domain} has {_gib(free)} free; growing volume {volume} needs {_gib(needed)} more")
