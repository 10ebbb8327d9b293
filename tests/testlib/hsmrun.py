"""For tests of the HSM against real guests: an HSM run in the test's own
process with the extends it completed, and the pauses of the guests."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import libvirt
from xtnd.hsm import config as hsm_config
from xtnd.hsm.daemon import HSM
from xtnd.hsm.libvirtconn import EventLoop
from xtnd.hsm.metrics import ExtendRecord


class Pauses:
    """Every pause of a domain (lifecycle SUSPENDED events), by reason."""

    def __init__(self, conn: libvirt.virConnect):
        self.conn = conn
        self.events: list[tuple[str, int, int]] = []
        self._id = conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._event, None)

    def _event(self, conn: Any, dom: Any, event: int, detail: int, _: Any) -> None:
        self.events.append((dom.name(), event, detail))

    def count(self, name: str, detail: int | None = None) -> int:
        """Pauses of domain name, of any reason unless detail names one."""
        return sum(
            1
            for n, e, d in self.events
            if n == name and e == libvirt.VIR_DOMAIN_EVENT_SUSPENDED and detail in (None, d)
        )

    def ioerror(self, name: str) -> int:
        """Pauses on an I/O error (ENOSPC: the disk was not extended in time)."""
        return self.count(name, libvirt.VIR_DOMAIN_EVENT_SUSPENDED_IOERROR)

    def close(self) -> None:
        self.conn.domainEventDeregisterAny(self._id)


class Running:
    """An in-process HSM and the extends it completed."""

    def __init__(self, config: hsm_config.Config, events: EventLoop):
        self.records: list[ExtendRecord] = []
        self._cond = threading.Condition()
        # In-process: the pytest process is no client of the SPM host's sanlock
        # daemon, so it cannot share its host id (daemon tests run `xtnd hsm`).
        self.hsm = HSM(config, event_loop=events, on_extend=self._record, hold_host_id=False)

    def _record(self, record: ExtendRecord) -> None:
        with self._cond:
            self.records.append(record)
            self._cond.notify_all()

    def wait_records(self, n: int, timeout: float = 120.0) -> list[ExtendRecord]:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.records) >= n, timeout), f"{self.records}"
            return list(self.records)


@contextlib.contextmanager
def running(config: hsm_config.Config, events: EventLoop, dest_first: bool = True) -> Iterator[Running]:
    """An HSM started and connected to libvirt; stopped after. dest_first
    off breaks the destination-first rule of replication (tests of it)."""
    r = Running(config, events)
    if not dest_first:
        r.hsm.replicator.dest_first = False
    r.hsm.start()
    try:
        assert r.hsm.connection.wait_connected(30)
        yield r
    finally:
        r.hsm.stop()
