"""Serving extend requests: validate, then lvextend under the lease.

Called by the mailbox's worker threads (one call per request, the return
value is the size granted in MiB, raising means a failure reply):

1. one lock per volume: extends of different volumes run in parallel, a
   second request for a volume waits for the first and then finds the
   volume already large enough (idempotent, no LVM command);
2. validation, before LVM is touched: a managed domain, a known volume
   that is an xtnd volume (not ids/leases/inbox/outbox or an LV xtnd did
   not make), a size not above the volume's max size (capacity x 1.1); a
   size at or below the current one is answered at once with the current
   size; a file domain volume needs nothing (files grow by themselves);
3. lease.fence() immediately before the lvextend: if the lease is gone the
   command is not run, no reply is given, and on_fenced (the daemon's exit)
   runs;
4. one completion line per request (key=value, timing breakdown) and the
   metrics.

While the daemon shuts down (drain()), new requests are parked: they touch
no LVM and the handler raises NoReply, so this SPM never answers them and
the next SPM serves them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator

from xtnd import lvm
from xtnd.common import faults, history, logfmt
from xtnd.common.units import round_up
from xtnd.mailbox.spm import NoReply, Request
from xtnd.storage import constants as c

from . import domains as doms
from .lease import LeaseLost
from .metrics import Metrics

log = logging.getLogger("xtnd.spm.extend")

MiB = c.MiB


class Refused(Exception):
    """A request that fails validation: failure reply, no LVM command.

    kind: a short fixed name of the reason (a metrics label)."""

    def __init__(self, reason: str, kind: str):
        self.reason = reason
        self.kind = kind
        super().__init__(reason)


class ExtendFailed(Exception):
    """LVM could not extend (no free extents, command failed)."""

    def __init__(self, reason: str, kind: str):
        self.reason = reason
        self.kind = kind
        super().__init__(reason)


class Parked(Exception):
    """The SPM is shutting down: the request is left for the next SPM."""


@dataclasses.dataclass
class _Timing:
    received: float
    started: float
    locked: float = 0.0
    validated: float = 0.0
    fence: float = 0.0
    fenced: bool = False
    lvextend: float | None = None
    done: float = 0.0


class _VolumeLocks:
    """One lock per volume, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._locks: dict[tuple[uuidlib.UUID, uuidlib.UUID], tuple[threading.Lock, int]] = {}

    @contextlib.contextmanager
    def hold(self, key: tuple[uuidlib.UUID, uuidlib.UUID]) -> Iterator[None]:
        with self._lock:
            lock, users = self._locks.get(key, (threading.Lock(), 0))
            self._locks[key] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._lock:
                lock, users = self._locks[key]
                if users == 1:
                    del self._locks[key]
                else:
                    self._locks[key] = (lock, users - 1)


