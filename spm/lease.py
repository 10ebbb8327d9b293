"""The SPM lease: the sanlock resource that makes one host the SPM.

Only the holder of the `SDM` resource lease (in the master domain's `leases`
area) may change LVM metadata. Holding it takes two steps:

1. join(): the local sanlock daemon acquires our host id (the mailbox host
   id) in the lockspace named after the master domain UUID, on its `ids`
   area (add_lockspace; ~3 s with io_timeout=1, about 2 x the io_timeout
   stored on disk otherwise). The daemon then renews this *delta lease*
   every 2 x io_timeout.
2. acquire(): the resource lease through a registered sanlock connection;
   the daemon releases it when that connection closes, so the process exit
   (even SIGKILL) frees the lease for the next SPM at once.

A resource lease is only valid while its host id is renewed. If renewals
fail (storage lost, daemon stuck), other hosts may take the lease over once
they see our delta lease unchanged for 8 x io_timeout + 60 s (sanlock's
host_dead_seconds); our own daemon kills the holder after 8 x io_timeout.
We must stop touching LVM before that, so:

- check() asks the daemon, every time, whether it still lists our lease,
  whether it has given up on the lockspace, and how old the last successful
  renewal is. The lease counts as valid while that age stays under
  max_renewal_age (default 6 x io_timeout, sanlock's own warning point). If
  the daemon cannot be asked (status command failing), the last confirmation
  stays good until its age would pass the bound, and no longer.
- fence() is what the SPM calls right before each LVM command: it raises
  LeaseLost once the loss is detectable. It always asks the daemon whether
  it still lists our lease (an in-process request on the registered
  connection, well under a millisecond) and reuses the renewal status read
  by the last check() if that is at most status_max_age old and still
  proves the lease valid for fence_margin seconds; otherwise it reads the
  status again, as check() does. The watchdog checks every second, so in
  steady state no fence pays for a `sanlock client status` process.
- LeaseWatchdog runs check() continuously and calls on_lost(reason) once.
  A check that does not return (sanlock daemon hung: the binding has no
  timeouts) is a loss too, once it has run past stall_timeout or past the
  point where the last confirmation expires, whichever comes first.

Loss is sticky: once lost, the lease object never reports valid again.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import NoReturn

import sanlock
from xtnd.common import cmd
from xtnd.common.ratelimit import RateLimitedLog
from xtnd.storage import sanlockutil

log = logging.getLogger("xtnd.spm.lease")

SDM_RESOURCE = "SDM"
SDM_OFFSET = 1024 * 1024  # 512-byte sector storage
DEFAULT_IO_TIMEOUT = 10

# sanlock_rv.h: the lease is held by, or being acquired by, another host.
_SANLK_ACQUIRE_IDLIVE = -243
_SANLK_ACQUIRE_OWNED = -244
_SANLK_ACQUIRE_OTHER = -245
_SANLK_ACQUIRE_OWNED_RETRY = -247
_BUSY = {_SANLK_ACQUIRE_IDLIVE, _SANLK_ACQUIRE_OWNED, _SANLK_ACQUIRE_OTHER, _SANLK_ACQUIRE_OWNED_RETRY, errno.EAGAIN}


class LeaseError(Exception):
    """sanlock refused or failed an operation on the SPM lease."""

    msg = "SPM lease error: {reason}"

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(self.msg.format(reason=reason))


class LeaseLost(LeaseError):
    """The lease is gone or cannot be confirmed: stop touching LVM now."""

    msg = "SPM lease lost: {reason}"


@dataclasses.dataclass(frozen=True)
class Owner:
    host_id: int
    generation: int
    timestamp: int


class LeaseBusy(LeaseError):
    """Another host holds the lease (owners as read from storage, if known)."""

    msg = "SPM lease busy: {reason}"

    def __init__(self, reason: str, owners: list[Owner]):
        self.owners = owners
        super().__init__(reason)


class SpmLease:
    """The SDM lease of one pool, for the local sanlock daemon."""

    def __init__(
        self,
        lockspace: str,
        host_id: int,
        ids_path: str,
        leases_path: str,
        offset: int = SDM_OFFSET,
        resource: str = SDM_RESOURCE,
        io_timeout: int = DEFAULT_IO_TIMEOUT,
        max_renewal_age: float | None = None,
        status_max_age: float = 1.0,
        fence_margin: float | None = None,
        sanlock_cmd: str = sanlockutil.SANLOCK,
        clock: Callable[[], float] = time.monotonic,
    ):
        if max_renewal_age is None:
            max_renewal_age = 6 * io_timeout
        # Past 8 x io_timeout our own daemon starts killing the holder; a
        # bound at or below a renewal period would fail healthy leases.
        if not 3 * io_timeout < max_renewal_age < 8 * io_timeout:
            raise ValueError(f"max_renewal_age must be within (3, 8) x io_timeout, not {max_renewal_age}")
        self.lockspace = lockspace
        self.host_id = host_id
        self.ids_path = ids_path
        self.leases_path = leases_path
        self.offset = offset
        self.resource = resource
        self.io_timeout = io_timeout
        self.max_renewal_age = max_renewal_age
        # fence() trusts a status read this recently...
        self.status_max_age = status_max_age
        # ...while it proves the lease valid for at least this long, enough
        # for the LVM command the fence guards to finish.
        self.fence_margin = float(io_timeout) if fence_margin is None else fence_margin
        self.sanlock_cmd = sanlock_cmd
        self._clock = clock
        # Serialises everything that uses the registered connection (two
        # threads must not interleave requests on one socket) and the state.
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._held = False
        self._lost: str | None = None
        self._valid_until = 0.0
        self._status_at = float("-inf")  # when the last good status was read
        self._status_errors = 0
        self._ratelimited = RateLimitedLog(log, interval=60.0, clock=clock)

    def __repr__(self) -> str:
        return f"<SpmLease {self.lockspace}:{self.resource} host_id={self.host_id}>"

    @property
    def _ls(self) -> bytes:
        return self.lockspace.encode()

    @property
    def _disks(self) -> list[tuple[str, int]]:
        return [(self.leases_path, self.offset)]

    @property
    def held(self) -> bool:
        return self._held and self._lost is None

    # Lockspace

    def join(self) -> None:
        """Acquire our host id in the lockspace; blocks until done."""
        start = self._clock()
        try:
            sanlock.add_lockspace(self._ls, self.host_id, self.ids_path, iotimeout=self.io_timeout)
        except sanlock.SanlockException as e:
            if e.errno != errno.EEXIST:
                raise LeaseError(f"cannot join lockspace {self.lockspace} as host {self.host_id}: {e}") from e
            # A previous SPM process left it joined: the daemon keeps it.
            log.info("already in lockspace lockspace=%s host_id=%d", self.lockspace, self.host_id)
            return
        log.info(
            "joined lockspace lockspace=%s host_id=%d elapsed=%.3f", self.lockspace, self.host_id, self._clock() - start
        )

    def leave(self) -> None:
        """Release our host id; fails if the lease is still held."""
        try:
            sanlock.rem_lockspace(self._ls, self.host_id, self.ids_path, unused=True)
        except sanlock.SanlockException as e:
            if e.errno == errno.ENOENT:
                return
            raise LeaseError(f"cannot leave lockspace {self.lockspace}: {e}") from e
        log.info("left lockspace lockspace=%s host_id=%d", self.lockspace, self.host_id)

    # Resource lease

    def acquire(self) -> None:
        """Take the lease; raise LeaseBusy if another host holds it."""
        with self._lock:
            if self._fd is None:
                # The registration lives as long as this fd: the daemon
                # releases our leases when it closes (process exit included).
                self._fd = sanlock.register()
            start = self._clock()
            try:
                sanlock.acquire(self._ls, self.resource.encode(), self._disks, slkfd=self._fd)
            except sanlock.SanlockException as e:
                if e.errno in _BUSY:
                    raise LeaseBusy(f"{self.resource} is held by another host: {e}", self._owners()) from e
                raise LeaseError(f"cannot acquire {self.resource}: {e}") from e
            self._held = True
            self._lost = None
            self._valid_until = start
            self._status_at = float("-inf")
            self._status_errors = 0
            log.info(
                "acquired lease lockspace=%s resource=%s host_id=%d elapsed=%.3f",
                self.lockspace,
                self.resource,
                self.host_id,
                self._clock() - start,
            )
            self._confirm()

    def _owners(self) -> list[Owner]:
        try:
            owners = sanlock.read_resource_owners(self._ls, self.resource.encode(), self._disks)
        except sanlock.SanlockException as e:
            log.warning("cannot read lease owners resource=%s error=%s", self.resource, e)
            return []
        return [Owner(o["host_id"], o["generation"], o["timestamp"]) for o in owners]

    def release(self) -> None:
        """Give the lease back (nothing to do if it is not held)."""
        with self._lock:
            if not self._held or self._fd is None:
                return
            self._held = False
            try:
                sanlock.release(self._ls, self.resource.encode(), self._disks, slkfd=self._fd)
            except sanlock.SanlockException as e:
                if self._lost is None:
                    raise LeaseError(f"cannot release {self.resource}: {e}") from e
                # sanlock may have dropped it already; closing the
                # registration releases whatever is left.
                log.info("lost lease not released resource=%s error=%s", self.resource, e)
                return
            log.info("released lease lockspace=%s resource=%s", self.lockspace, self.resource)

    def close(self) -> None:
        """Release the lease if held and unregister from the daemon."""
        try:
            self.release()
        finally:
            with self._lock:
                if self._fd is not None:
                    os.close(self._fd)
                    self._fd = None
                    self._held = False

    # Validity

    def check(self) -> float:
        """Confirm the lease is valid now; return how long that stays proven.

        Raises LeaseLost when it is not held, sanlock says it is gone or in
        trouble, or it could not be confirmed within max_renewal_age.
        """
        with self._lock:
            self._require_held()
            return self._confirm()

    def fence(self) -> float:
        """check(), reusing a fresh enough renewal status; see the module doc."""
        with self._lock:
            self._require_held()
            asked = self._clock()
            fresh = asked - self._status_at <= self.status_max_age
            if not fresh or self._valid_until - asked < self.fence_margin:
                return self._confirm()
            self._inquire()
            return self._valid_until - asked

    def _require_held(self) -> None:
        if self._lost is not None:
            raise LeaseLost(self._lost)
        if not self._held or self._fd is None:
            raise LeaseLost("not acquired")

    @property
    def valid_until(self) -> float:
        """Until when (clock time) the last confirmation proves the lease."""
        return self._valid_until

    def _inquire(self) -> None:
        """Lose the lease unless the daemon still lists it for us."""
        try:
            held = sanlock.inquire(slkfd=self._fd)
        except sanlock.SanlockException as e:
            # Answering needs no storage: the daemon is gone or broken.
            self._lose(f"sanlock does not answer: {e}")
        mine = [r for r in held if r["lockspace"] == self._ls and r["resource"] == self.resource.encode()]
        if not mine:
            self._lose("sanlock no longer lists the lease")

    def _confirm(self) -> float:
        asked = self._clock()
        self._inquire()
        try:
            status = sanlockutil.lockspace_status(self.lockspace, self.host_id, sanlock=self.sanlock_cmd)
        except (cmd.CommandError, ValueError) as e:
            return self._unconfirmed(asked, f"cannot read sanlock status: {e}")
        if status is None:
            self._lose("sanlock no longer lists the lockspace")
        trouble = status.trouble()
        if trouble is not None:
            self._lose(trouble)
        age = status.renewal_age
        if age > self.max_renewal_age:
            self._lose(f"last renewal {age}s ago (limit {self.max_renewal_age}s, result {status.renewal_last_result})")
        if status.renewal_last_result < 0:
            self._ratelimited.log(
                logging.WARNING, "renewal", "lease renewal failing result=%d age=%ds", status.renewal_last_result, age
            )
        self._valid_until = asked + self.max_renewal_age - age
        self._status_at = asked
        self._status_errors = 0
        return self._valid_until - asked

    def _unconfirmed(self, asked: float, reason: str) -> float:
        self._status_errors += 1
        left = self._valid_until - asked
        if left <= 0:
            self._lose(f"{reason} ({self._status_errors} errors, last confirmation expired)")
        self._ratelimited.log(logging.WARNING, "status", "lease not confirmed reason=%s valid_for=%.1fs", reason, left)
        return left

    def declare_lost(self, reason: str) -> None:
        """Mark the lease lost from outside (the watchdog's stall guard).

        Takes no lock: the thread holding it may be the one that hangs.
        """
        if self._lost is None:
            self._lost = reason
            log.error("lease lost lockspace=%s resource=%s reason=%s", self.lockspace, self.resource, reason)

    def _lose(self, reason: str) -> NoReturn:
        self.declare_lost(reason)
        assert self._lost is not None
        raise LeaseLost(self._lost)


class LeaseWatchdog:
    """Checks the lease continuously; calls on_lost(reason) once when lost.

    Two threads: the checker runs check() every `interval` seconds, waiting
    on a Condition in between, so stop() wakes it at once. The stall guard
    wakes when the running check's deadline passes: stall_timeout after it
    began, or the moment the last confirmation expires if that is sooner. A
    check still running then means sanlock (or a fence() holding the lease
    lock) hangs, and the lease counts as lost. on_lost runs in whichever
    thread saw the loss; it should make the process stop serving (the SPM
    daemon exits) and must not block for long.
    """

    # How long a check that began after the last confirmation expired may
    # run before the guard calls the lease lost (seconds).
    CHECK_GRACE = 0.5

    def __init__(
        self,
        lease: SpmLease,
        on_lost: Callable[[str], None],
        interval: float | None = None,
        stall_timeout: float | None = None,
        name: str = "spm-lease-watchdog",
    ):
        if interval is None:
            interval = min(1.0, lease.io_timeout / 2)
        if stall_timeout is None:
            stall_timeout = 2.0 * lease.io_timeout
        self.lease = lease
        self.on_lost = on_lost
        self.interval = interval
        self.stall_timeout = stall_timeout
        self.lost: str | None = None
        self._cond = threading.Condition()
        self._stopping = False
        # Monotonic start of the check in progress, None between checks.
        self._check_started: float | None = None
        # Monotonic time the guard found itself frozen past a deadline.
        self._thawed_at = 0.0
        # Monotonic end of the last successful check (the daemon's systemd
        # watchdog pings only while checks succeed).
        self.last_ok = time.monotonic()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._guard = threading.Thread(target=self._guard_run, name=f"{name}-stall", daemon=True)

    def start(self) -> None:
        log.info("lease watchdog started interval=%.2fs stall_timeout=%.1fs", self.interval, self.stall_timeout)
        self._thread.start()
        self._guard.start()

    def stop(self, timeout: float | None = None) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for thread in (self._thread, self._guard):
            if thread.is_alive() and thread is not threading.current_thread():
                thread.join(timeout)

    def step(self) -> bool:
        """Check once; False (after calling on_lost) if the lease is lost."""
        with self._cond:
            self._check_started = time.monotonic()
            self._cond.notify_all()
        try:
            self.lease.check()
        except LeaseLost as e:
            self._report(e.reason)
            return False
        finally:
            with self._cond:
                self._check_started = None
                self._cond.notify_all()
        self.last_ok = time.monotonic()
        return self.lost is None

    def _report(self, reason: str) -> None:
        with self._cond:
            if self.lost is not None:
                return
            self.lost = reason
            self._cond.notify_all()
        self.on_lost(reason)

    def _run(self) -> None:
        while self.step():
            with self._cond:
                if self._cond.wait_for(lambda: self._stopping or self.lost is not None, self.interval):
                    break
        log.info("lease watchdog stopped lost=%s", self.lost)

    def _deadline(self) -> float | None:
        if self._check_started is None:
            return None
        # valid_until is on the lease's clock, which is time.monotonic()
        # unless a test injected another one; then only stall_timeout counts.
        # Counted from the check's start, or from the moment the whole
        # process came back from a freeze (SIGSTOP, a paused VM) during it:
        # a frozen check is not a hung sanlock.
        base = max(self._check_started, self._thawed_at)
        deadline = base + self.stall_timeout
        if self.lease._clock is time.monotonic:
            # A confirmation that expired before then still gives the check a
            # moment to answer; a healthy sanlock answers in milliseconds.
            # Nothing writes meanwhile: fence() asks sanlock itself.
            grace = base + min(self.stall_timeout, self.CHECK_GRACE)
            deadline = min(deadline, max(self.lease.valid_until, grace))
        return deadline

    def _guard_run(self) -> None:
        woke_for: float | None = None
        with self._cond:
            while not self._stopping and self.lost is None:
                deadline = self._deadline()
                now = time.monotonic()
                if deadline is not None and now - deadline > self.CHECK_GRACE and deadline == woke_for:
                    # The guard overslept its own deadline: the process was
                    # frozen, not the check. Judge the check from now on.
                    self._thawed_at = now
                    log.warning("lease guard woke %.1fs late (process frozen); rechecking", now - deadline)
                    deadline = self._deadline()
                if deadline is not None and now >= deadline:
                    started = self._check_started
                    assert started is not None
                    break
                woke_for = deadline
                self._cond.wait(None if deadline is None else deadline - now)
            else:
                return
        # Outside the lock: on_lost may exit the process or take a while.
        reason = f"lease check stalled for {now - started:.1f}s (sanlock not answering)"
        self.lease.declare_lost(reason)
        self._report(reason)
