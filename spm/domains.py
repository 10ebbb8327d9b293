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


# A domain that could not be opened is tried again at the first request
# after this many seconds; requests meanwhile are refused at once.
OPEN_RETRY_INTERVAL = 10.0
# How long a request waits for another thread's open of the same domain
# before it is refused (the open itself is bounded by command_timeout).
OPEN_WAIT = 1.0


@dataclasses.dataclass
class _Opening:
    """One attempt to open a domain: done is set when it ended."""

    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    error: str = ""
    ended: float = 0.0


class DomainRegistry:
    """Managed domains by UUID, opened on first use (and retried after a failure).

    Opening runs without the registry's lock, so a domain whose storage is
    missing or hangs (each LVM command is bounded by the opener's timeout)
    never holds up requests for the others: a request for it waits at most
    OPEN_WAIT for an open in progress, and after a failure is refused at
    once until retry_interval has passed; the next request then tries again.
    """

    def __init__(
        self,
        opener: Callable[[uuidlib.UUID], storage.Domain],
        uuids: list[uuidlib.UUID],
        ttl: float,
        clock: Callable[[], float] = time.monotonic,
        retry_interval: float = OPEN_RETRY_INTERVAL,
        open_wait: float = OPEN_WAIT,
    ):
        self._opener = opener
        self.uuids = list(dict.fromkeys(uuids))
        self._ttl = ttl
        self._clock = clock
        self._retry_interval = retry_interval
        self._open_wait = open_wait
        self._lock = threading.Lock()
        self._open: dict[uuidlib.UUID, ManagedDomain] = {}
        self._opening: dict[uuidlib.UUID, _Opening] = {}

    def get(self, uuid: uuidlib.UUID) -> ManagedDomain:
        """The managed domain; raises DomainNotManaged (unknown, or cannot be opened)."""
        if uuid not in self.uuids:
            raise DomainNotManaged(uuid)
        with self._lock:
            managed = self._open.get(uuid)
            if managed is not None:
                return managed
            attempt = self._opening.get(uuid)
            mine = attempt is None or (
                attempt.done.is_set() and self._clock() - attempt.ended >= self._retry_interval
            )
            if mine:
                attempt = self._opening[uuid] = _Opening()
        assert attempt is not None
        if mine:
            return self._try_open(uuid, attempt)
        if not attempt.done.wait(self._open_wait):
            raise DomainNotManaged(uuid, "still being opened (its storage is slow or missing), try again later")
        with self._lock:
            managed = self._open.get(uuid)
        if managed is not None:
            return managed
        left = max(0.0, self._retry_interval - (self._clock() - attempt.ended))
        raise DomainNotManaged(uuid, f"cannot open: {attempt.error} (next try in {left:.0f}s)")

    def opened(self, uuid: uuidlib.UUID) -> ManagedDomain | None:
        """The domain if it is open now (never opens it)."""
        with self._lock:
            return self._open.get(uuid)

    def _try_open(self, uuid: uuidlib.UUID, attempt: _Opening) -> ManagedDomain:
        start = self._clock()
        try:
            domain = self._opener(uuid)
        except (storage.StorageError, lvm.LVMError) as e:
            attempt.error = str(e)
            attempt.ended = self._clock()
            attempt.done.set()
            log.error(
                "cannot open domain domain=%s duration=%.3f retry_in=%.0fs error=%s",
                uuid,
                attempt.ended - start,
                self._retry_interval,
                e,
            )
            raise DomainNotManaged(uuid, f"cannot open: {e}") from e
        except BaseException as e:
            attempt.error = f"{type(e).__name__}: {e}"
            attempt.ended = self._clock()
            attempt.done.set()
            raise
        managed = ManagedDomain(domain, self._ttl, self._clock)
        with self._lock:
            self._open[uuid] = managed
            del self._opening[uuid]
        attempt.done.set()
        log.info("domain opened domain=%s kind=%s duration=%.3f", uuid, domain.kind, self._clock() - start)
        return managed

    def open_all(self, wait: float | None = None) -> None:
        """Open every domain, each in its own thread; return when all are
        open or failed, or after wait seconds (the rest go on opening).
        Failures are logged, not raised: requests retry later."""
        threads = [
            threading.Thread(target=self._open_one, args=(uuid,), name=f"spm-open-{str(uuid)[:8]}", daemon=True)
            for uuid in self.uuids
        ]
        for t in threads:
            t.start()
        deadline = None if wait is None else self._clock() + wait
        for t in threads:
            t.join(None if deadline is None else max(0.0, deadline - self._clock()))
        slow = [t.name for t in threads if t.is_alive()]
        if slow:
            log.warning("domains still opening, serving the others threads=%s", ",".join(slow))

    def _open_one(self, uuid: uuidlib.UUID) -> None:
        try:
            managed = self.get(uuid)
            if managed.is_block:
                managed.reload()
        except (DomainNotManaged, lvm.LVMError) as e:
            log.error("cannot open managed domain domain=%s error=%s", uuid, e)
