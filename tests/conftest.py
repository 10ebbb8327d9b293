from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest
from testlib import storage
from testlib.sanlockd import sanlock_hosts, sanlockd  # noqa: F401 (fixtures)


@pytest.fixture
def workdir(request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh directory under /var/tmp (O_DIRECT capable), removed after."""
    os.makedirs(storage.BASE, exist_ok=True)
    path = storage.workdir(request.node.name[:40].replace("/", "_").replace("[", "_").replace("]", ""))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def need_root() -> None:
    if not storage.is_root():
        pytest.skip("needs root")
