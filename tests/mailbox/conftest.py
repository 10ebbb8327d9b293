from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from testlib.mailboxes import AREA, Areas
from xtnd.mailbox import directio
from xtnd.tools.rig import loops


@pytest.fixture(params=["memory", "file", "loop512", "loop4096"])
def areas(request: pytest.FixtureRequest, workdir: str) -> Iterator[Areas]:
    kind = request.param
    if kind == "memory":
        mem = {"inbox": directio.MemoryStorage(AREA, "inbox"), "outbox": directio.MemoryStorage(AREA, "outbox")}
        yield Areas(lambda name: mem[name])
        return
    if kind == "file":
        for name in ("inbox", "outbox"):
            loops.make_file(os.path.join(workdir, name), AREA)
        yield Areas(lambda name: directio.DirectFile(os.path.join(workdir, name)))
        return
    if not loops.is_root():
        pytest.skip("loop devices need root")
    sector = int(kind.removeprefix("loop"))
    guarded = {name: loops.GuardedArea(os.path.join(workdir, name), AREA) for name in ("inbox", "outbox")}
    devices = {name: loops.losetup(g.path, sector, offset=g.offset, sizelimit=AREA) for name, g in guarded.items()}
    handles: list[directio.DirectFile] = []

    def opener(name: str) -> directio.Storage:
        f = directio.DirectFile(devices[name])
        handles.append(f)
        return f

    def check() -> None:
        for g in guarded.values():
            g.check_guards()

    try:
        yield Areas(opener, check)
        check()
    finally:
        for f in handles:
            f.close()
        for dev in devices.values():
            loops.detach(dev)


@pytest.fixture
def file_areas(workdir: str) -> Areas:
    for name in ("inbox", "outbox"):
        loops.make_file(os.path.join(workdir, name), AREA)
    return Areas(lambda name: directio.DirectFile(os.path.join(workdir, name)))
