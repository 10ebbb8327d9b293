"""The HSM daemon against real guests, real libvirtd, real LVM and an SPM.

Each guest is the rig of testlib.guest writing a known pattern to its
qcow2 disk, a thin LV of a block domain (4 MiB extents) exposed as a
volume link; it reads everything back at the end (XTND-VERIFY-OK). The
SPM serves the domain's mailbox with real lvextend (testlib.hsmrig.spm).
TCG guests write about 3.5 MiB/s, so sizes are MiB-scale.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Any

import libvirt
import pytest
from testlib import guest, hsmrig
from xtnd.hsm import config as hsm_config
from xtnd.hsm.daemon import HSM
from xtnd.hsm.libvirtconn import EventLoop
from xtnd.hsm.metrics import ExtendRecord

MiB = 1024**2
GiB = 1024**3

log = logging.getLogger("test")

pytestmark = [pytest.mark.root, pytest.mark.timeout(240)]


class Pauses:
    """Counts a domain's pauses by reason (lifecycle events)."""

    def __init__(self, conn: libvirt.virConnect):
        self.conn = conn
        self.events: list[tuple[str, int, int]] = []
        self._id = conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._event, None)

    def _event(self, conn: Any, dom: Any, event: int, detail: int, _: Any) -> None:
        self.events.append((dom.name(), event, detail))

    def ioerror(self, name: str) -> int:
        return sum(
            1
            for n, e, d in self.events
            if n == name and e == libvirt.VIR_DOMAIN_EVENT_SUSPENDED and d == libvirt.VIR_DOMAIN_EVENT_SUSPENDED_IOERROR
        )

    def close(self) -> None:
        self.conn.domainEventDeregisterAny(self._id)


class Running:
    """An in-process HSM and what it logged."""

    def __init__(self, config: hsm_config.Config, events: EventLoop):
        self.records: list[ExtendRecord] = []
        self._cond = threading.Condition()
        self.hsm = HSM(config, event_loop=events, on_extend=self._record)

    def _record(self, record: ExtendRecord) -> None:
        with self._cond:
            self.records.append(record)
            self._cond.notify_all()

    def wait_records(self, n: int, timeout: float = 120.0) -> list[ExtendRecord]:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.records) >= n, timeout), f"{self.records}"
            return list(self.records)


@pytest.fixture
def pool(workdir: str, need_root: None, libvirtd: None) -> Iterator[hsmrig.Pool]:
    with hsmrig.pool(workdir) as p:
        yield p


@contextlib.contextmanager
def running(config: hsm_config.Config, events: EventLoop) -> Iterator[Running]:
    r = Running(config, events)
    r.hsm.start()
    try:
        assert r.hsm.connection.wait_connected(30)
        yield r
    finally:
        r.hsm.stop()


@contextlib.contextmanager
def started(
    conn: libvirt.virConnect, rig: guest.Rig, disk: str, workload: guest.Workload, workdir: str
) -> Iterator[guest.Guest]:
    with guest.guest(conn, rig, disk, workload, workdir) as g:
        g.start()
        yield g


def test_steady_writer_never_pauses(
    pool: hsmrig.Pool, conn: libvirt.virConnect, rig: guest.Rig, libvirt_events: EventLoop, workdir: str
) -> None:
    """Chunk 16 MiB, 20% utilization: extend with 12.8 MiB free, ~3 s of
    writing at 4 MiB/s; each extend takes well under that."""
    disk = pool.thin_volume(initial=16 * MiB)
    pauses = Pauses(conn)
    with hsmrig.spm(pool), running(pool.config(chunk_mb=16), libvirt_events) as r:
        with started(conn, rig, disk, guest.Workload(write_mb=64, rate=4), workdir) as g:
            text = g.wait_console("XTND-VERIFY-OK", timeout=180)
            assert "XTND-WRITE-DONE mb=64" in text
            g.wait_state(libvirt.VIR_DOMAIN_SHUTOFF, timeout=60)
            name = g.name
    pauses.close()
    records = r.records
    for rec in records:
        log.info("%s", rec.line())
    assert pauses.ioerror(name) == 0
    assert len(records) >= 3
    assert all(rec.trigger == "threshold" and not rec.resumed for rec in records[:3])
    sizes = [rec.new_size for rec in records]
    assert sizes == sorted(sizes)
    assert pool.volume_size(disk) == records[-1].new_size >= 64 * MiB
