"""Refreshing a volume on this host after the SPM extended it.

The SPM changes LVM metadata only; every host using the volume must grow
its own mapping (mailbox/PROTOCOL.md §4): `lvchange --refresh` with
device-mapper, a new loop size limit without it (xtnd.lvm.activation),
whose new size and segments are read straight from the PV's metadata area
(xtnd.lvm.metadata; an lvs through the HSM's LVM shell when that cannot be
read). The size that counts is what the kernel says the device now is
(BLKGETSIZE64 through the volume's link), since that is what QEMU sees.
"""

from __future__ import annotations

import os
import stat
import threading
import uuid as uuidlib
from collections.abc import Callable

from xtnd import lvm, storage
from xtnd.hsm import links
from xtnd.lvm import loop


def device_size(path: str) -> int:
    """Size of a block device (BLKGETSIZE64) or of a regular file."""
    st = os.stat(path)
    if stat.S_ISBLK(st.st_mode):
        return loop.size(path)
    return st.st_size


class StorageVolumes:
    """Volumes of the domains listed in the host storage config."""

    def __init__(self, config_path: str, run_dir: str = links.RUN_DIR, shell: lvm.LvmShell | None = None):
        """shell: the LVM shell every block domain's commands go through (None: processes)."""
        self._config_path = config_path
        self._run_dir = run_dir
        self.shell = shell
        self._lock = threading.Lock()
        self._mtime: float | None = None
        self._domains: dict[uuidlib.UUID, storage.Domain] = {}

    def domain(self, uuid: uuidlib.UUID) -> storage.Domain:
        """The domain, opened once; again after the host config changed
        (e.g. vgextend added a PV: LVM must be told about it)."""
        try:
            mtime: float | None = os.stat(self._config_path).st_mtime
        except FileNotFoundError:
            mtime = None
        with self._lock:
            if mtime != self._mtime:
                self._domains.clear()
                self._mtime = mtime
            found = self._domains.get(uuid)
        if found is None:
            found = storage.HostConfig.load(self._config_path).open(uuid)
            if isinstance(found, storage.BlockDomain):
                found.runner.shell = self.shell
            with self._lock:
                self._domains[uuid] = found
        return found

    def refresh(self, domain: uuidlib.UUID, volume: uuidlib.UUID, verified: Callable[[int], None] | None = None) -> int:
        """Grow this host's mapping; the device's size now. verified(size):
        the volume's size on storage, before the device grows where the
        domain can say it (block domains), else not called."""
        found = self.domain(domain)
        if isinstance(found, storage.BlockDomain):
            found.refresh_volume(volume, verified)
        else:
            found.refresh_volume(volume)
        return device_size(links.link_path(domain, volume, self._run_dir))
