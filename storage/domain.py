"""The interface every storage domain offers, and how to open one.

The SPM daemon, the HSM daemon and the CLI all use a Domain the same way;
the block (VG) and file (directory) kinds differ only behind it. Methods
that return device paths activate what they name on this host.
"""

from __future__ import annotations

import uuid as uuidlib
from collections.abc import Sequence
from typing import Protocol

from . import constants as c
from .blockdomain import BlockDomain
from .errors import InvalidArgument
from .filedomain import FileDomain
from .model import DomainInfo, Fence, Format, LeaseLocation, LockspaceLocation, MailboxLocation, VolumeInfo, no_fence


class Domain(Protocol):
    uuid: uuidlib.UUID
    kind: str

    def info(self) -> DomainInfo: ...

    def lockspace(self) -> LockspaceLocation: ...

    def spm_lease(self) -> LeaseLocation: ...

    def mailbox(self) -> MailboxLocation: ...

    def deactivate_special(self) -> None: ...

    def create_volume(
        self,
        uuid: uuidlib.UUID | str,
        capacity: int,
        fmt: Format | str = Format.QCOW2,
        initial_size: int = c.DEFAULT_CHUNK,
        image: uuidlib.UUID | str | None = None,
        fence: Fence = no_fence,
    ) -> VolumeInfo: ...

    def remove_volume(self, uuid: uuidlib.UUID | str, fence: Fence = no_fence) -> None: ...

    def volume_info(self, uuid: uuidlib.UUID | str) -> VolumeInfo: ...

    def list_volumes(self) -> list[VolumeInfo]: ...

    def extend_volume(self, uuid: uuidlib.UUID | str, size: int, alloc: str | None = None) -> int: ...

    def resize_volume(self, uuid: uuidlib.UUID | str, capacity: int, fence: Fence = no_fence) -> bool: ...

    def prepare_volume(self, uuid: uuidlib.UUID | str) -> str: ...

    def refresh_volume(self, uuid: uuidlib.UUID | str) -> int: ...

    def teardown_volume(self, uuid: uuidlib.UUID | str) -> None: ...


def open_domain(
    uuid: uuidlib.UUID | str,
    pvs: Sequence[str] = (),
    root: str | None = None,
    activation: str = "auto",
    writable: bool = False,
    timeout: float | None = None,
) -> Domain:
    """A block domain on pvs, or a file domain under root (exactly one).

    A block domain's LVM metadata is read-only unless writable; timeout
    bounds each of its LVM commands (default: the runner's).
    """
    if bool(pvs) == bool(root):
        raise InvalidArgument("open a domain with either its PVs or its root directory")
    if root:
        return FileDomain.open(uuid, root)
    if timeout is None:
        return BlockDomain.open(uuid, pvs, activation=activation, writable=writable)
    return BlockDomain.open(uuid, pvs, activation=activation, writable=writable, timeout=timeout)