class ExtendService:
    def __init__(
        self,
        registry: doms.DomainRegistry,
        fence: Callable[[], object],
        on_fenced: Callable[[str], None],
        metrics: Metrics | None = None,
        alloc: str = "",
        clock: Callable[[], float] = time.monotonic,
    ):
        self.registry = registry
        self.metrics = metrics or Metrics()
        self._fence = fence
        self._on_fenced = on_fenced
        self._alloc = alloc or None
        self._clock = clock
        self.volume_locks = _VolumeLocks()
        self._cond = threading.Condition()
        self._running = 0
        self._draining = False
        self._parked = 0
        # Called with (domain, volume, old size, new size) after each lvextend (the forecast).
        self.on_extended: Callable[[uuidlib.UUID, uuidlib.UUID, int, int], None] | None = None

    # Shutdown

    def drain(self, timeout: float) -> bool:
        """Take no new request; wait for those running. True if none is left."""
        with self._cond:
            self._draining = True
            done = self._cond.wait_for(lambda: self._running == 0, timeout)
            log.info("extends drained done=%s running=%d parked=%d", done, self._running, self._parked)
            return done

    @contextlib.contextmanager
    def operation(self) -> Iterator[None]:
        """Count a volume command as running (drain waits for it); refuse while draining."""
        with self._cond:
            if self._draining:
                raise Parked("the SPM is stopping")
            self._running += 1
        try:
            yield
        finally:
            with self._cond:
                self._running -= 1
                self._cond.notify_all()

    @property
    def running(self) -> int:
        with self._cond:
            return self._running

    @property
    def parked(self) -> int:
        with self._cond:
            return self._parked

    def fence(self) -> None:
        """lease.fence(); on loss call on_fenced (it may exit the process)."""
        try:
            self._fence()
        except LeaseLost as e:
            self._on_fenced(e.reason)
            raise

    # The mailbox handler

    def handle(self, req: Request) -> int:
        with self._cond:
            if self._draining:
                self._parked += 1
                # Never answered by this SPM: the next one serves it.
                raise NoReply("the SPM is stopping")
            self._running += 1
        try:
            return self._handle(req)
        finally:
            with self._cond:
                self._running -= 1
                self._cond.notify_all()

    def _handle(self, req: Request) -> int:
        msg = req.message
        t = _Timing(received=req.received, started=self._clock())
        self.metrics.started()
        result, granted, reason, kind = "failed", 0, "", ""
        try:
            with self.volume_locks.hold((msg.domain, msg.volume)):
                t.locked = self._clock()
                result, granted = self._extend(msg.domain, msg.volume, msg.size_mb, t)
            return granted
        except (Refused, ExtendFailed) as e:
            result, reason, kind = "refused" if isinstance(e, Refused) else "failed", e.reason, e.kind
            raise
        except LeaseLost as e:
            result, reason, kind = "fenced", e.reason, "lease_lost"
            raise
        except Exception as e:
            result, reason, kind = "failed", f"{type(e).__name__}: {e}", "error"
            raise
        finally:
            t.done = self._clock()
            if not t.locked:
                t.locked = t.done
            if not t.validated:
                t.validated = t.done
            self._log_done(req, result, granted, reason, kind, t)

    def _log_done(self, req: Request, result: str, granted: int, reason: str, kind: str, t: _Timing) -> None:
        msg = req.message

        def ms(seconds: float) -> float:
            return round(seconds * 1000, 3)

        lvx = ms(t.lvextend) if t.lvextend is not None else None
        total = ms(t.done - t.received)
        phases = {
            "queue": ms(t.started - t.received),
            "lock": ms(t.locked - t.started),
            "validate": ms(t.validated - t.locked),
        }
        if t.fenced:
            phases["fence"] = ms(t.fence)
        if lvx is not None:
            phases["lvextend"] = lvx
        self.metrics.finished(result, total, lvx, phases, kind)
        history.record("done", host=req.host_id, slot=req.slot, volume=str(msg.volume), size_mb=msg.size_mb,
                       result=result, granted=granted, reason=reason)
        level = logging.INFO if result in ("extended", "noop") else logging.WARNING
        log.log(
            level,
            "extend done result=%s domain=%s volume=%s host_id=%d slot=%d size_mb=%d granted_mb=%d "
            "queue_ms=%.3f lock_ms=%.3f validate_ms=%.3f fence_ms=%.3f lvextend_ms=%.3f total_ms=%.3f%s",
            result,
            msg.domain,
            msg.volume,
            req.host_id,
            req.slot,
            msg.size_mb,
            granted,
            ms(t.started - t.received),
            ms(t.locked - t.started),
            ms(t.validated - t.locked),
            ms(t.fence),
            lvx or 0.0,
            total,
            f" reason={logfmt.value(reason)}" if reason else "",
        )

    def _extend(self, domain: uuidlib.UUID, volume: uuidlib.UUID, size_mb: int, t: _Timing) -> tuple[str, int]:
        try:
            managed = self.registry.get(domain)
        except doms.DomainNotManaged as e:
            raise Refused(str(e), "unmanaged_domain") from None
        size = size_mb * MiB
        if not managed.is_block:
            # File volumes grow by themselves; only check the volume exists.
            try:
                info = managed.domain.volume_info(volume)
            except Exception as e:  # noqa: BLE001 - any lookup failure refuses the request
                raise Refused(f"unknown volume: {e}", "unknown_volume") from None
            t.validated = self._clock()
            if size > info.max_size:
                raise Refused(f"size {size} above max size {info.max_size} of volume {volume}", "above_max_size")
            return "noop", size_mb
        try:
            lv = managed.lookup(volume)
        except lvm.LVMError as e:
            raise ExtendFailed(f"cannot list volumes of domain {domain}: {e}", "lvm_list") from None
        if lv is None:
            raise Refused(f"unknown volume {volume} in domain {domain}", "unknown_volume")
        if lv.kind != doms.VOLUME:
            raise Refused(f"{lv.kind} LV {lv.name} in domain {domain} is not an extendable volume", "not_a_volume")
        if size > lv.max_size:
            raise Refused(
                f"size {size} above max size {lv.max_size} of volume {volume} (capacity {lv.capacity})",
                "above_max_size",
            )
        t.validated = self._clock()
        if size <= lv.size:
            return "noop", lv.size // MiB
        block = managed.block
        target = round_up(size, lv.extent_size)
        start = self._clock()
        t.fenced = True
        self.fence()
        t.fence = self._clock() - start
        faults.point("spm.before_lvextend")
        start = self._clock()
        history.record("lvm_start", cmd="lvextend", vg=block.vg, lv=lv.name, size=target)
        ok = False
        try:
            new_size = lvm.lvextend(block.runner, block.vg, lv.name, target, self._alloc)
            ok = True
        except lvm.NotEnoughFreeExtents as e:
            raise ExtendFailed(
                f"no free space in domain {domain}: needed={e.needed} free={e.free} extents", "no_space"
            ) from None
        except lvm.LVNotFound:
            managed.invalidate()
            raise Refused(f"volume {volume} disappeared from domain {domain}", "unknown_volume") from None
        except lvm.LVMError as e:
            managed.invalidate()
            raise ExtendFailed(f"lvextend failed: {e}", "lvextend") from None
        finally:
            t.lvextend = self._clock() - start
            history.record("lvm_done", cmd="lvextend", vg=block.vg, lv=lv.name, size=target, ok=ok)
        faults.point("spm.after_lvextend")
        managed.update_size(volume, new_size)
        if self.on_extended is not None:
            self.on_extended(domain, volume, lv.size, new_size)
        return "extended", new_size // MiB
