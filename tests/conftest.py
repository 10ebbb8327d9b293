from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest
from testlib.sanlockd import sanlock_hosts, sanlockd  # noqa: F401 (fixtures)
from testlib.sdnotify import NotifySocket
from xtnd.tools.rig import loops


def pytest_sessionstart(session: pytest.Session) -> None:
    """Detach loop devices left by earlier runs whose files are gone."""
    if loops.is_root() and os.path.isdir("/sys/block"):
        stale = loops.detach_stale(lambda b: b.startswith(loops.BASE + "/") and not os.path.exists(b))
        if stale:
            print(f"detached {len(stale)} stale loop devices from earlier runs")


@pytest.fixture
def workdir(request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh directory under /var/tmp (O_DIRECT capable), removed after.

    Loop devices over files in it that a failed test did not detach are
    detached here (set up first, this fixture is torn down last).
    """
    os.makedirs(loops.BASE, exist_ok=True)
    path = loops.workdir(request.node.name[:40].replace("/", "_").replace("[", "_").replace("]", ""))
    yield path
    if loops.is_root():
        leaked = loops.detach_stale(lambda b: b.startswith(path + "/"))
        if leaked:
            print(f"detached {len(leaked)} loop devices the test left behind: {leaked}")
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def notify(workdir: str) -> Iterator[NotifySocket]:
    """The NOTIFY_SOCKET of a daemon under test (systemd's side of Type=notify)."""
    sock = NotifySocket(os.path.join(workdir, "notify"))
    yield sock
    sock.close()


@pytest.fixture
def need_root() -> None:
    if not loops.is_root():
        pytest.skip("needs root")
