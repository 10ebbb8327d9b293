"""Automatic mode of the host API (``[api] udev = true``): grow a guest's
disk when the block device under it grows, with no API call.

The kernel announces a block device's new size with a "change" uevent
carrying RESIZE=1 (a SCSI LUN rescanned after the array grew it, a loop
device after LOOP_SET_CAPACITY / ``losetup -c``, an LV refreshed). Each such
event is handed to ``DiskGrower.grow_device`` (xtnd.hsm.growdisk), which
finds the running VMs' disks on that device and grows them to its size.
Other change events (a device attached, media changed) are ignored.

Events come from udevd when it runs (after its rules ran, so /dev nodes
exist) and straight from the kernel otherwise (hosts and containers
without udevd). One thread, "xtnd-hsm-udev", reads them and does the work
in order; stop() wakes it at once through a pipe.
"""

from __future__ import annotations

import logging
import os
import select
import time
from collections.abc import Callable

import pyudev
from xtnd.common.worker import Worker
from xtnd.hsm import growdisk

log = logging.getLogger("xtnd.hsm.udev")

UDEV_CONTROL = "/run/udev/control"


def event_source() -> str:
    """ "udev" when udevd runs on this host, else "kernel"."""
    return "udev" if os.path.exists(UDEV_CONTROL) else "kernel"


class UdevWatcher(Worker):
    def __init__(
        self,
        grower: growdisk.DiskGrower,
        source: str | None = None,
        on_grown: Callable[[str, list[growdisk.Grown], float], None] | None = None,
        name: str = "xtnd-hsm-udev",
    ):
        """on_grown(device, grown, seconds since the event arrived): for tests and benches."""
        self._grower = grower
        self.source = source or event_source()
        self._on_grown = on_grown
        self._monitor: pyudev.Monitor | None = None
        self._wake_r, self._wake_w = -1, -1
        self.resizes = 0
        super().__init__(name)

    def start(self) -> None:
        context = pyudev.Context()
        monitor = pyudev.Monitor.from_netlink(context, source=self.source)
        monitor.filter_by("block")
        monitor.start()
        self._monitor = monitor
        self._wake_r, self._wake_w = os.pipe()
        super().start()
        log.info("watching udev for block devices that grow source=%s", self.source)

    def stop(self, timeout: float = 10.0) -> bool:
        if not super().stop(timeout):
            log.warning("udev thread did not stop in %.1f seconds", timeout)
            return False
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1
        self._monitor = None
        return True

    def _wake(self) -> None:
        # The thread blocks in select() on the netlink socket and this pipe.
        os.write(self._wake_w, b"x")

    def _run(self) -> None:
        monitor = self._monitor
        assert monitor is not None
        while not self.stopping:
            ready, _, _ = select.select([monitor.fileno(), self._wake_r], [], [])
            if self._wake_r in ready:
                return
            # Everything queued now: one poll returns one device.
            while (device := monitor.poll(timeout=0)) is not None:
                try:
                    self.step(device.action, device.device_node, device.properties.get("RESIZE"))
                except Exception as e:
                    log.error("udev event failed device=%s error=%r", device.device_node, e)
                    log.debug("udev event failure", exc_info=True)

    def step(self, action: str | None, node: str | None, resize: str | None) -> list[growdisk.Grown]:
        """One uevent (the loop's step hook); what was grown."""
        if action != "change" or resize != "1" or not node:
            return []
        start = time.monotonic()
        self.resizes += 1
        try:
            grown = self._grower.grow_device(node)
        except growdisk.GrowError as e:
            log.warning("cannot grow disks on device=%s error=%s", node, e)
            return []
        seconds = time.monotonic() - start
        if grown:
            log.info("device grew device=%s disks=%d duration_ms=%.1f", node, len(grown), seconds * 1000)
        else:
            log.debug("device grew, no running vm disk on it device=%s", node)
        if self._on_grown is not None:
            self._on_grown(node, grown, seconds)
        return grown
