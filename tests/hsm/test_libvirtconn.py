"""The libvirt connection survives libvirtd restarts and keeps events flowing.

Runs against a private libvirtd (testlib.libvirtd) so that killing it
disturbs nobody. Domains are only defined, never started: a DEFINED
lifecycle event is enough to prove events flow on a connection.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import libvirt
import pytest
from testlib.libvirtd import PrivateLibvirtd
from xtnd.hsm.libvirtconn import Connection, EventLoop, NotConnected

log = logging.getLogger("test")

pytestmark = pytest.mark.root


class Recorder:
    """A Listener that records what it was told."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.calls: list[tuple[str, Any]] = []

    def _add(self, kind: str, value: Any) -> None:
        with self.cond:
            self.calls.append((kind, value))
            self.cond.notify_all()

    def count(self, kind: str) -> int:
        with self.cond:
            return sum(1 for k, _ in self.calls if k == kind)

    def wait(self, predicate: Any, timeout: float = 30.0) -> None:
        with self.cond:
            assert self.cond.wait_for(predicate, timeout), f"timed out; calls={self.calls}"

    def connected(self, conn: libvirt.virConnect) -> None:
        # What a real listener does: re-read state on the new connection.
        self._add("connected", len(conn.listAllDomains()))

    def disconnected(self) -> None:
        self._add("disconnected", None)

    def lifecycle(self, dom: libvirt.virDomain, event: int, detail: int) -> None:
        self._add("lifecycle", (dom.name(), event))

    def block_threshold(self, dom: libvirt.virDomain, dev: str, path: str, threshold: int, excess: int) -> None:
        self._add("block_threshold", dev)

    def io_error(self, dom: libvirt.virDomain, src_path: str, dev_alias: str, action: int, reason: str) -> None:
        self._add("io_error", reason)


def _define(conn: Connection) -> str:
    name = f"xtnd-test-{uuid.uuid4().hex[:12]}"
    xml = (
        f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory>"
        "<os><type arch='x86_64' machine='pc'>hvm</type></os></domain>"
    )
    conn.get().defineXML(xml)
    return name


@pytest.fixture
def private_libvirtd(need_root: None, workdir: str) -> Iterator[PrivateLibvirtd]:
    daemon = PrivateLibvirtd(workdir)
    daemon.start()
    yield daemon
    daemon.kill()


def test_reconnect_after_libvirtd_restart(private_libvirtd: PrivateLibvirtd, libvirt_events: EventLoop) -> None:
    recorder = Recorder()
    conn = Connection(recorder, uri=private_libvirtd.uri(), backoff_initial=0.05, backoff_max=0.5)
    conn.start()
    try:
        assert conn.wait_connected(30)
        assert conn.generation == 1
        first = _define(conn)
        recorder.wait(lambda: ("lifecycle", (first, libvirt.VIR_DOMAIN_EVENT_DEFINED)) in recorder.calls)

        killed = time.monotonic()
        private_libvirtd.kill()
        recorder.wait(lambda: recorder.count("disconnected") == 1)
        log.info("connection loss noticed in %.3f s", time.monotonic() - killed)
        with pytest.raises(NotConnected):
            conn.get()

        private_libvirtd.start()
        started = time.monotonic()
        assert conn.wait_connected(30, after_generation=1)
        log.info("reconnected %.3f s after libvirtd listened again", time.monotonic() - started)
        assert conn.generation == 2
        # The listener re-read state on the new connection (the private
        # daemon kept no domain across the restart).
        recorder.wait(lambda: recorder.count("connected") == 2)
        assert [v for k, v in recorder.calls if k == "connected"] == [0, 0]

        second = _define(conn)
        recorder.wait(lambda: ("lifecycle", (second, libvirt.VIR_DOMAIN_EVENT_DEFINED)) in recorder.calls)
        # Each event arrived once: the old connection's callbacks are gone.
        lifecycle = [v for k, v in recorder.calls if k == "lifecycle"]
        assert lifecycle.count((second, libvirt.VIR_DOMAIN_EVENT_DEFINED)) == 1
    finally:
        conn.stop()


def test_stop_wakes_backoff(private_libvirtd: PrivateLibvirtd, libvirt_events: EventLoop) -> None:
    recorder = Recorder()
    conn = Connection(recorder, uri=private_libvirtd.uri(), backoff_initial=60.0, backoff_max=60.0)
    conn.start()
    try:
        assert conn.wait_connected(30)
        private_libvirtd.kill()
        recorder.wait(lambda: recorder.count("disconnected") == 1)
    finally:
        # Reconnecting fails now; the thread waits 60 s before retrying.
        start = time.monotonic()
        conn.stop(timeout=10)
        elapsed = time.monotonic() - start
    assert elapsed < 2.0
    with pytest.raises(NotConnected):
        conn.get()


def test_event_loop_stops_at_once(libvirt_events: EventLoop) -> None:
    # Only one thread may run libvirt's loop: stop the session's, restart it.
    assert libvirt_events.alive
    start = time.monotonic()
    libvirt_events.stop()
    elapsed = time.monotonic() - start
    assert not libvirt_events.alive
    libvirt_events.start()
    assert libvirt_events.alive
    assert elapsed < 2.0
