"""SPM side of the mailbox: scan every host's requests, reply in the outbox.

One I/O thread ("mailbox-spm") owns all mailbox storage I/O:

- it polls the event block (4 KiB) every ``event_interval`` while mail came
  in the last ``active_window`` seconds, else every ``idle_event_interval``
  (each timed wake-up costs ~0.1-0.15 ms of CPU on our VMs, so an idle
  SPM polls slowly: 40 wake-ups a second cost ~0.85% of a core); when the
  event id changes, or every ``scan_interval`` anyway (vdsm HSMs of older
  versions write no events), it scans the whole inbox for new messages
  (inbox.InboxView: checksums, changed slots, reads overlapped);
- new requests go to a bounded pool of worker threads, which decode them
  and run the handler registered for the opcode, so a slow extend never
  blocks the scan and decoding overlaps the I/O thread's reads and writes;
- workers hand replies back; the I/O thread echoes clean messages and
  writes the touched host blocks of the outbox, adjacent ones in one write
  (outbox.OutboxImage): a wave's cost follows its I/Os, not its hosts;
- ``waves``: recent waves (waves.Wave), from the read that saw new mail
  while nothing was in flight to the write that left nothing in flight:
  service time, and its scans, bytes read, writes and CPU.

A reply is written only if the request is still in its slot: a request the
HSM withdrew or moved meanwhile gets no stale reply.

On start the outbox is zeroed and the previous view of the inbox is taken as
all zeros, so every pending request is served again after a restart or a
failover (safe: extends name absolute sizes).
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Callable

from xtnd.common import faults, history
from xtnd.common.ratelimit import RateLimitedLog
from xtnd.common.waker import Waker

from . import codec
from .directio import Storage, StorageError
from .inbox import InboxView, Reader
from .outbox import OutboxImage
from .spmtypes import Handler, NoReply, Request, SPMConfig
from .waves import ThreadTimes, Wave, thread_times

__all__ = ["Handler", "NoReply", "Request", "SPMConfig", "SPMMailbox", "Wave"]

log = logging.getLogger("xtnd.mailbox.spm")

# An xtnd request as the scan found it: host id, slot, its 64 bytes, when.
# The worker that serves it decodes it: that Python work (~5 us a request)
# overlaps the I/O thread's reads and writes instead of following them.
_Found = tuple[int, int, bytes, float]
# A reply for the I/O thread: host id, slot, the request's bytes (still in
# its slot?), the reply's bytes, and the request decoded (None if it was
# malformed).
_Reply = tuple[int, int, bytes, bytes, codec.Extend | None]
_EXTEND_HEAD = codec.VERSION + codec.EXTEND_OPCODE


class SPMMailbox:
    """Serve every host's requests through the mailbox."""

    def __init__(
        self,
        inbox: Storage,
        outbox: Storage,
        max_hosts: int,
        config: SPMConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.max_hosts = max_hosts
        self.config = config or SPMConfig()
        self._length = (max_hosts + 1) * codec.BLOCK_SIZE
        for area in (inbox, outbox):
            if area.size < self._length:
                raise ValueError(f"{area.path} too small for {max_hosts} hosts: {area.size} bytes")
        self._inbox = inbox
        self._outbox = outbox
        self._clock = clock
        self._handlers: dict[bytes, Handler] = {}
        self._image = OutboxImage(max_hosts)
        self._next_scan = 0.0
        self._last_mail = -1e9
        self._lock = threading.Lock()
        self._waker = Waker()
        self._replies: list[_Reply] = []
        # Replies handed in so far, taken by the I/O thread, and on storage:
        # flush() waits for "written" to reach "handed".
        self._handed = 0
        self._taken = 0
        self._written = 0
        self._flushed = threading.Condition(self._lock)
        self._flush_waiters = 0
        # Requests dispatched and not yet handed back (or withheld).
        self._active = 0
        self._intake = True
        self._work: queue.SimpleQueue[_Found | None] = queue.SimpleQueue()
        self._batch: list[_Found] = []  # found by the scan under way
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self._rlog = RateLimitedLog(log, self.config.log_interval, clock)
        self.stats = {
            "scans": 0,
            "event_reads": 0,
            "requests": 0,
            "replies": 0,
            "failures": 0,
            "dropped": 0,
            "withheld": 0,
            "bad_blocks": 0,
            "errors": 0,
            "outbox_writes": 0,
        }
        # Recent waves: service seconds, requests, messages answered, and
        # where the time went (waves.Wave).
        self.waves: collections.deque[Wave] = collections.deque(maxlen=4096)
        self._wave_start: float | None = None
        self._wave_requests = 0
        self._wave_messages = 0
        self._wave_intake = 0.0  # end of the last scan that found a request
        # At the wave's start: thread times, and (inbox bytes read, outbox
        # writes, scans, handler seconds) so far.
        self._wave_times = ThreadTimes(0.0, 0.0, 0.0)
        self._wave_counts: tuple[int, int, int, float] = (0, 0, 0, 0.0)
        self._handler_seconds = 0.0
        self._view = InboxView(inbox, max_hosts, self.config.scan_chunk, self._rlog, self.stats)
        # Called with the duration of each full inbox scan (metrics).
        self.on_scan: Callable[[float], None] | None = None

    def register(self, opcode: bytes, handler: Handler) -> None:
        """Serve messages with ``opcode`` (4 ASCII bytes) with ``handler``."""
        if len(opcode) != 4:
            raise ValueError(f"opcode must be 4 bytes: {opcode!r}")
        self._handlers[opcode] = handler

    # Life cycle

    def reset(self) -> None:
        """Zero the outbox and forget the inbox: every pending request is new."""
        self._outbox.write(0, bytes(self._length))
        self._view.forget()
        self._image.clear()
        self._wave_start = None
        self._next_scan = self._clock()  # serve pending requests at once

    def start(self) -> None:
        """Reset, then start scanning and serving in threads."""
        self.reset()
        self._view.reader = Reader(self._inbox)
        io = threading.Thread(target=self._run, name="mailbox-spm", daemon=True)
        self._threads = [io] + [
            threading.Thread(target=self._worker, name=f"mailbox-spm-worker-{n}", daemon=True)
            for n in range(self.config.workers)
        ]
        for t in self._threads:
            t.start()
        log.info("SPM mailbox started max_hosts=%d inbox=%s outbox=%s", self.max_hosts, self._inbox.path,
                 self._outbox.path)

    def flush(self, timeout: float) -> bool:
        """Wait until every reply handed in so far is written to the outbox.

        For a clean stop: once the handlers have finished (the SPM daemon
        drains them first), flush() and then stop() lose no reply. False if
        the I/O thread did not write them within timeout (storage trouble)
        or the mailbox is stopping.
        """
        self._waker.wake()
        with self._flushed:

            def done() -> bool:
                return self._active == 0 and self._written >= self._handed

            self._flush_waiters += 1
            try:
                return self._flushed.wait_for(lambda: done() or self._stopping, timeout) and done()
            finally:
                self._flush_waiters -= 1

    def quiesce(self) -> int:
        """Take no new requests; keep writing replies of those dispatched.

        Requests still queued for a worker are dropped unanswered (the next
        SPM serves them). Returns how many were dropped. Then flush() waits
        for the running ones.
        """
        dropped = 0
        with self._flushed:
            self._intake = False
            while True:
                try:
                    req = self._work.get_nowait()
                except queue.Empty:
                    break
                if req is not None:
                    dropped += 1
                    self._active -= 1
            self._flushed.notify_all()
        log.info("SPM mailbox takes no new requests dropped_queued=%d running=%d", dropped, self._active)
        return dropped

    def stop(self, timeout: float = 10.0) -> None:
        """Stop scanning at once; replies not yet written are dropped (see flush)."""
        with self._lock:
            self._stopping = True
        self._waker.wake()
        for _ in range(self.config.workers):
            self._work.put(None)
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                log.warning("thread %s still running after stop", t.name)
        self._threads = []
        if self._view.reader is not None:
            self._view.reader.close()
            self._view.reader = None
        log.info("SPM mailbox stopped")

    # The I/O thread

    def _run(self) -> None:
        self._warm_up()
        while True:
            with self._lock:
                if self._stopping:
                    return
            try:
                self.step()
            except StorageError as e:
                self.stats["errors"] += 1
                self._rlog.log(logging.ERROR, "storage", "mailbox storage error: %s", e)
                self._sleep(self.config.error_backoff)
                continue
            active = self._clock() - self._last_mail < self.config.active_window
            self._sleep(self.config.event_interval if active else self.config.idle_event_interval)

    def _warm_up(self) -> None:
        """Write the host blocks of the outbox image (zeros, as reset()
        left storage) once from this thread: its write buffer is per thread
        and grows to the longest write, and growing it to 8 MiB in a
        2000-host pool's first wave cost that wave ~2000 page faults (~5 ms
        of CPU here). Block 0 is left alone: a resize notice may be there
        already (mailbox/notice.py writes it from another thread)."""
        try:
            with self._lock:
                if self._image.dirty or self._stopping or self.max_hosts < 1:
                    return
                self._outbox.write(codec.BLOCK_SIZE, memoryview(self._image.data)[codec.BLOCK_SIZE :])
        except StorageError as e:
            log.warning("outbox warm-up write failed: %s", e)

    def _sleep(self, timeout: float) -> None:
        with self._lock:
            if self._stopping or self._replies:
                return
        self._waker.wait(timeout)

    def step(self) -> None:
        """One round: write replies, check for mail, write what that produced."""
        self._take_replies()
        self._write_dirty()
        now = self._clock()
        began = time.monotonic()
        if self._intake and (now >= self._next_scan or self._event_changed()):
            self.scan(began)
        self._take_replies()
        self._write_dirty()

    def _event_changed(self) -> bool:
        if not self._view.event_changed():
            return False
        self._last_mail = self._clock()
        return True

    @property
    def active(self) -> bool:
        """True while polling fast because mail came recently."""
        return self._clock() - self._last_mail < self.config.active_window

    def scan(self, began: float | None = None) -> None:
        """Read the whole inbox once and dispatch everything new in it.

        ``began``: when the read that led here started (wave timing).
        """
        began = time.monotonic() if began is None else began
        if self._wave_start is None:
            self._wave_start = began
            self._wave_times = thread_times()
            self._wave_counts = self._counts()
        requests = self._wave_requests
        now = self._clock()
        self._next_scan = now + self.config.scan_interval
        for found in self._view.scan():
            for host, i, raw in found:
                if raw == codec.CLEAN_MESSAGE:
                    self._put_reply(host, i, raw)
                else:
                    self._dispatch(host, i, raw, now)
            # Each chunk's requests go to the workers before the next is
            # scanned, and the replies they made so far go out: the write
            # overlaps their work instead of following it (a few writes per
            # wave, not one per host). Step mode (no workers) writes in step().
            self._dispatch_batch()
            if self.config.workers:
                self._take_replies()
                self._write_dirty(in_scan=True)
        # Counted once its reads are done, like event_reads and outbox_writes:
        # every I/O a counter shows has reached the storage (xtnd inject's
        # FUSE scenarios compare them with what the storage saw).
        self.stats["scans"] += 1
        if self._wave_requests != requests:
            self._wave_intake = time.monotonic()
        if self._wave_start == began and not (self._wave_requests or self._wave_messages) and self._idle():
            self._wave_start = None  # nothing new: no wave began
        if self.on_scan is not None:
            self.on_scan(time.monotonic() - began)

    def _dispatch(self, host: int, i: int, raw: bytes, now: float) -> None:
        if raw[:5] == _EXTEND_HEAD and codec.EXTEND_OPCODE in self._handlers:
            # An xtnd request, well formed or not: a worker decodes and
            # serves it (a malformed one gets a failure reply).
            self.stats["requests"] += 1
            self._wave_requests += 1
            found = (host, i, raw, now)
            if self.config.workers == 0:
                with self._lock:
                    self._active += 1
                self._serve(found)
            else:
                self._batch.append(found)
            return
        try:
            msg = codec.decode(raw)
        except codec.MessageError as e:
            head = codec.decode_head(raw)
            self._rlog.log(logging.WARNING, ("malformed", host), "malformed message host_id=%d slot=%d: %s", host, i,
                           e)
            if head is not None:  # a broken xtnd request: tell the requester
                self._put_reply(host, i, codec.encode_reply(raw, 0))
            return
        if not isinstance(msg, codec.Extend):
            opcode = msg.opcode if isinstance(msg, codec.Unknown) else b"?"
            self._rlog.log(logging.WARNING, ("opcode", opcode), "unknown opcode %r host_id=%d slot=%d", opcode, host,
                           i)
            return
        # An extend request here has no handler (else it went to a worker).
        self._rlog.log(logging.WARNING, "no-handler", "no handler for extend requests, host_id=%d slot=%d", host, i)

    def _dispatch_batch(self) -> None:
        """Hand the requests a scan found to the workers, counted at once.

        A scan that quiesce() overtook hands in nothing: those requests are
        left to the next SPM, like the queued ones quiesce() drops.
        """
        batch, self._batch = self._batch, []
        if batch:
            with self._lock:
                if not self._intake:
                    log.info("SPM mailbox takes no new requests dropped_found=%d", len(batch))
                    return
                self._active += len(batch)
            for found in batch:
                self._work.put(found)

    def _put_reply(self, host: int, i: int, raw: bytes) -> None:
        self._image.put(host, i, raw)
        self._wave_messages += 1

    def _take_replies(self) -> None:
        with self._lock:
            replies, self._replies = self._replies, []
            self._taken = self._handed
        # ~2 us a reply, so the loop is lean: 2000 replies come at once.
        holds, put, recording = self._view.holds, self._image.put, history.enabled()
        for host, slot, request, raw, msg in replies:
            if not holds(host, slot, request):
                self.stats["dropped"] += 1
                log.info("request withdrawn, dropping reply host_id=%d slot=%d", host, slot)
                continue
            put(host, slot, raw)
            self._wave_messages += 1
            if msg is not None and recording:
                history.record("reply", host=host, slot=slot, volume=str(msg.volume), size_mb=msg.size_mb,
                               granted=getattr(codec.decode(raw), "size_mb", 0))

    def _write_dirty(self, in_scan: bool = False) -> None:
        if self._image.dirty:
            faults.point("spm.before_outbox_write")
            self.stats["outbox_writes"] += self._image.flush(self._outbox)
        with self._flushed:
            if self._written != self._taken:
                self._written = self._taken
                self._flushed.notify_all()
        if self._wave_start is not None and not in_scan and self._idle():
            self._end_wave()

    def _counts(self) -> tuple[int, int, int, float]:
        return (self._inbox.counters.read_bytes, self.stats["outbox_writes"], self.stats["scans"],
                self._handler_seconds)

    def _end_wave(self) -> None:
        assert self._wave_start is not None
        end = time.monotonic()
        times = thread_times()
        t0 = self._wave_times
        counts = [b - a for a, b in zip(self._wave_counts, self._counts(), strict=True)]
        self.waves.append(Wave(
            seconds=end - self._wave_start,
            requests=self._wave_requests,
            messages=self._wave_messages,
            scans=int(counts[2]),
            read_bytes=int(counts[0]),
            outbox_writes=int(counts[1]),
            intake_seconds=max(0.0, self._wave_intake - self._wave_start) if self._wave_requests else 0.0,
            handler_seconds=counts[3],
            io_cpu_seconds=times.cpu - t0.cpu,
            io_wait_cpu_seconds=times.run_delay - t0.run_delay,
            cpu_seconds=times.process_cpu - t0.process_cpu,
            start=self._wave_start,
            end=end,
        ))
        self._wave_start = None
        self._wave_requests = self._wave_messages = 0

    def _idle(self) -> bool:
        """Nothing dispatched, handed back, or waiting to be written."""
        with self._lock:
            return self._active == 0 and not self._replies and not self._image.dirty

    # Workers

    def _worker(self) -> None:
        while True:
            found = self._work.get()
            if found is None or not self._serve(found):
                return

    def _serve(self, found: _Found) -> bool:
        """Decode a request the scan found, run its handler, hand the reply
        in; False once stopping."""
        host, i, raw, received = found
        try:
            msg = codec.decode(raw)
        except codec.MessageError as e:
            self._rlog.log(logging.WARNING, ("malformed", host), "malformed message host_id=%d slot=%d: %s", host, i,
                           e)
            # A broken xtnd request: tell the requester.
            return self._hand_in((host, i, raw, codec.encode_reply(raw, 0), None))
        assert isinstance(msg, codec.Extend)  # what an xtnd head decodes to
        if history.enabled():  # str() of a UUID costs ~1 us a request
            history.record("seen", host=host, slot=i, volume=str(msg.volume), size_mb=msg.size_mb)
        req = Request(host, i, msg, raw, received)
        t0 = time.perf_counter()
        reply = self._handle(req)
        seconds = time.perf_counter() - t0
        return self._hand_in(None if reply is None else (host, i, raw, reply, msg), seconds)

    def _hand_in(self, reply: _Reply | None, seconds: float = 0.0) -> bool:
        """Queue a reply for the I/O thread (None: the handler withheld
        it); False once stopping."""
        with self._flushed:
            self._active -= 1
            self._handler_seconds += seconds
            if self._stopping:
                return False
            if reply is not None:
                self._replies.append(reply)
                self._handed += 1
            if self._flush_waiters:  # notify_all costs ~1 us a request
                self._flushed.notify_all()
            # Only the first reply since the I/O thread last took them
            # needs to wake it: one pipe write per batch, not per reply.
            wake = reply is None or len(self._replies) == 1
        if wake and self.config.workers:
            self._waker.wake()
        return True

    def _handle(self, req: Request) -> bytes | None:
        handler = self._handlers[codec.EXTEND_OPCODE]
        try:
            granted = handler(req)
        except NoReply as e:
            self.stats["withheld"] += 1
            log.info("request left for the next SPM host_id=%d slot=%d: %s", req.host_id, req.slot, e)
            return None
        except Exception as e:  # noqa: BLE001 - any handler failure becomes a failure reply
            self.stats["failures"] += 1
            log.warning("request failed host_id=%d slot=%d domain=%s volume=%s size_mb=%d: %s", req.host_id, req.slot,
                        req.message.domain, req.message.volume, req.message.size_mb, e)
            granted = 0
        else:
            self.stats["replies"] += 1
        return codec.encode_reply(req.raw, granted)
