from __future__ import annotations

from collections.abc import Iterator

import pytest
from xtnd.tools.rig import loops
from xtnd.tools.rig.spmd import Pool


@pytest.fixture
def pvs(workdir: str, need_root: None) -> Iterator[list[str]]:
    """PVs of a Pool, whose domain uses loop activation on any kernel."""
    with loops.loop_pvs(workdir, count=1) as devices:
        yield devices


@pytest.fixture
def pool(workdir: str, pvs: list[str]) -> Iterator[Pool]:
    p = Pool(workdir, pvs)
    try:
        yield p
    finally:
        p.remove()
