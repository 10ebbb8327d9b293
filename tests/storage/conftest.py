from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from xtnd import storage
from xtnd.tools.rig import loops

MiB = 1024**2
# Small extents keep test VGs on 512 MiB PVs (production: 128 MiB).
EXTENT = 4 * MiB


@pytest.fixture
def loop_mode(need_root: None) -> None:
    """Block domains of these tests map LVs with loop devices on any kernel:
    every domain is opened with activation="loop" (argument or storage.json),
    so the suite runs the same with or without device-mapper. Device-mapper
    activation has its own tests (tests/lvm/test_activation.py)."""


@pytest.fixture
def pvs(workdir: str, loop_mode: None) -> Iterator[list[str]]:
    with loops.loop_pvs(workdir, count=2) as devices:
        yield devices


@pytest.fixture
def domain(pvs: list[str]) -> storage.BlockDomain:
    """A master block domain on the first PV."""
    return storage.create_block_domain(
        uuid.uuid4(), pvs[:1], master=True, max_hosts=10, extent_size=EXTENT, activation="loop"
    )
