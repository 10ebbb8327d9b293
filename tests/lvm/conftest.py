from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from xtnd import lvm
from xtnd.tools.rig import loops

EXTENT = 4 * 1024**2


@pytest.fixture
def pvs(workdir: str, need_root: None) -> Iterator[list[str]]:
    with loops.loop_pvs(workdir, count=2) as devices:
        yield devices


@pytest.fixture
def shell() -> Iterator[lvm.LvmShell]:
    sh = lvm.LvmShell("test-lvm")
    try:
        yield sh
    finally:
        sh.close()


@pytest.fixture(params=["process", "shell"])
def runner(request: pytest.FixtureRequest, pvs: list[str]) -> lvm.Runner:
    """Every LVM test runs both ways: one process per command, and the LVM shell."""
    if request.param == "shell":
        return lvm.Runner(pvs, shell=request.getfixturevalue("shell"))
    return lvm.Runner(pvs)


@pytest.fixture
def vg(runner: lvm.Runner, pvs: list[str]) -> str:
    """A VG on the first PV only (the second is left for vgextend)."""
    name = str(uuid.uuid4())
    lvm.pvcreate(runner, pvs[0])
    lvm.vgcreate(runner, name, [pvs[0]], EXTENT)
    return name
