"""This host's membership of a master domain's sanlock lockspace (its host id).

A host id is one mailbox block and one delta lease in the lockspace. The
local sanlock daemon holds the delta lease (renewing it every 2 x
io_timeout) once a process asks it to join (add_lockspace); another host
can take the id only after it has seen no renewal for sanlock's
host_dead_seconds. Holding the id is therefore what makes a host alone in
its mailbox block: the HSM joins before it touches the block, the SPM
before it takes the SPM lease, and vdsm hosts of a mixed pool do the same
with their own ids.

sanlock keeps one membership per daemon and lockspace, not per process:
the HSM, the SPM and a ``xtnd volume`` command of one host share it (the
second add_lockspace gets EEXIST), and one rem_lockspace drops it for all
of them. So the users of a membership count themselves with a shared
flock on ``<lock_dir>/<daemon>/<lockspace>:<host_id>.lock``, where
<daemon> is the sanlock daemon's host name (a restarted daemon, which has
no memberships left, starts a fresh count; simulated hosts of the tests,
one daemon each, count apart):

- join() takes the shared lock, then joins (EEXIST: already joined by a
  sibling, or left joined by a process that died; either way ours).
- leave() tries to turn the lock exclusive without waiting. Only the last
  user gets it, and only it removes the lockspace, with ``unused`` so that
  sanlock refuses (EBUSY) rather than kill a process still holding a
  resource lease there (an SPM that exited with work abandoned). Others
  just drop their shared lock.
- A process that dies drops its lock with it; the membership it leaves in
  the daemon is adopted by the next join or stays until the daemon stops.

Before joining, a host id held by another live host is refused at once,
naming the holder (sanlock's own check waits host_dead_seconds, ~70 s with
io_timeout 1, and names nobody): the delta lease on disk names its owner,
and a live owner renews it within 2 x io_timeout. An id whose owner stopped
renewing is left to sanlock, which waits until that owner counts as dead.

check() and MembershipWatch tell a running daemon when the daemon no
longer keeps the id (removed, renewals failing for too long): it must stop
writing its mailbox block, since another host may soon own it.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable

import sanlock
from xtnd.common import cmd

from . import sanlockdirect, sanlockutil
from .domain import Domain
from .errors import LeaseAreaError, StorageError
from .model import LockspaceLocation

log = logging.getLogger("xtnd.storage.lockspace")

LOCK_DIR = "/run/xtnd/lockspace"
# How long join() waits for the users' lock: a last user removing the
# lockspace holds it exclusively for one rem_lockspace (seconds).
LOCK_TIMEOUT = 120.0


class MembershipError(StorageError):
    """The host id cannot be held (joined, kept) in the lockspace."""


class MembershipRefused(MembershipError):
    """The configuration cannot work with this lockspace: retrying as is
    will not help (the daemons exit with status 2)."""


class HostIdBusy(MembershipRefused):
    def __init__(self, lockspace: str, host_id: int, owner: str):
        self.lockspace = lockspace
        self.host_id = host_id
        self.owner = owner
        super().__init__(f"host id {host_id} in lockspace {lockspace} is held by another live host: {owner}")


class HostIdOutOfRange(MembershipRefused):
    def __init__(self, lockspace: str, host_id: int, max_hosts: int):
        self.lockspace = lockspace
        self.host_id = host_id
        self.max_hosts = max_hosts
        super().__init__(
            f"host id {host_id} is not in 1..{max_hosts}, the master domain's max_hosts (lockspace {lockspace})"
        )


class IoTimeoutMismatch(MembershipRefused):
    def __init__(self, lockspace: str, configured: int, on_disk: int):
        self.lockspace = lockspace
        self.configured = configured
        self.on_disk = on_disk
        super().__init__(
            f"[lease] io_timeout {configured} differs from the io_timeout {on_disk} of lockspace {lockspace} on disk"
        )


class OtherHostId(MembershipRefused):
    def __init__(self, lockspace: str, host_id: int, joined: int):
        self.lockspace = lockspace
        self.host_id = host_id
        self.joined = joined
        super().__init__(f"this host is already in lockspace {lockspace} as host id {joined}, not {host_id}")


class AlreadyRunning(MembershipRefused):
    def __init__(self, lockspace: str, host_id: int, role: str, pid: str):
        self.lockspace = lockspace
        self.host_id = host_id
        self.role = role
        self.pid = pid
        super().__init__(
            f"another {role} of this host already uses host id {host_id} in lockspace {lockspace}: pid {pid}"
        )


class MembershipLost(MembershipError):
    def __init__(self, lockspace: str, host_id: int, reason: str):
        self.lockspace = lockspace
        self.host_id = host_id
        self.reason = reason
        super().__init__(f"host id {host_id} in lockspace {lockspace} lost: {reason}")


def check_host_id(lockspace: str, host_id: int, max_hosts: int) -> None:
    """An id above max_hosts has no mailbox block the SPM reads."""
    if not 1 <= host_id <= max_hosts:
        raise HostIdOutOfRange(lockspace, host_id, max_hosts)


def check_io_timeout(lockspace: str, configured: int, on_disk: int) -> None:
    """Every host must renew at the pace the others expect of it."""
    if configured != on_disk:
        raise IoTimeoutMismatch(lockspace, configured, on_disk)


@dataclasses.dataclass(frozen=True)
class DeltaLease:
    """One host id's delta lease as read from disk."""

    owner: str  # the sanlock host name of the holder ("" if never held)
    generation: int
    timestamp: int  # 0: free

    @classmethod
    def read(cls, location: LockspaceLocation, host_id: int) -> DeltaLease:
        fields = sanlockdirect.read_lockspace_leader(location.name, location.path, location.offset, host_id)
        try:
            return cls(fields.get("resource_name", ""), int(fields["owner_generation"]), int(fields["timestamp"]))
        except (KeyError, ValueError):
            raise LeaseAreaError(
                f"lockspace {location.name} host id {host_id}",
                location.path,
                location.offset,
                "unexpected delta lease",
                repr(fields).encode(),
            ) from None


