"""Loop-device storage for rigs: files under /var/tmp and loop devices.

O_DIRECT needs a real file system (not tmpfs), so everything lives under
/var/tmp (BASE for tests and benches; the demo uses its own folder). Loop
devices are created with an explicit logical sector size to cover both 512
and 4096-byte sector storage.

- losetup/detach/loop_device: one loop device over a file.
- loop_pvs: sparse files on loop devices to be LVM PVs; on exit every loop
  device mapping an LV of them (loop activation) is detached first.
- detach_stale: a safety net detaching loop devices over files a rig owns.
- fail_storage/restore_storage: make one host's view of shared storage fail
  (reads come back short) while other hosts go on.
- GuardedArea: a region surrounded by pattern bytes, to prove that nothing
  wrote outside it (as sanlock's tests do).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import subprocess
import uuid
from collections.abc import Callable, Iterator

BASE = "/var/tmp/xtnd-tests"
GUARD = 1024 * 1024
GUARD_BYTE = 0xA5
PV_SIZE = 512 * 1024**2


def workdir(name: str) -> str:
    path = os.path.join(BASE, f"{name}-{uuid.uuid4().hex[:8]}")
    os.makedirs(path)
    return path


def make_file(path: str, size: int, fill: int = 0) -> str:
    with open(path, "wb") as f:
        if fill:
            f.write(bytes([fill]) * size)
        else:
            f.truncate(size)
    return path


def is_root() -> bool:
    return os.geteuid() == 0


def losetup(path: str, sector_size: int = 512, offset: int = 0, sizelimit: int = 0) -> str:
    cmd = ["losetup", "--find", "--show", "--sector-size", str(sector_size)]
    if offset:
        cmd += ["--offset", str(offset)]
    if sizelimit:
        cmd += ["--sizelimit", str(sizelimit)]
    cmd.append(path)
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()


def detach(device: str) -> None:
    subprocess.run(["losetup", "--detach", device], check=False, capture_output=True)


def _loops() -> dict[str, str]:
    """Attached loop devices: /dev/loopN -> backing file as the kernel shows it."""
    found = {}
    for name in os.listdir("/sys/block"):
        if not name.startswith("loop"):
            continue
        try:
            with open(f"/sys/block/{name}/loop/backing_file") as f:
                found[f"/dev/{name}"] = f.read().strip()
        except OSError:
            continue  # not attached
    return found


def detach_stale(owned: Callable[[str], bool]) -> list[str]:
    """Detach loop devices whose backing file ``owned`` accepts.

    Devices stacked on them (LVs emulated by loop devices over a loop PV,
    whose backing file the kernel shows as "/loopN") go first. A safety net
    for tests that fail before their own cleanup runs.
    """
    loops = _loops()
    doomed = {dev for dev, backing in loops.items() if owned(backing.removesuffix(" (deleted)"))}
    stacked = {dev for dev, backing in loops.items() if "/dev" + backing in doomed or backing in doomed}
    for dev in [*sorted(stacked - doomed), *sorted(doomed)]:
        detach(dev)
    return sorted(doomed | stacked)


@contextlib.contextmanager
def loop_device(path: str, sector_size: int = 512, offset: int = 0, sizelimit: int = 0) -> Iterator[str]:
    device = losetup(path, sector_size, offset, sizelimit)
    try:
        yield device
    finally:
        detach(device)


class GuardedArea:
    """A backing file: guard | region | guard, guards filled with a pattern."""

    def __init__(self, path: str, size: int):
        self.path = path
        self.size = size
        with open(path, "wb") as f:
            f.write(bytes([GUARD_BYTE]) * GUARD)
            f.write(bytes(size))
            f.write(bytes([GUARD_BYTE]) * GUARD)

    @property
    def offset(self) -> int:
        return GUARD

    def check_guards(self) -> None:
        with open(self.path, "rb") as f:
            head = f.read(GUARD)
            f.seek(GUARD + self.size)
            tail = f.read(GUARD)
        expected = bytes([GUARD_BYTE]) * GUARD
        assert head == expected, "something wrote before the guarded region"
        assert tail == expected, "something wrote after the guarded region"


def loops_over(device: str) -> list[str]:
    """Loop devices whose backing file is device (LVs in loop activation).

    A device attached from another mount namespace shows its backing device
    as that namespace saw it ("/loop7" rather than "/dev/loop7"): both match.
    """
    names = {device, "/" + os.path.basename(device)}
    return sorted(dev for dev, backing in _loops().items() if backing in names)


@contextlib.contextmanager
def loop_pvs(workdir: str, count: int = 1, size: int = PV_SIZE) -> Iterator[list[str]]:
    """count sparse files of size under workdir on loop devices, for LVM PVs.

    Give LVM only these devices (lvm.Runner(devices=...)) so that VGs others
    create on the machine at the same time stay invisible.
    """
    devices: list[str] = []
    try:
        for i in range(count):
            path = make_file(os.path.join(workdir, f"pv{i}"), size)
            devices.append(losetup(path))
        yield devices
    finally:
        for device in devices:
            for loop in loops_over(device):
                detach(loop)
            # Wipe the label so a reused loop number never shows a stale PV.
            subprocess.run(["wipefs", "--all", "--quiet", device], check=False, capture_output=True)
            detach(device)


# Making one host's storage fail: sanlock opens its ids and leases once and
# keeps the descriptors, so changing paths or permissions (root!) has no
# effect. Instead each host reaches the shared files through its own loop
# device; shrinking that device's size limit to one sector makes every
# sanlock read of the host come back short (sanlock logs error -90) while the
# other hosts, on their own loop devices over the same files, go on working.

_LOOP_SET_STATUS64 = 0x4C04
_LOOP_GET_STATUS64 = 0x4C05
# struct loop_info64 from <linux/loop.h>; lo_sizelimit is the 5th field.
_LOOP_INFO64 = struct.Struct("=QQQQQIIII64s64s32s2Q")


def set_loop_sizelimit(device: str, sizelimit: int) -> None:
    """Change a loop device's size limit in place (0 = up to the file's end)."""
    fd = os.open(device, os.O_RDONLY)
    try:
        buf = bytearray(_LOOP_INFO64.size)
        fcntl.ioctl(fd, _LOOP_GET_STATUS64, buf)
        fields = list(_LOOP_INFO64.unpack(buf))
        fields[4] = sizelimit
        fcntl.ioctl(fd, _LOOP_SET_STATUS64, _LOOP_INFO64.pack(*fields))
    finally:
        os.close(fd)


def fail_storage(*devices: str) -> None:
    """Make every read past the first sector of these loop devices short."""
    for device in devices:
        set_loop_sizelimit(device, 512)


def restore_storage(*devices: str) -> None:
    for device in devices:
        set_loop_sizelimit(device, 0)


def attach_loop(path: str) -> str:
    """A loop device over path with direct I/O, so hosts never see stale data."""
    cmd = ["losetup", "--find", "--show", "--direct-io=on", path]
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()
