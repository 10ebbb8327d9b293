"""Real test storage: files under /var/tmp and loop devices.

O_DIRECT needs a real file system (not tmpfs), so everything lives under
/var/tmp/xtnd-tests. Loop devices are created with an explicit logical
sector size to cover both 512 and 4096-byte sector storage.

Guarded areas surround a region with pattern bytes so a test can prove that
nothing wrote outside the region under test (as sanlock's tests do).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import uuid
from collections.abc import Callable, Iterator

BASE = "/var/tmp/xtnd-tests"
GUARD = 1024 * 1024
GUARD_BYTE = 0xA5


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