def membership_for(
    domain: Domain,
    host_id: int,
    io_timeout: int | None = None,
    exclusive: str | None = None,
    lock_dir: str = LOCK_DIR,
) -> Membership:
    """The membership of host_id in domain's lockspace, checked against
    what the domain stores: max_hosts, and io_timeout if one is configured
    (without one, the host joins with the io_timeout on disk). exclusive:
    see Membership."""
    location = domain.lockspace()
    check_host_id(location.name, host_id, domain.mailbox().max_hosts)
    try:
        on_disk = sanlockdirect.lockspace_io_timeout(location.name, location.path, location.offset)
    except LeaseAreaError as e:
        raise MembershipError(f"cannot read the io_timeout of lockspace {location.name}: {e}") from e
    if io_timeout is not None:
        check_io_timeout(location.name, io_timeout, on_disk)
    return Membership(location, host_id, on_disk, exclusive=exclusive, lock_dir=lock_dir)


class Membership:
    """One process's use of this host's membership; see the module doc.

    exclusive: a role only one process of the host may play with this id
    (the HSM: two of them would write one mailbox block, and sanlock cannot
    tell them apart); join() refuses a second one, naming the first's pid.
    """

    def __init__(
        self,
        location: LockspaceLocation,
        host_id: int,
        io_timeout: int,
        exclusive: str | None = None,
        lock_dir: str = LOCK_DIR,
        max_renewal_age: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.location = location
        self.host_id = host_id
        self.io_timeout = io_timeout
        self.exclusive = exclusive
        self.lock_dir = lock_dir
        # As for the SPM lease: sanlock warns at 6 x io_timeout and gives up
        # at 8; another host may take the id later still (host_dead_seconds).
        self.max_renewal_age = 6.0 * io_timeout if max_renewal_age is None else max_renewal_age
        self._clock = clock
        self._lock_fd: int | None = None
        self._role_fd: int | None = None
        self._confirmed = float("-inf")  # when check() last saw a good renewal

    def __repr__(self) -> str:
        return f"<Membership {self.location.name} host_id={self.host_id}>"

    @property
    def name(self) -> str:
        return self.location.name

    @property
    def joined(self) -> bool:
        return self._lock_fd is not None

    def _lock_path(self, daemon: str, suffix: str = "") -> str:
        return os.path.join(self.lock_dir, daemon, f"{self.name}:{self.host_id}{suffix}.lock")

    # Joining

    def join(self, cancel: threading.Event | None = None) -> None:
        """Hold our host id; blocks until sanlock has it (~3 x io_timeout).

        Raises MembershipRefused if this host is in the lockspace with
        another id or another live host holds ours; MembershipError if
        sanlock fails otherwise or cancel is set meanwhile.
        """
        if self._lock_fd is not None:
            return
        try:
            daemon = sanlockutil.daemon_name()
        except (cmd.CommandError, ValueError) as e:
            raise MembershipError(f"cannot reach the sanlock daemon (is it running?): {e}") from e
        daemon = daemon.replace("/", "_")  # a configured name is one path component here
        os.makedirs(os.path.join(self.lock_dir, daemon), mode=0o700, exist_ok=True)
        if self.exclusive is not None:
            self._role_fd = self._lock_role(self._lock_path(daemon, f".{self.exclusive}"), self.exclusive)
        try:
            self._lock_fd = self._lock_shared(self._lock_path(daemon), cancel)
            try:
                self._join(cancel)
            except BaseException:
                os.close(self._lock_fd)
                self._lock_fd = None
                raise
        except BaseException:
            self._unlock_role()
            raise
        self._confirmed = self._clock()

    def _lock_role(self, path: str, role: str) -> int:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise AlreadyRunning(self.name, self.host_id, role, pid) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    def _unlock_role(self) -> None:
        if self._role_fd is not None:
            os.close(self._role_fd)
            self._role_fd = None

    def _lock_shared(self, path: str, cancel: threading.Event | None) -> int:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = self._clock() + LOCK_TIMEOUT
        wait = cancel or threading.Event()
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    return fd
                except BlockingIOError:
                    pass
                # Only a last user removing the lockspace holds it exclusively.
                if self._clock() >= deadline:
                    raise MembershipError(f"{path} held exclusively for {LOCK_TIMEOUT:.0f}s")
                if wait.wait(0.05):
                    raise MembershipError(f"cancelled while waiting for {path}")
        except BaseException:
            os.close(fd)
            raise

    def _join(self, cancel: threading.Event | None) -> None:
        name, host_id = self.name, self.host_id
        try:
            mine = [s for s in sanlock.get_lockspaces() if s["lockspace"] == name.encode()]
        except sanlock.SanlockException as e:
            raise MembershipError(f"cannot ask the sanlock daemon about lockspace {name}: {e}") from e
        for space in mine:
            if space["host_id"] != host_id:
                raise OtherHostId(name, host_id, space["host_id"])
        if mine and self._added():
            log.info("lockspace already joined by this host lockspace=%s host_id=%d", name, host_id)
            return
        self._refuse_live_owner(cancel)
        start = self._clock()
        log.info("joining lockspace lockspace=%s host_id=%d io_timeout=%d", name, host_id, self.io_timeout)
        try:
            sanlock.add_lockspace(
                name.encode(), host_id, self.location.path, self.location.offset, iotimeout=self.io_timeout
            )
        except sanlock.SanlockException as e:
            # A sibling's join under way: EEXIST, or another error while it
            # is being added (seen: the add racing with the sibling's).
            log.info("add_lockspace failed lockspace=%s host_id=%d errno=%s: %s", name, host_id, e.errno, e)
            if e.errno == errno.EEXIST or self._sibling():
                if not self._added():
                    raise MembershipError(f"another process of this host failed to join lockspace {name}") from e
                log.info("lockspace joined meanwhile by this host lockspace=%s host_id=%d", name, host_id)
                return
            if e.errno == errno.EINVAL:
                self._refuse_other_id()
            # sanlock's own refusal of a live id (after host_dead_seconds).
            lease = self._read_lease()
            if lease is not None and lease.timestamp:
                raise HostIdBusy(name, host_id, lease.owner) from e
            raise MembershipError(f"cannot join lockspace {name} as host id {host_id}: {e}") from e
        log.info("joined lockspace lockspace=%s host_id=%d elapsed=%.3f", name, host_id, self._clock() - start)

    def _added(self) -> bool:
        """Whether the daemon holds our id, once a sibling's join under way
        (listed, still adding) has ended."""
        loc = self.location
        try:
            return sanlock.inq_lockspace(self.name.encode(), self.host_id, loc.path, loc.offset, wait=True) is True
        except sanlock.SanlockException as e:
            raise MembershipError(f"cannot ask the sanlock daemon about lockspace {self.name}: {e}") from e

    def _sibling(self) -> bool:
        """Whether this host's daemon lists our id (held or being added)."""
        try:
            spaces = sanlock.get_lockspaces()
        except sanlock.SanlockException as e:
            raise MembershipError(f"cannot ask the sanlock daemon about lockspace {self.name}: {e}") from e
        return any(s["lockspace"] == self.name.encode() and s["host_id"] == self.host_id for s in spaces)

    def _refuse_other_id(self) -> None:
        try:
            spaces = sanlock.get_lockspaces()
        except sanlock.SanlockException as e:
            raise MembershipError(f"cannot ask the sanlock daemon about lockspace {self.name}: {e}") from e
        for space in spaces:
            if space["lockspace"] == self.name.encode() and space["host_id"] != self.host_id:
                raise OtherHostId(self.name, self.host_id, space["host_id"])

    def _read_lease(self) -> DeltaLease | None:
        try:
            return DeltaLease.read(self.location, self.host_id)
        except LeaseAreaError as e:
            log.warning("cannot read delta lease lockspace=%s host_id=%d: %s", self.name, self.host_id, e)
            return None

    def _refuse_live_owner(self, cancel: threading.Event | None) -> None:
        """HostIdBusy if another host renews our id's delta lease."""
        try:
            self._watch_owner(cancel)
        except LeaseAreaError as e:
            raise MembershipError(f"cannot read the delta lease of host id {self.host_id}: {e}") from e

    def _watch_owner(self, cancel: threading.Event | None) -> None:
        first = DeltaLease.read(self.location, self.host_id)
        if not first.timestamp:
            return
        # A live owner renews every 2 x io_timeout; allow for one slow renewal.
        window = 2.0 * self.io_timeout + 2.0
        log.info(
            "host id held on disk, watching for renewals lockspace=%s host_id=%d owner=%s window=%.0fs",
            self.name, self.host_id, first.owner, window,
        )  # fmt: skip
        deadline = self._clock() + window
        wait = cancel or threading.Event()
        while self._clock() < deadline:
            if wait.wait(min(0.5, self.io_timeout / 2)):
                raise MembershipError("cancelled while checking the host id's owner")
            now = DeltaLease.read(self.location, self.host_id)
            if not now.timestamp:
                return  # released meanwhile: free
            if now != first:
                if self._sibling():
                    return  # renewed by this host's daemon: a sibling joined meanwhile
                raise HostIdBusy(self.name, self.host_id, now.owner)
        log.warning(
            "host id not renewed for %.0fs, sanlock decides lockspace=%s host_id=%d owner=%s",
            window, self.name, self.host_id, first.owner,
        )  # fmt: skip

    # Leaving

    def leave(self) -> None:
        """Stop using the membership; the last user removes it (see module doc)."""
        fd, self._lock_fd = self._lock_fd, None
        if fd is None:
            return
        self._unlock_role()  # after the last write of our block, before it is anyone's
        try:
            try:
                # Not atomic: the shared lock is dropped first. Fine: we are
                # done with it either way.
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("lockspace kept for its other users lockspace=%s host_id=%d", self.name, self.host_id)
                return
            self._remove()
        finally:
            os.close(fd)

    def _remove(self) -> None:
        name = self.name.encode()
        try:
            sanlock.rem_lockspace(name, self.host_id, self.location.path, self.location.offset, unused=True)
        except sanlock.SanlockException as e:
            if e.errno == errno.ENOENT:
                log.info("lockspace already left lockspace=%s host_id=%d", self.name, self.host_id)
            elif e.errno == errno.EBUSY:
                log.warning("lockspace kept: a lease is still held in it lockspace=%s", self.name)
            else:
                log.error("cannot leave lockspace lockspace=%s host_id=%d: %s", self.name, self.host_id, e)
            return
        log.info("left lockspace lockspace=%s host_id=%d", self.name, self.host_id)

    # Validity

    def check(self) -> None:
        """Raise MembershipLost unless the daemon still renews our id.

        A failing status command is tolerated until the last good renewal
        seen is max_renewal_age old.
        """
        asked = self._clock()
        try:
            status = sanlockutil.lockspace_status(self.name, self.host_id)
        except (cmd.CommandError, ValueError) as e:
            if asked - self._confirmed > self.max_renewal_age:
                raise MembershipLost(self.name, self.host_id, f"cannot read sanlock status: {e}") from None
            log.warning("cannot read sanlock status lockspace=%s: %s", self.name, e)
            return
        if status is None:
            raise MembershipLost(self.name, self.host_id, "sanlock no longer lists the lockspace")
        trouble = status.trouble()
        if trouble is not None:
            raise MembershipLost(self.name, self.host_id, trouble)
        if status.adding:
            return  # a sibling is still joining; not ours to judge yet
        age = status.renewal_age
        if age > self.max_renewal_age:
            raise MembershipLost(self.name, self.host_id, f"last renewal {age}s ago (limit {self.max_renewal_age}s)")
        self._confirmed = asked - age


class MembershipWatch:
    """Checks a membership every `interval` seconds; calls on_lost(error) once.

    The thread waits on a Condition, so stop() wakes it at once. on_lost
    runs in the watch thread and must not block for long.
    """

    def __init__(
        self,
        membership: Membership,
        on_lost: Callable[[MembershipLost], None],
        interval: float | None = None,
        name: str = "lockspace-watch",
    ):
        self.membership = membership
        self.on_lost = on_lost
        self.interval = min(1.0, membership.io_timeout / 2) if interval is None else interval
        self.lost: MembershipLost | None = None
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float | None = None) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def step(self) -> bool:
        """Check once; False (after calling on_lost) once the id is lost."""
        if self.lost is not None:
            return False
        try:
            self.membership.check()
        except MembershipLost as e:
            self.lost = e
            log.error("%s", e)
            self.on_lost(e)
            return False
        return True

    def _run(self) -> None:
        while self.step():
            with self._cond:
                if self._cond.wait_for(lambda: self._stopping, self.interval):
                    break
