"""Owning the libvirt connection of the HSM: events, loss, reconnection.

libvirt delivers domain events only through an event loop registered in
the process *before* a connection is opened (virEventRegisterDefaultImpl),
and someone must keep running that loop. EventLoop does both, once per
process, in a named daemon thread.

Connection opens qemu:///system (or any URI), registers the domain events
the HSM needs (lifecycle, block threshold, I/O error with reason) and a
close callback, and passes each event to a Listener. When the connection
goes away (libvirtd restarted or killed, keepalive timeout, or a caller
reports a failed call), it reconnects with exponential backoff, registers
everything again and calls Listener.connected() so the listener re-reads
the state it may have missed meanwhile: events are not replayed.

Threads: event callbacks run on the event loop thread and must not block
(no libvirt calls that wait on QEMU, no storage I/O); connected() and
disconnected() run on the connection's own thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, Protocol

import libvirt
from xtnd.common.ratelimit import RateLimitedLog
from xtnd.common.worker import Worker

log = logging.getLogger("xtnd.hsm.libvirt")

DEFAULT_URI = "qemu:///system"


class NotConnected(Exception):
    """There is no usable libvirt connection right now; retry later."""

    def __init__(self, uri: str):
        self.uri = uri
        super().__init__(f"not connected to libvirt uri={uri}")


class Listener(Protocol):
    """What the connection reports to; see the module docstring for threads."""

    def connected(self, conn: libvirt.virConnect) -> None:
        """A new connection is up, events registered: re-read all state."""

    def disconnected(self) -> None:
        """The connection was lost; events may be missed until connected()."""

    def lifecycle(self, dom: libvirt.virDomain, event: int, detail: int) -> None:
        """VIR_DOMAIN_EVENT_ID_LIFECYCLE (event: VIR_DOMAIN_EVENT_*)."""

    def block_threshold(self, dom: libvirt.virDomain, dev: str, path: str, threshold: int, excess: int) -> None:
        """VIR_DOMAIN_EVENT_ID_BLOCK_THRESHOLD: fires once; re-arm to get another."""

    def io_error(self, dom: libvirt.virDomain, src_path: str, dev_alias: str, action: int, reason: str) -> None:
        """VIR_DOMAIN_EVENT_ID_IO_ERROR_REASON (reason e.g. 'enospc')."""


# libvirt's default event implementation is process-wide and can be
# registered only once; this remembers that it was.
_impl_lock = threading.Lock()
_impl_registered = False


def _register_default_impl() -> None:
    global _impl_registered
    with _impl_lock:
        if not _impl_registered:
            # libvirt prints every error to stderr by default; the caller
            # gets each one as a libvirtError anyway.
            libvirt.registerErrorHandler(_libvirt_error, None)
            libvirt.virEventRegisterDefaultImpl()
            _impl_registered = True


def _libvirt_error(_opaque: object, error: Any) -> None:
    log.debug("libvirt error=%s", error)


class EventLoop(Worker):
    """Runs libvirt's default event loop in a daemon thread."""

    def __init__(self, name: str = "xtnd-libvirt-events"):
        super().__init__(name)

    def start(self) -> None:
        """Register the default event implementation (once) and run it."""
        _register_default_impl()
        super().start()

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop the loop; returns once the thread ended (or timeout)."""
        stopped = super().stop(timeout)
        if not stopped:
            log.warning("event loop did not stop in %.1f seconds", timeout)
        return stopped

    def _wake(self) -> None:
        # virEventRunDefaultImpl blocks until something happens; adding a
        # timer interrupts its poll() so the loop sees the flag at once.
        libvirt.virEventAddTimeout(0, self._wakeup, None)

    def _wakeup(self, timer: int, _opaque: object) -> None:
        libvirt.virEventRemoveTimeout(timer)

    def _run(self) -> None:
        log.debug("event loop started")
        while not self.stopping:
            if libvirt.virEventRunDefaultImpl() < 0:
                log.error("libvirt event loop iteration failed")
                # Do not spin on a broken loop; stop() still wakes this.
                self._pause(1.0)
        log.debug("event loop stopped")


class Connection(Worker):
    """One libvirt connection kept open, with events, across libvirtd restarts.

    start() connects in the background and needs a running EventLoop.
    """

    def __init__(
        self,
        listener: Listener,
        uri: str = DEFAULT_URI,
        backoff_initial: float = 0.1,
        backoff_max: float = 5.0,
        keepalive_interval: int = 5,
        keepalive_count: int = 3,
        name: str = "xtnd-libvirt-conn",
    ):
        self.uri = uri
        self._listener = listener
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._keepalive = (keepalive_interval, keepalive_count)
        super().__init__(name)
        self._conn: libvirt.virConnect | None = None
        self._lost = False
        self._generation = 0
        self._ready = 0
        self._callbacks: list[int] = []
        self._errors = RateLimitedLog(log, interval=60.0)

    # Public

    def stop(self, timeout: float = 10.0) -> bool:
        """Close the connection and end the thread; wakes any backoff wait."""
        stopped = super().stop(timeout)
        if not stopped:
            log.warning("connection thread did not stop in %.1f seconds", timeout)
        return stopped

    def get(self) -> libvirt.virConnect:
        """The live connection; raise NotConnected while there is none."""
        with self._cond:
            if self._conn is None or self._lost:
                raise NotConnected(self.uri)
            return self._conn

    def is_connected(self) -> bool:
        with self._cond:
            return self._conn is not None and not self._lost

    @property
    def generation(self) -> int:
        """Counts successful connects; changes after every reconnect."""
        with self._cond:
            return self._generation

    def wait_connected(self, timeout: float, after_generation: int = 0) -> bool:
        """Wait until connected with generation > after_generation.

        Returns once the listener's connected() has returned too, so the
        caller sees the state the listener re-read.
        """
        with self._cond:
            return (
                self._cond.wait_for(
                    lambda: (
                        self._stopping or (self._conn is not None and not self._lost and self._ready > after_generation)
                    ),
                    timeout,
                )
                and not self._stopping
            )

    def report_error(self, error: libvirt.libvirtError) -> None:
        """Tell the connection a call failed; reconnect if it is dead.

        Callers pass every libvirtError they get: most are about a domain
        (gone, not running) and change nothing here.
        """
        with self._cond:
            conn = self._conn
        if conn is None:
            return
        try:
            alive = conn.isAlive()
        except libvirt.libvirtError:
            alive = 0
        if not alive:
            log.warning("libvirt connection is dead after error=%s", error)
            self._mark_lost(conn, "failed call")

    # The connection thread

    def _run(self) -> None:
        delay = self._backoff_initial
        while not self.stopping:
            try:
                conn = self._open()
            except libvirt.libvirtError as e:
                self._errors.log(
                    logging.WARNING, "open", "cannot connect uri=%s error=%s retry_in=%.1f", self.uri, e, delay
                )
                self._pause(delay)
                delay = min(delay * 2, self._backoff_max)
                continue
            delay = self._backoff_initial
            self._errors.forget("open")
            self._notify_connected(conn)
            with self._cond:
                self._ready = self._generation
                self._cond.notify_all()
                self._cond.wait_for(lambda: self._stopping or self._lost)
                lost = self._lost and not self._stopping
            self._close(conn)
            if lost:
                self._notify_disconnected()
        log.info("libvirt connection stopped uri=%s", self.uri)

    def _open(self) -> libvirt.virConnect:
        conn = libvirt.open(self.uri)
        try:
            conn.setKeepAlive(*self._keepalive)
            conn.registerCloseCallback(self._on_close, None)
            self._callbacks = [
                conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None),
                conn.domainEventRegisterAny(
                    None, libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_THRESHOLD, self._on_block_threshold, None
                ),
                conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_IO_ERROR_REASON, self._on_io_error, None),
                conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2, self._on_block_job, None),
            ]
        except libvirt.libvirtError:
            self._callbacks = []
            self._close_quietly(conn)
            raise
        with self._cond:
            self._conn = conn
            self._lost = False
            self._generation += 1
            generation = self._generation
            self._cond.notify_all()
        log.info("connected to libvirt uri=%s generation=%d", self.uri, generation)
        return conn

    def _close(self, conn: libvirt.virConnect) -> None:
        with self._cond:
            self._conn = None
        for cb in self._callbacks:
            try:
                conn.domainEventDeregisterAny(cb)
            except libvirt.libvirtError as e:
                log.debug("cannot deregister callback=%d error=%s", cb, e)
        self._callbacks = []
        try:
            conn.unregisterCloseCallback()
        except libvirt.libvirtError as e:
            log.debug("cannot unregister close callback error=%s", e)
        self._close_quietly(conn)

    def _close_quietly(self, conn: libvirt.virConnect) -> None:
        try:
            conn.close()
        except libvirt.libvirtError as e:
            log.debug("closing a dead connection error=%s", e)

    def _mark_lost(self, conn: libvirt.virConnect, why: str) -> None:
        with self._cond:
            if conn is not self._conn or self._lost:
                return
            self._lost = True
            self._cond.notify_all()
        log.warning("libvirt connection lost uri=%s reason=%s", self.uri, why)

    def _notify_connected(self, conn: libvirt.virConnect) -> None:
        try:
            self._listener.connected(conn)
        except libvirt.libvirtError as e:
            # Reading state on a connection that died again at once.
            self.report_error(e)
        except Exception:
            log.exception("listener failed handling connected")

    def _notify_disconnected(self) -> None:
        try:
            self._listener.disconnected()
        except Exception:
            log.exception("listener failed handling disconnected")

    # Event callbacks, on the event loop thread

    def _current(self, conn: libvirt.virConnect) -> bool:
        with self._cond:
            return conn is self._conn and not self._lost

    def _dispatch(self, what: str, handler: Callable[[], None]) -> None:
        # An exception escaping into libvirt's C callback would be printed
        # and dropped; log it here with its traceback instead.
        try:
            handler()
        except Exception:
            log.exception("listener failed handling %s", what)

    def _on_close(self, conn: libvirt.virConnect, reason: int, _opaque: object) -> None:
        reasons = {
            libvirt.VIR_CONNECT_CLOSE_REASON_ERROR: "error",
            libvirt.VIR_CONNECT_CLOSE_REASON_EOF: "eof",
            libvirt.VIR_CONNECT_CLOSE_REASON_KEEPALIVE: "keepalive",
            libvirt.VIR_CONNECT_CLOSE_REASON_CLIENT: "client",
        }
        self._mark_lost(conn, reasons.get(reason, str(reason)))

    def _on_lifecycle(
        self, conn: libvirt.virConnect, dom: libvirt.virDomain, event: int, detail: int, _opaque: object
    ) -> None:
        if self._current(conn):
            self._dispatch("lifecycle", lambda: self._listener.lifecycle(dom, event, detail))

    def _on_block_threshold(
        self,
        conn: libvirt.virConnect,
        dom: libvirt.virDomain,
        dev: str,
        path: str,
        threshold: int,
        excess: int,
        _opaque: object,
    ) -> None:
        if self._current(conn):
            self._dispatch("block_threshold", lambda: self._listener.block_threshold(dom, dev, path, threshold, excess))

    def _on_io_error(
        self,
        conn: libvirt.virConnect,
        dom: libvirt.virDomain,
        src_path: str,
        dev_alias: str,
        action: int,
        reason: str,
        _opaque: object,
    ) -> None:
        if self._current(conn):
            self._dispatch("io_error", lambda: self._listener.io_error(dom, src_path, dev_alias, action, reason))

    def _on_block_job(
        self, conn: libvirt.virConnect, dom: libvirt.virDomain, disk: str, job_type: int, status: int, _opaque: object
    ) -> None:
        # Optional for listeners: only the HSM's replication follows block jobs.
        handler = getattr(self._listener, "block_job", None)
        if handler is not None and self._current(conn):
            self._dispatch("block_job", lambda: handler(dom, disk, job_type, status))
