"""Holding the SPM lease for one command, on a host with no SPM daemon.

``xtnd volume create|remove`` change LVM metadata, which only the SPM may
do. With no SPM daemon on this host, reading the lease from storage and
then acting would leave a window in which an SPM elsewhere takes the lease
and serves. So the command takes the lease itself for its duration: join
the master domain's lockspace with this host's id (with the io_timeout
stored in the lockspace), acquire the SPM lease through a registered
sanlock connection, run, release. Every write is fenced with the lease
(lease.fence()); children are dead before the release (exits.py).

The host's membership of the lockspace is shared with its HSM and SPM
(xtnd.storage.lockspace): the command leaves it only as its last user.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from xtnd import storage
from xtnd.storage import lockspace

from .exits import reap_children
from .lease import LeaseBusy, LeaseError, SpmLease

log = logging.getLogger("xtnd.spm.borrow")


class CannotTakeLease(storage.StorageError):
    """The SPM lease could not be taken for a command (no sanlock daemon,
    host id refused, storage error): the command is refused."""


@contextlib.contextmanager
def spm_lease(master: storage.BlockDomain, host_id: int) -> Iterator[SpmLease]:
    """The pool's SPM lease, held by this process while the block runs.

    Raises SpmLeaseHeld when another host holds it, CannotTakeLease when it
    cannot be taken for another reason.
    """
    where = f"master domain {master.uuid} as host {host_id}"
    try:
        ls = master.lockspace()
        loc = master.spm_lease()
        # Checked against the domain; joins with the io_timeout on disk.
        membership = lockspace.membership_for(master, host_id)
    except (storage.StorageError, OSError) as e:
        raise CannotTakeLease(f"cannot take the SPM lease of {where}: {e}") from e
    lease = SpmLease(
        ls.name, host_id, ls.path, loc.path, offset=loc.offset, resource=loc.resource, io_timeout=membership.io_timeout
    )
    try:
        try:
            log.info("taking the SPM lease lockspace=%s host_id=%d", ls.name, host_id)
            membership.join()
            lease.acquire()
        except LeaseBusy as e:
            owner = e.owners[0] if e.owners else None
            if owner is None:
                raise CannotTakeLease(f"cannot take the SPM lease of {where}: {e.reason}") from e
            raise storage.SpmLeaseHeld(master.uuid, owner.host_id, owner.generation) from e
        except LeaseError as e:
            raise CannotTakeLease(f"cannot take the SPM lease of {where}: {e.reason}") from e
        except lockspace.MembershipError as e:
            raise CannotTakeLease(f"cannot take the SPM lease of {where}: {e}") from e
        try:
            yield lease
        finally:
            # A command interrupted while waiting for its child: that child
            # is dead before the release. (The registry stays open: the
            # process may run more commands, none of them writing.)
            reap_children("releasing the SPM lease", close=False)
    finally:
        lease.close()
        # Shared with this host's HSM or SPM: left only by its last user.
        membership.leave()
