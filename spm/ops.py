"""What the control socket can ask of the SPM: volume commands and stats.

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


class VolumeOps:
    def __init__(self, registry: DomainRegistry, service: ExtendService, stats: Callable[[], dict[str, Any]]):
        self.registry = registry
        self.service = service
        self._stats = stats

    def table(self) -> dict[str, Op]:
        return {
            "ping": lambda args: "pong",
            "stats": lambda args: self._stats(),
            "volume_create": self.create,
            "volume_remove": self.remove,
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

    def info(self, args: dict[str, Any]) -> dict[str, Any]:
        managed = self.registry.get(_uuid(args, "domain"))
        return managed.domain.volume_info(_uuid(args, "uuid")).to_dict()

    def list(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        managed = self.registry.get(_uuid(args, "domain"))
        return [v.to_dict() for v in managed.domain.list_volumes()]
