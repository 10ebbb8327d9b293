"""A PV whose writes can be made to hang, as on a SAN path that stops answering.

The PV is a loop device over a file on a small ext4 file system of its own
(itself on a loop device, mounted under the test's workdir). fsfreeze -f
blocks every write to that file system: the loop device's writes to its
backing file wait, so an LVM command writing metadata to the PV sits in
uninterruptible I/O, and a SIGKILLed one cannot exit (the kernel waits for
its I/O) until thaw. Reads go on. Only this test's file system is frozen.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator

from xtnd.tools.rig import loops as storage

MiB = 1024**2


class FreezablePV:
    def __init__(self, mountpoint: str, device: str):
        self.mountpoint = mountpoint
        self.device = device
        self.frozen = False

    def freeze(self) -> None:
        subprocess.run(["fsfreeze", "--freeze", self.mountpoint], check=True)
        self.frozen = True

    def thaw(self) -> None:
        if self.frozen:
            subprocess.run(["fsfreeze", "--unfreeze", self.mountpoint], check=True)
            self.frozen = False


@contextlib.contextmanager
def freezable_pv(workdir: str, size: int = 512 * MiB) -> Iterator[FreezablePV]:
    image = storage.make_file(os.path.join(workdir, "fs.img"), size + 64 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", image], check=True, capture_output=True)
    mountpoint = os.path.join(workdir, "fs")
    os.mkdir(mountpoint)
    fs_device = storage.losetup(image)
    try:
        subprocess.run(["mount", fs_device, mountpoint], check=True, capture_output=True)
        try:
            pv_file = storage.make_file(os.path.join(mountpoint, "pv"), size)
            pv = FreezablePV(mountpoint, storage.losetup(pv_file))
            try:
                yield pv
            finally:
                pv.thaw()
                subprocess.run(["wipefs", "--all", "--quiet", pv.device], check=False, capture_output=True)
                storage.detach(pv.device)
        finally:
            subprocess.run(["umount", mountpoint], check=False, capture_output=True)
    finally:
        storage.detach(fs_device)
