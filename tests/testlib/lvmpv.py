"""Loop-device PVs for LVM tests (tests/lvm, tests/storage).

Each PV is a sparse file under /var/tmp attached to its own loop device;
tests give LVM only their own devices (Runner(devices=...)) so that VGs
other tests create on this machine at the same time stay invisible. On
cleanup every loop device mapping an LV of the PV (loop activation) is
detached before the PV's own device.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator

from testlib import storage

PV_SIZE = 512 * 1024**2


def _loops_over(device: str) -> list[str]:
    found = []
    for name in os.listdir("/sys/block"):
        path = f"/sys/block/{name}/loop/backing_file"
        try:
            with open(path) as f:
                if f.read().strip() == device:
                    found.append(f"/dev/{name}")
        except OSError:
            continue
    return found


@contextlib.contextmanager
def loop_pvs(workdir: str, count: int = 1, size: int = PV_SIZE) -> Iterator[list[str]]:
    devices: list[str] = []
    try:
        for i in range(count):
            path = storage.make_file(os.path.join(workdir, f"pv{i}"), size)
            devices.append(storage.losetup(path))
        yield devices
    finally:
        for device in devices:
            for loop in _loops_over(device):
                storage.detach(loop)
            # Wipe the label so a reused loop number never shows a stale PV.
            subprocess.run(["wipefs", "--all", "--quiet", device], check=False, capture_output=True)
            storage.detach(device)
