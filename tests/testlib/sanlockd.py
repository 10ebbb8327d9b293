"""Fixtures starting real sanlock daemons (xtnd.tools.rig.sanlockd).

Everything is started from fixtures and killed at teardown, even when a test
fails.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from xtnd.tools.rig.sanlockd import SanlockDaemon, missing


@pytest.fixture(scope="session")
def sanlockd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SanlockDaemon]:
    """A sanlock daemon serving the pytest process (root namespace)."""
    reason = missing()
    if reason:
        pytest.skip(f"sanlock: {reason}")
    logdir = tmp_path_factory.mktemp("sanlockd")
    daemon = SanlockDaemon("root", str(logdir), namespace=False).start()
    yield daemon
    daemon.stop()


@pytest.fixture
def sanlock_hosts(workdir: str) -> Iterator[Callable[[int], list[SanlockDaemon]]]:
    """Factory: start(n) -> n daemons, one per host, each in its own namespace.

    All of them are killed at the end of the test, with their clients.
    """
    reason = missing()
    if reason:
        pytest.skip(f"sanlock: {reason}")
    started: list[SanlockDaemon] = []

    def start(count: int) -> list[SanlockDaemon]:
        hosts = []
        for _ in range(count):
            daemon = SanlockDaemon(f"host{len(started) + 1}", workdir)
            started.append(daemon)
            hosts.append(daemon.start())
        return hosts

    yield start
    for daemon in reversed(started):
        daemon.stop()
