"""HSM side of the mailbox: send extend requests, wait for the SPM's replies.

One thread ("mailbox-hsm") owns this host's inbox block and reads this
host's outbox block. Callers only touch the request queue, under a lock.

Slot handshake (mailbox/PROTOCOL.md §2), per request:

    QUEUED   waiting for one of the 63 slots
    SENT     request written to slot i (then an event block); waiting for
             outbox slot i to change to a reply for the same volume
    CLEANING reply taken, clean message written to slot i; waiting for the
             SPM to echo the clean message into outbox slot i
    (free)   slot i zeroed

Storage I/O happens only while requests are in flight: the outbox block is
polled at ``poll_min`` right after a write, then at ``poll_growth`` times the
time waited so far (so polling adds at most that fraction to a roundtrip),
never slower than ``poll_max``. An idle host reads and writes nothing.

Resend: a request still unanswered after ``reoffer_timeout`` moves to
another free slot (old slot zeroed in the same block write). The SPM ignores
a slot whose bytes did not change, so an identical rewrite of the same slot
would be invisible to it; a move is not. Extends name absolute sizes, so a
request served twice is harmless.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future

from xtnd.common import history
from xtnd.common.waker import Waker

from . import codec
from .directio import Storage, StorageError

log = logging.getLogger("xtnd.mailbox.hsm")


class MailboxError(Exception):
    """Base class of HSM mailbox errors."""


class ExtendFailed(MailboxError):
    """The SPM replied with size 0: it could not extend the volume."""

    def __init__(self, msg: codec.Extend):
        self.request = msg
        super().__init__(f"SPM failed to extend domain={msg.domain} volume={msg.volume} to {msg.size_mb} MiB")


class MailboxStopped(MailboxError):
    """The mailbox stopped before the request was answered."""


@dataclasses.dataclass
class HSMConfig:
    # Delay before the first outbox read after writing a request (seconds).
    poll_min: float = 0.001
    # Poll delay as a fraction of the time waited since the last change.
    poll_growth: float = 0.2
    # Longest delay between outbox reads while requests are in flight.
    poll_max: float = 0.05
    # A request with no reply after this long is offered again (seconds).
    reoffer_timeout: float = 30.0
    # A clean message not echoed after this long frees the slot anyway.
    clean_timeout: float = 30.0
    # Delay between retries after a storage error (seconds).
    error_backoff: float = 1.0


class Phase(enum.Enum):
    QUEUED = "queued"
    SENT = "sent"
    CLEANING = "cleaning"


@dataclasses.dataclass(eq=False)
class _Request:
    msg: codec.Extend
    raw: bytes
    future: Future[int]
    submitted: float
    phase: Phase = Phase.QUEUED
    slot: int = -1
    sent_at: float = 0.0
    reoffers: int = 0

    @property
    def key(self) -> tuple[uuid.UUID, uuid.UUID, int]:
        return (self.msg.domain, self.msg.volume, self.msg.size_mb)


class HSMMailbox:
    """Extend requests from one host (``host_id``) through the mailbox."""

    def __init__(
        self,
        inbox: Storage,
        outbox: Storage,
        host_id: int,
        config: HSMConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        if host_id < 1:
            raise ValueError(f"host ids start at 1, got {host_id}")
        for area in (inbox, outbox):
            if area.size < (host_id + 1) * codec.BLOCK_SIZE:
                raise ValueError(f"{area.path} too small for host id {host_id}: {area.size} bytes")
        self.host_id = host_id
        self.config = config or HSMConfig()
        self._inbox = inbox
        self._outbox = outbox
        self._offset = host_id * codec.BLOCK_SIZE
        self._clock = clock
        self._cond = threading.Condition()
        self._queue: deque[_Request] = deque()
        self._by_key: dict[tuple[uuid.UUID, uuid.UUID, int], _Request] = {}
        self._slots: list[_Request | None] = [None] * codec.MESSAGES_PER_BLOCK
        self._block = bytearray(codec.BLOCK_SIZE)
        self._seen = codec.EMPTY_BLOCK  # last outbox block read
        self._dirty = False  # the block changed since it was last written
        self._writing = False  # a write of the block is under way
        self._waker = Waker()  # submit() and stop() wake the mailbox thread
        self._stopping = False
        self._halted = False  # halt(): the block may be another host's now
        self._thread: threading.Thread | None = None
        self.stats = {"submitted": 0, "joined": 0, "replies": 0, "failures": 0, "reoffers": 0, "errors": 0}

    # Public API

    def start(self) -> None:
        """Clear this host's block and start serving requests.

        The current outbox block becomes the baseline: replies left there by
        an earlier run are not taken as answers to new requests.
        """
        self._seen = self._outbox.read(self._offset, codec.BLOCK_SIZE)
        self._inbox.write(self._offset, codec.EMPTY_BLOCK)
        self._thread = threading.Thread(target=self._run, name=f"mailbox-hsm-{self.host_id}", daemon=True)
        self._thread.start()
        log.info("HSM mailbox started host_id=%d inbox=%s outbox=%s", self.host_id, self._inbox.path, self._outbox.path)

    @property
    def alive(self) -> bool:
        """The mailbox thread runs (the daemon's systemd watchdog checks it)."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop at once; pending requests fail with MailboxStopped."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._waker.wake()
        if self._thread:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("HSM mailbox thread did not stop in %.1fs", timeout)
                return
        self._waker.close()

    def halt(self) -> None:
        """Stop without writing this host's block again, not even to clear
        it: the host id is no longer ours, so the block may be another
        host's. Pending requests fail with MailboxStopped; stop() still
        joins the thread. Does not wait: a write already under way ends.
        """
        with self._cond:
            self._halted = True
            self._stopping = True
            self._cond.notify_all()
        self._waker.wake()
        log.warning("HSM mailbox halted, no more writes host_id=%d", self.host_id)

    @property
    def halted(self) -> bool:
        return self._halted

    def submit(self, domain: uuid.UUID, volume: uuid.UUID, size: int) -> Future[int]:
        """Ask the SPM to extend ``volume`` to ``size`` bytes (rounded up to MiB).

        The future resolves to the size granted in bytes, or raises
        ExtendFailed. A request identical to one in flight joins it.
        """
        msg = codec.Extend.for_bytes(domain, volume, size)
        raw = codec.encode(msg)
        with self._cond:
            if self._stopping:
                raise MailboxStopped("mailbox is stopping")
            key = (msg.domain, msg.volume, msg.size_mb)
            req = self._by_key.get(key)
            if req is not None:
                self.stats["joined"] += 1
                return req.future
            req = _Request(msg, raw, Future(), self._clock())
            req.future.set_running_or_notify_cancel()
            self._by_key[key] = req
            self._queue.append(req)
            self.stats["submitted"] += 1
        history.record("sent", host=self.host_id, volume=str(msg.volume), size_mb=msg.size_mb)
        self._waker.wake()
        log.debug("submit domain=%s volume=%s size_mb=%d", domain, volume, msg.size_mb)
        return req.future

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until nothing is queued, in flight, being cleaned or unwritten."""
        with self._cond:
            return self._cond.wait_for(
                lambda: not (self._queue or self._active() or self._dirty or self._writing), timeout
            )

    @property
    def in_flight(self) -> int:
        with self._cond:
            return len(self._by_key)

    # The mailbox thread

    def _run(self) -> None:
        cfg = self.config
        last_change = self._clock()
        try:
            while True:
                with self._cond:
                    if self._stopping:
                        break
                    self._assign_slots()
                    busy = self._dirty or self._active()
                if not busy:
                    self._waker.wait(3600)  # idle: no storage I/O at all
                    continue
                try:
                    wrote = self._flush()
                    changed = self._check_replies() if self._active() else False
                    wrote |= self._flush()
                except StorageError as e:
                    self.stats["errors"] += 1
                    log.warning("mailbox storage error host_id=%d: %s", self.host_id, e)
                    self._waker.wait(cfg.error_backoff)
                    continue
                now = self._clock()
                if wrote or changed:
                    last_change = now
                if self._active():
                    self._waker.wait(min(max(cfg.poll_min, (now - last_change) * cfg.poll_growth), cfg.poll_max))
        finally:
            self._shutdown()

    def _active(self) -> bool:
        return any(r is not None for r in self._slots)

    def _assign_slots(self) -> None:
        """Move queued requests into free slots (called with the lock held)."""
        now = self._clock()
        while self._queue:
            i = self._free_slot()
            if i is None:
                return
            req = self._queue.popleft()
            self._place(req, i, now)

    def _free_slot(self, avoid: int = -1) -> int | None:
        # Prefer a slot whose outbox side is empty or clean: a stale reply
        # there could otherwise be mistaken for an answer to the same volume.
        fallback = None
        for i, r in enumerate(self._slots):
            if r is not None or i == avoid:
                continue
            out = codec.slot(self._seen, i)
            if codec.is_empty(out) or out == codec.CLEAN_MESSAGE:
                return i
            if fallback is None:
                fallback = i
        return fallback

    def _place(self, req: _Request, i: int, now: float) -> None:
        req.phase = Phase.SENT
        req.slot = i
        req.sent_at = now
        self._slots[i] = req
        codec.put_slot(self._block, i, req.raw)
        self._dirty = True

    def _flush(self) -> bool:
        """Write this host's block and an event if anything changed."""
        with self._cond:
            if not self._dirty or self._halted:
                return False
            self._dirty = False
            self._writing = True
            codec.seal(self._block)
            data = bytes(self._block)
        try:
            self._inbox.write(self._offset, data)
            self._inbox.write(0, codec.encode_event())
        except StorageError:
            with self._cond:
                self._dirty = True
            raise
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()  # wake wait_idle()
        return True

    def _check_replies(self) -> bool:
        block = self._outbox.read(self._offset, codec.BLOCK_SIZE)
        now = self._clock()
        changed = False
        done: list[tuple[_Request, int]] = []
        with self._cond:
            if block != self._seen:
                for i, req in enumerate(self._slots):
                    if req is None:
                        continue
                    new = codec.slot(block, i)
                    if new == codec.slot(self._seen, i):
                        continue
                    changed = True
                    result = self._on_reply(req, i, new, now)
                    if result is not None:
                        done.append((req, result))
                self._seen = block
            self._check_timeouts(now)
        for req, size_mb in done:
            self._complete(req, size_mb)
        return changed

    def _on_reply(self, req: _Request, i: int, raw: bytes, now: float) -> int | None:
        """Handle a changed outbox slot; return the granted size if answered."""
        try:
            msg = codec.decode(raw)
        except codec.MessageError as e:
            log.warning("undecodable reply host_id=%d slot=%d: %s", self.host_id, i, e.reason)
            return None
        if req.phase is Phase.SENT:
            if isinstance(msg, codec.Extend) and msg.same_volume(req.msg):
                req.phase = Phase.CLEANING
                req.sent_at = now
                codec.put_slot(self._block, i, codec.CLEAN_MESSAGE)
                self._dirty = True
                return msg.size_mb
            if isinstance(msg, codec.Extend):
                log.warning(
                    "reply for another volume host_id=%d slot=%d expected=%s got=%s",
                    self.host_id,
                    i,
                    req.msg.volume,
                    msg.volume,
                )
        elif req.phase is Phase.CLEANING and isinstance(msg, codec.Clean):
            self._release(i)
        return None

    def _check_timeouts(self, now: float) -> None:
        for i, req in enumerate(self._slots):
            if req is None:
                continue
            if req.phase is Phase.SENT and now - req.sent_at > self.config.reoffer_timeout:
                j = self._free_slot(avoid=i)
                if j is None:
                    continue
                log.warning(
                    "no reply after %.1fs, re-offering host_id=%d volume=%s slot=%d->%d",
                    now - req.sent_at,
                    self.host_id,
                    req.msg.volume,
                    i,
                    j,
                )
                self._release(i)
                req.reoffers += 1
                self.stats["reoffers"] += 1
                self._place(req, j, now)
            elif req.phase is Phase.CLEANING and now - req.sent_at > self.config.clean_timeout:
                log.warning(
                    "clean not echoed after %.1fs, freeing host_id=%d slot=%d", now - req.sent_at, self.host_id, i
                )
                self._release(i)

    def _release(self, i: int) -> None:
        self._slots[i] = None
        codec.put_slot(self._block, i, codec.EMPTY_MESSAGE)
        self._dirty = True
        self._cond.notify_all()  # wake wait_idle()

    def _complete(self, req: _Request, size_mb: int) -> None:
        with self._cond:
            self._by_key.pop(req.key, None)
        elapsed = self._clock() - req.submitted
        history.record("taken", host=self.host_id, volume=str(req.msg.volume), size_mb=req.msg.size_mb,
                       granted=size_mb)
        if size_mb == 0:
            self.stats["failures"] += 1
            log.warning("extend failed domain=%s volume=%s size_mb=%d elapsed=%.3f", req.msg.domain, req.msg.volume,
                        req.msg.size_mb, elapsed)
            req.future.set_exception(ExtendFailed(req.msg))
            return
        self.stats["replies"] += 1
        if size_mb < req.msg.size_mb:
            log.warning("SPM granted less than asked volume=%s asked_mb=%d granted_mb=%d", req.msg.volume,
                        req.msg.size_mb, size_mb)
        log.debug("reply volume=%s size_mb=%d elapsed=%.3f", req.msg.volume, size_mb, elapsed)
        req.future.set_result(size_mb * codec.MiB)

    def _shutdown(self) -> None:
        with self._cond:
            pending = list(self._by_key.values())
            self._by_key.clear()
            self._queue.clear()
            self._slots = [None] * codec.MESSAGES_PER_BLOCK
        for req in pending:
            if not req.future.done():
                req.future.set_exception(MailboxStopped("mailbox stopped before the reply"))
        try:
            if not self._halted:
                self._inbox.write(self._offset, codec.EMPTY_BLOCK)
        except StorageError as e:
            log.error("cannot clear host block on stop host_id=%d: %s", self.host_id, e)
        with self._cond:
            self._cond.notify_all()  # wake wait_idle()
        log.info("HSM mailbox stopped host_id=%d", self.host_id)
