from __future__ import annotations

from collections.abc import Iterator

import pytest
from xtnd import lvm
from xtnd.tools.rig import loops

MiB = 1024**2
# Small extents keep test VGs on 512 MiB PVs (production: 128 MiB).
EXTENT = 4 * MiB


@pytest.fixture
def loop_only(need_root: None) -> None:
    if lvm.device_mapper_available():
        pytest.skip("these tests map LVs with loop devices (no device-mapper)")


@pytest.fixture
def pvs(workdir: str, loop_only: None) -> Iterator[list[str]]:
    with loops.loop_pvs(workdir, count=2) as devices:
        yield devices
