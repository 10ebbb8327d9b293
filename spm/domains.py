"""The domains an SPM manages, and what it knows about their volumes.

The SPM is the only writer of LVM metadata in the pool, so it can keep
each block domain's volume list in memory (name, size, capacity, kind)
instead of asking LVM before every extend: an ``lvs`` costs as much as
the ``lvextend`` it would precede. The list is read with one ``lvs`` per
domain when first needed, again when a request names a volume it does not
know (just created by someone), and at least every ``ttl`` seconds
(something outside xtnd changed the VG). Sizes are updated from the result
of each lvextend. A stale entry is harmless: the size in a request is
absolute, and lvextend refusing "not larger" reads the real size.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid as uuidlib
from collections.abc import Callable

from xtnd import lvm, storage
from xtnd.storage import constants as c

log = logging.getLogger("xtnd.spm.domains")

VOLUME = "volume"
SPECIAL = "special"
FOREIGN = "foreign"


@dataclasses.dataclass(frozen=True)
class CachedLV:
    name: str
    kind: str  # VOLUME, SPECIAL (ids, leases, inbox, outbox, ...) or FOREIGN (not made by xtnd)
    size: int
    capacity: int
    extent_size: int

    @property
    def max_size(self) -> int:
        return storage.max_size(self.capacity)


def _cached(info: lvm.LVInfo) -> CachedLV:
    if c.TAG_SPECIAL in info.tags or info.name in c.SPECIAL_NAMES:
        kind = SPECIAL
    elif c.TAG_VOLUME in info.tags:
        kind = VOLUME
    else:
        kind = FOREIGN
    capacity = info.size
    for tag in info.tags:
        if tag.startswith(c.TAG_CAPACITY):
            capacity = int(tag[len(c.TAG_CAPACITY) :])
    return CachedLV(info.name, kind, info.size, capacity, info.extent_size)


class ManagedDomain:
    """One managed domain and (block domains) its cached LV list."""

    def __init__(self, domain: storage.Domain, ttl: float, clock: Callable[[], float] = time.monotonic):
        self.domain = domain
        self.uuid = domain.uuid
        self.ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._lvs: dict[str, CachedLV] = {}
        self._loaded_at: float | None = None

    @property
    def is_block(self) -> bool:
        return isinstance(self.domain, storage.BlockDomain)

    @property
    def block(self) -> storage.BlockDomain:
        assert isinstance(self.domain, storage.BlockDomain)
        return self.domain

    def reload(self) -> None:
        """Read every LV of the VG (one lvs)."""
        start = self._clock()
        infos = lvm.lvs(self.block.runner, self.block.vg)
        with self._lock:
            self._lvs = {i.name: _cached(i) for i in infos}
            self._loaded_at = self._clock()
        log.debug("volume list read domain=%s lvs=%d duration=%.3f", self.uuid, len(infos), self._clock() - start)

    def lookup(self, volume: uuidlib.UUID) -> CachedLV | None:
        """The LV named volume, reading the VG again if unknown or stale."""
        name = str(volume)
        with self._lock:
            fresh = self._loaded_at is not None and self._clock() - self._loaded_at < self.ttl
            entry = self._lvs.get(name)
        if entry is not None and fresh:
            return entry
        self.reload()
        with self._lock:
            return self._lvs.get(name)

    def update_size(self, volume: uuidlib.UUID, size: int) -> None:
        name = str(volume)
        with self._lock:
            entry = self._lvs.get(name)
            if entry is not None:
                self._lvs[name] = dataclasses.replace(entry, size=size)

    def invalidate(self) -> None:
        with self._lock:
            self._loaded_at = None


class DomainNotManaged(Exception):
    def __init__(self, uuid: object, reason: str = "not managed by this SPM"):
        self.uuid = uuid
        super().__init__(f"domain {uuid}: {reason}")


class DomainRegistry:
    """Managed domains by UUID, opened on first use (and retried after a failure)."""

    def __init__(
        self,
        opener: Callable[[uuidlib.UUID], storage.Domain],
        uuids: list[uuidlib.UUID],
        ttl: float,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._opener = opener
        self.uuids = list(dict.fromkeys(uuids))
        self._ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._open: dict[uuidlib.UUID, ManagedDomain] = {}

    def get(self, uuid: uuidlib.UUID) -> ManagedDomain:
        """The managed domain; raises DomainNotManaged (unknown, or cannot be opened)."""
        if uuid not in self.uuids:
            raise DomainNotManaged(uuid)
        with self._lock:
            managed = self._open.get(uuid)
            if managed is not None:
                return managed
            try:
                domain = self._opener(uuid)
            except (storage.StorageError, lvm.LVMError) as e:
                raise DomainNotManaged(uuid, f"cannot open: {e}") from e
            managed = self._open[uuid] = ManagedDomain(domain, self._ttl, self._clock)
            log.info("domain opened domain=%s kind=%s", uuid, domain.kind)
            return managed

    def open_all(self) -> None:
        """Open every domain now; log (do not fail on) those that cannot be."""
        for uuid in self.uuids:
            try:
                managed = self.get(uuid)
                if managed.is_block:
                    managed.reload()
            except (DomainNotManaged, lvm.LVMError) as e:
                log.error("cannot open managed domain domain=%s error=%s", uuid, e)
