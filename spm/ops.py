"""What the control socket can ask of the SPM: volume commands and stats.

volume_resize records a larger capacity (xtnd.storage.resize), then
announces it in the outbox (xtnd.mailbox.notice) for the hosts whose VMs
use the volume; the extend validation follows the new capacity at once
(the domain's cached volume list is invalidated).

Commands that change LVM metadata (create, remove) fence the lease before
every command that writes (lvcreate, activation, the qcow2 header,
deactivation, lvremove: the domain calls our fence between its steps) and
hold the volume's lock, so they never interleave with an extend of the
same volume; they invalidate the domain's cached volume list. They count
as running work for the daemon's shutdown (the lease is released only
after they end) and are refused once it started.
"""

from __future__ import annotations

import logging
import uuid as uuidlib
from collections.abc import Callable
from typing import Any

from xtnd.mailbox import notice
from xtnd.mailbox.directio import Storage
from xtnd.storage import constants as c

from .control import Op
from .domains import DomainRegistry
from .extend import ExtendService

log = logging.getLogger("xtnd.spm.ops")


def _uuid(args: dict[str, Any], key: str) -> uuidlib.UUID:
    try:
        return uuidlib.UUID(str(args[key]))
    except (KeyError, ValueError):
        raise ValueError(f"{key!r}: a UUID is required") from None


def _size(args: dict[str, Any], key: str) -> int:
    value = args.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{key!r}: a positive number of bytes is required, not {value!r}")
    return value


class VolumeOps:
    def __init__(
        self,
        registry: DomainRegistry,
        service: ExtendService,
        stats: Callable[[], dict[str, Any]],
        outbox: Storage | None = None,
    ):
        """outbox: where resize notices go (None: none are written)."""
        self.registry = registry
        self.service = service
        self._stats = stats
        self._outbox = outbox

    def table(self) -> dict[str, Op]:
        return {
            "ping": lambda args: "pong",
            "stats": lambda args: self._stats(),
            "volume_create": self.create,
            "volume_remove": self.remove,
            "volume_resize": self.resize,
            "volume_info": self.info,
            "volume_list": self.list,
        }

    def create(self, args: dict[str, Any]) -> dict[str, Any]:
        domain, volume = _uuid(args, "domain"), _uuid(args, "uuid")
        managed = self.registry.get(domain)
        with self.service.operation(), self.service.volume_locks.hold((domain, volume)):
            try:
                info = managed.domain.create_volume(
                    volume,
                    int(args["capacity"]),
                    args.get("format", "qcow2"),
                    initial_size=int(args.get("initial_size") or c.DEFAULT_CHUNK),
                    image=args.get("image"),
                    fence=self.service.fence,
                )
            finally:
                if managed.is_block:
                    managed.invalidate()
        log.info("volume created by SPM domain=%s volume=%s capacity=%s", domain, volume, args["capacity"])
        return info.to_dict()

    def remove(self, args: dict[str, Any]) -> None:
        domain, volume = _uuid(args, "domain"), _uuid(args, "uuid")
        managed = self.registry.get(domain)
        with self.service.operation(), self.service.volume_locks.hold((domain, volume)):
            try:
                managed.domain.remove_volume(volume, fence=self.service.fence)
            finally:
                if managed.is_block:
                    managed.invalidate()
        log.info("volume removed by SPM domain=%s volume=%s", domain, volume)

    def resize(self, args: dict[str, Any]) -> dict[str, Any]:
        """{"volume": VolumeInfo dict, "changed": bool}; refusals raise
        (ShrinkRefused, NoSpaceToGrow) before anything changed."""
        domain, volume = _uuid(args, "domain"), _uuid(args, "uuid")
        capacity = _size(args, "size")
        managed = self.registry.get(domain)
        with self.service.operation(), self.service.volume_locks.hold((domain, volume)):
            try:
                changed = managed.domain.resize_volume(volume, capacity, fence=self.service.fence)
            finally:
                if managed.is_block:
                    managed.invalidate()
            if changed and self._outbox is not None:
                self.service.fence()
                notice.announce(self._outbox, domain, volume, capacity)
        log.info("volume resize by SPM domain=%s volume=%s size=%d changed=%s", domain, volume, capacity, changed)
        return {"volume": managed.domain.volume_info(volume).to_dict(), "changed": changed}

    def info(self, args: dict[str, Any]) -> dict[str, Any]:
        managed = self.registry.get(_uuid(args, "domain"))
        return managed.domain.volume_info(_uuid(args, "uuid")).to_dict()

    def list(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        managed = self.registry.get(_uuid(args, "domain"))
        return [v.to_dict() for v in managed.domain.list_volumes()]
