"""The SPM's local control socket: volume commands go through the lease holder.

Only the SPM may change LVM metadata while a pool runs, so ``xtnd volume
create/remove`` on the SPM host send their request here instead of running
LVM themselves (xtnd.tools.domain_cli picks this when the socket exists).
The socket exists from the daemon's start (answering "not the SPM" to
volume commands until the lease is held) and is removed on stop.

Transport and protocol: xtnd.common.control (root only, JSON lines). Ops
(see daemon.py and ops.py): ping, stats, status, log_level, volume_create,
volume_remove, volume_resize, volume_info, volume_list.
"""

from __future__ import annotations

import os
import uuid as uuidlib
from typing import Any

from xtnd import storage
from xtnd.common import control as base
from xtnd.common.control import Op, peer_uid

__all__ = ["DEFAULT_SOCKET", "ENV", "ControlClient", "ControlError", "ControlServer", "Op", "peer_uid"]

DEFAULT_SOCKET = "/run/xtnd/spm.sock"
ENV = "XTND_SPM_SOCKET"


def default_path() -> str:
    return os.environ.get(ENV, DEFAULT_SOCKET)


class ControlError(base.ControlError, storage.StorageError):
    """The SPM refused or failed a control request (error: its exception class)."""

    peer = "SPM"


class ControlServer(base.ControlServer):
    def __init__(self, path: str, ops: dict[str, Op], allowed_uid: int = 0):
        super().__init__(path, ops, allowed_uid, name="spm-control")


class ControlClient(base.ControlClient):
    """Talks to a running SPM's control socket."""

    error = ControlError

    def __init__(self, path: str | None = None, timeout: float = 300.0):
        super().__init__(path or default_path(), timeout)


def volume_from_dict(d: dict[str, Any]) -> storage.VolumeInfo:
    """Inverse of VolumeInfo.to_dict() (which adds max_size)."""
    return storage.VolumeInfo(
        uuid=uuidlib.UUID(d["uuid"]),
        domain=uuidlib.UUID(d["domain"]),
        format=storage.Format(d["format"]),
        capacity=int(d["capacity"]),
        size=int(d["size"]),
        image=uuidlib.UUID(d["image"]) if d.get("image") else None,
        path=d.get("path"),
    )
