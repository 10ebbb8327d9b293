"""What the HSM relies on, proven on a real QEMU guest and real libvirtd.

A qcow2 image on a small loop device (a thin LV stand-in) fills up and
pauses the VM with an ENOSPC I/O error; growing the device and resuming
lets the guest finish with its data intact. Block threshold events fire on
the indexed target, and one bulk stats call reports allocation, capacity
and physical size.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import libvirt
import pytest
from xtnd.tools.rig import guest
from xtnd.tools.rig.wait import wait_for

MiB = 1024**2
GiB = 1024**3

log = logging.getLogger("test")

pytestmark = pytest.mark.root


class Events:
    """Collects domain events of one domain, with their arrival time."""

    def __init__(self, conn: libvirt.virConnect, dom: libvirt.virDomain):
        self._cond = threading.Condition()
        self.received: list[tuple[float, str, tuple[Any, ...]]] = []
        self._conn = conn
        self._uuid = dom.UUIDString()
        self._ids = [
            conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_THRESHOLD, self._threshold, None),
            conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_IO_ERROR_REASON, self._io_error, None),
        ]

    def close(self) -> None:
        for i in self._ids:
            self._conn.domainEventDeregisterAny(i)

    def _add(self, dom: libvirt.virDomain, kind: str, args: tuple[Any, ...]) -> None:
        if dom.UUIDString() != self._uuid:
            return
        with self._cond:
            self.received.append((time.monotonic(), kind, args))
            self._cond.notify_all()

    def _threshold(self, conn: Any, dom: Any, dev: str, path: str, threshold: int, excess: int, _: Any) -> None:
        self._add(dom, "threshold", (dev, path, threshold, excess))

    def _io_error(self, conn: Any, dom: Any, src: str, alias: str, action: int, reason: str, _: Any) -> None:
        self._add(dom, "io_error", (src, alias, action, reason))

    def wait(self, kind: str, timeout: float = 120.0) -> tuple[float, tuple[Any, ...]]:
        with self._cond:
            found = self._cond.wait_for(lambda: [e for e in self.received if e[1] == kind], timeout)
            assert found, f"no {kind} event in {timeout}s (got {self.received})"
            return found[0][0], found[0][2]


def test_enospc_pause_grow_resume(
    conn: libvirt.virConnect, rig: guest.Rig, loop_disk: guest.LoopDisk, workdir: str
) -> None:
    guest.qcow2_create(loop_disk.device, 1 * GiB)
    with guest.guest(conn, rig, loop_disk.device, guest.Workload(write_mb=96), workdir) as g:
        events = Events(conn, g.dom)
        try:
            start = time.monotonic()
            g.start()
            g.wait_console("XTND-START", timeout=120)
            log.info("guest booted in %.1f s", time.monotonic() - start)

            g.wait_state(libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_IOERROR, timeout=180)
            paused = time.monotonic()
            assert g.dom.diskErrors() == {"vda": libvirt.VIR_DOMAIN_DISK_ERROR_NO_SPACE}
            when, (src, alias, action, reason) = events.wait("io_error", timeout=10)
            log.info("io_error event %.3f s from seeing the pause", when - paused)
            assert src == loop_disk.device
            assert reason == "enospc"
            assert action == libvirt.VIR_DOMAIN_EVENT_IO_ERROR_PAUSE
            assert "XTND-WRITE-DONE" not in g.console()

            loop_disk.grow(256 * MiB)
            assert loop_disk.size == 256 * MiB
            g.dom.resume()

            text = g.wait_console("XTND-VERIFY-OK", timeout=240)
            assert "XTND-WRITE-DONE mb=96" in text
            g.wait_state(libvirt.VIR_DOMAIN_SHUTOFF, timeout=60)
            log.info("guest done in %.1f s", time.monotonic() - start)
        finally:
            events.close()


def _block_stats(conn: libvirt.virConnect, name: str) -> dict[str, Any]:
    """Block stats of one domain from a single bulk call, by drive name."""
    result = conn.getAllDomainStats(libvirt.VIR_DOMAIN_STATS_BLOCK, libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_BACKING)
    for dom, stats in result:
        if dom.name() == name:
            drives = {}
            for i in range(stats["block.count"]):
                prefix = f"block.{i}."
                drive = {k[len(prefix) :]: v for k, v in stats.items() if k.startswith(prefix)}
                drives.setdefault(drive["name"], []).append(drive)
            return drives
    raise LookupError(f"{name} not in the bulk stats")


def test_block_threshold_and_bulk_stats(
    conn: libvirt.virConnect, rig: guest.Rig, loop_disk: guest.LoopDisk, workdir: str
) -> None:
    loop_disk.grow(128 * MiB)
    guest.qcow2_create(loop_disk.device, 1 * GiB)
    threshold = 24 * MiB
    # Slow enough that the console shows progress near the crossing.
    with guest.guest(
        conn, rig, loop_disk.device, guest.Workload(write_mb=40, rate=4, verify=False, hold=True), workdir
    ) as g:
        events = Events(conn, g.dom)
        try:
            g.start()
            g.wait_state(libvirt.VIR_DOMAIN_RUNNING, timeout=30)
            index = g.disk_index("vda")
            target = f"vda[{index}]"
            g.dom.setBlockThreshold(target, threshold)

            (top,) = _block_stats(conn, g.name)["vda"]
            assert top["capacity"] == 1 * GiB
            assert top["physical"] == 128 * MiB
            assert top["threshold"] == threshold
            assert top["allocation"] < threshold

            when, (dev, path, armed, excess) = events.wait("threshold", timeout=180)
            # The guest prints progress after each 1 MiB write completes.
            crossed = wait_for(
                lambda: [ln for ln in g.console().splitlines() if ln.startswith("XTND-PROGRESS")],
                timeout=10,
            )
            log.info("threshold event after %s; excess=%d", crossed[-1], excess)
            assert dev == target
            assert path == loop_disk.device
            assert armed == threshold
            assert excess > 0

            # The guest stays up when done, so the stats below see a running VM.
            g.wait_console("XTND-HOLD", timeout=180)
            (top,) = _block_stats(conn, g.name)["vda"]
            log.info("bulk stats after writing: %s", top)
            assert top["capacity"] == 1 * GiB
            assert top["physical"] == 128 * MiB
            # qcow2 allocates up to the highest cluster written, plus metadata.
            assert 40 * MiB <= top["allocation"] <= 48 * MiB
            # The event fired once: libvirt dropped the threshold.
            assert "threshold" not in top
        finally:
            events.close()
