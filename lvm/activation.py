"""Mapping LVs to block devices on this host.

One interface, two implementations chosen at run time:

- DeviceMapperActivator: what production hosts use (lvchange -ay,
  --refresh, -an), giving /dev/VG/LV.
- LoopActivator: for kernels without device-mapper (the test machines).
  A single-segment LV is a contiguous byte range of its PV, starting at
  pe_start + first_pe * extent_size, so a loop device with that offset and
  a size limit of the LV size is the same block device. Refresh changes the
  size limit in place (loop.set_sizelimit). An LV with several segments
  cannot be mapped this way and raises MultiSegmentLV. The LV's new size
  is read straight from the PV's metadata area (metadata.py: two O_DIRECT
  reads instead of an lvs), with lvs when that cannot be read.

Activation is idempotent: activating an active LV returns its device.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Callable, Iterator
from typing import Protocol

from . import loop, metadata
from .errors import ActivationError, MultiSegmentLV
from .lv import LVInfo, lv_info, lvs
from .runner import Runner
from .vg import vg_info

log = logging.getLogger("xtnd.lvm")

LOCK_DIR = "/run/xtnd"


class Activator(Protocol):
    def activate(self, vg: str, lv: str) -> str:
        """Map vg/lv on this host; return the device path."""
        ...

    def refresh(self, vg: str, lv: str, verified: Callable[[int], None] | None = None) -> int:
        """Make an active LV's device match its current LVM size; return it.

        verified(size) is called once with the LV's size as storage has it,
        before the device grows if the activator can (work that needs only
        that size then overlaps the resize), after it otherwise."""
        ...

    def deactivate(self, vg: str, lv: str) -> None:
        """Unmap vg/lv; nothing to do if it is not mapped."""
        ...

    def is_active(self, vg: str, lv: str) -> bool: ...

    def device(self, vg: str, lv: str) -> str | None:
        """The device path if vg/lv is mapped, without mapping it."""
        ...

    def active_devices(self, vg: str) -> dict[str, str]:
        """LV name -> device of every mapped LV of vg (a few commands, not one per LV)."""
        ...


def make_activator(runner: Runner, kind: str = "auto") -> Activator:
    """kind: "dm", "loop" or "auto" (dm when the kernel has device-mapper)."""
    if kind == "auto":
        kind = "dm" if runner.driverloaded else "loop"
    if kind == "dm":
        return DeviceMapperActivator(runner)
    if kind == "loop":
        return LoopActivator(runner)
    raise ValueError(f"unknown activator {kind!r}")


class DeviceMapperActivator:
    def __init__(self, runner: Runner):
        self._runner = runner

    def activate(self, vg: str, lv: str) -> str:
        self._runner.run("lvchange", "--activate", "y", f"{vg}/{lv}")
        return f"/dev/{vg}/{lv}"

    def refresh(self, vg: str, lv: str, verified: Callable[[int], None] | None = None) -> int:
        # Reloads the table from the current metadata, resizing in place.
        self._runner.run("lvchange", "--refresh", f"{vg}/{lv}")
        size = loop.size(f"/dev/{vg}/{lv}")
        if verified is not None:
            verified(size)
        return size

    def deactivate(self, vg: str, lv: str) -> None:
        self._runner.run("lvchange", "--activate", "n", f"{vg}/{lv}")

    def is_active(self, vg: str, lv: str) -> bool:
        return os.path.exists(f"/dev/mapper/{_dm_name(vg, lv)}")

    def device(self, vg: str, lv: str) -> str | None:
        return f"/dev/{vg}/{lv}" if self.is_active(vg, lv) else None

    def active_devices(self, vg: str) -> dict[str, str]:
        return {info.name: f"/dev/{vg}/{info.name}" for info in lvs(self._runner, vg) if self.is_active(vg, info.name)}


def _dm_name(vg: str, lv: str) -> str:
    # device-mapper names double every '-' inside the VG and LV names.
    return f"{vg.replace('-', '--')}-{lv.replace('-', '--')}"


class LoopActivator:
    def __init__(self, runner: Runner, lock_dir: str = LOCK_DIR):
        self._runner = runner
        self._lock_path = os.path.join(lock_dir, "loop-activation.lock")
        self._pe_start: dict[tuple[str, str], int] = {}
        # (PV, offset) -> devices found there by the last refresh: the next
        # refresh checks them with one ioctl each (loop.still) and searches
        # sysfs again only if one of them changed. activate() never attaches
        # a second device where one exists, so no new one appears meanwhile.
        self._found: dict[tuple[str, int], list[str]] = {}
        self.metadata = metadata.Reader(runner.devices)
        self.fallbacks = 0  # refreshes that asked LVM: the metadata could not be read directly

    def activate(self, vg: str, lv: str) -> str:
        info = lv_info(self._runner, vg, lv)
        pv, offset = self._location(info)
        # Two processes activating the same LV must not both attach.
        with self._locked():
            existing = loop.find(pv, offset)
            if existing:
                return existing[0].path
            return loop.attach(pv, offset, info.size)

    def refresh(self, vg: str, lv: str, verified: Callable[[int], None] | None = None) -> int:
        info = self._stored(vg, lv)
        pv, offset = self._location(info)
        existing = self._found.get((pv, offset))
        if not existing or not all(loop.still(path, pv, offset) for path in existing):
            existing = [dev.path for dev in loop.find(pv, offset)]
            self._found[(pv, offset)] = existing
        if not existing:
            del self._found[(pv, offset)]
            raise ActivationError(f"cannot refresh {vg}/{lv}: not active")
        if verified is not None:
            verified(info.size)
        new_size = 0
        for path in existing:
            new_size = loop.set_sizelimit(path, info.size)
            log.info("loop refreshed vg=%s lv=%s device=%s size=%d", vg, lv, path, new_size)
        return new_size

    def _stored(self, vg: str, lv: str) -> LVInfo:
        """vg/lv as storage has it now: from a PV's metadata area, or from
        LVM when that cannot be read (which also raises LVNotFound)."""
        try:
            return self.metadata.lv_info(vg, lv)
        except metadata.Unavailable as e:
            self.fallbacks += 1
            log.info("cannot read the metadata of vg=%s lv=%s directly, asking lvm: %s", vg, lv, e)
        except OSError as e:
            self.fallbacks += 1
            log.warning("cannot read the metadata of vg=%s lv=%s directly, asking lvm: %s", vg, lv, e)
        return lv_info(self._runner, vg, lv)

    def deactivate(self, vg: str, lv: str) -> None:
        info = lv_info(self._runner, vg, lv)
        pv, offset = self._location(info, check_segments=False)
        for dev in loop.find(pv, offset):
            loop.detach(dev.path)

    def is_active(self, vg: str, lv: str) -> bool:
        return self.device(vg, lv) is not None

    def device(self, vg: str, lv: str) -> str | None:
        info = lv_info(self._runner, vg, lv)
        pv, offset = self._location(info, check_segments=False)
        found = loop.find(pv, offset)
        return found[0].path if found else None

    def active_devices(self, vg: str) -> dict[str, str]:
        attached = loop.devices()
        backings: dict[str, loop.Backing] = {}
        result = {}
        for info in lvs(self._runner, vg):
            pv, offset = self._location(info, check_segments=False)
            if pv not in backings:
                backings[pv] = loop.Backing(pv)
            backing = backings[pv]
            for dev in attached:
                if dev.offset == offset and backing.under(dev):
                    result[info.name] = dev.path
                    break
        return result

    def _location(self, info: LVInfo, check_segments: bool = True) -> tuple[str, int]:
        """The PV and byte offset where the LV's first segment starts."""
        if check_segments and info.seg_count != 1:
            raise MultiSegmentLV(info.vg, info.name, info.seg_count)
        seg = info.segments[0]
        if seg.first_pe < 0:
            raise ActivationError(f"cannot map {info.vg}/{info.name} with a loop device: segment {seg.pv}")
        key = (info.vg, seg.pv)
        if key not in self._pe_start:
            self._pe_start[key] = vg_info(self._runner, info.vg).pv(seg.pv).pe_start
        return seg.pv, self._pe_start[key] + seg.first_pe * info.extent_size

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        os.makedirs(os.path.dirname(self._lock_path), exist_ok=True)
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)
