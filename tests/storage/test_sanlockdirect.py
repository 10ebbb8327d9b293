"""sanlock direct on plain files: formatting, io_timeout, reading leaders.

The lease states held and released need a sanlock daemon: see
test_spmowner.py.
"""

from __future__ import annotations

import os

import pytest
from xtnd import storage
from xtnd.storage import sanlockdirect

MiB = 1024**2


@pytest.fixture
def areas(workdir: str) -> tuple[str, str]:
    # A ':' in the directory: sanlock needs it escaped in every argument.
    base = os.path.join(workdir, "a:b")
    os.mkdir(base)
    ids, leases = os.path.join(base, "ids"), os.path.join(base, "leases")
    for path in (ids, leases):
        with open(path, "wb") as f:
            f.truncate(4 * MiB)
    return ids, leases


def test_lockspace_io_timeout(areas: tuple[str, str]) -> None:
    ids, _ = areas
    sanlockdirect.init_lockspace("ls", ids, io_timeout=3)
    assert sanlockdirect.lockspace_io_timeout("ls", ids) == 3
    leader = sanlockdirect.read_lockspace_leader("ls", ids, host_id=7)
    assert (leader["magic"], leader["space_name"], leader["io_timeout"]) == (sanlockdirect.DELTA_MAGIC, "ls", "3")
    sanlockdirect.init_lockspace("ls", ids)
    assert sanlockdirect.lockspace_io_timeout("ls", ids) == 10


@pytest.mark.parametrize("io_timeout", [0, -1, 61])
def test_lockspace_io_timeout_invalid(areas: tuple[str, str], io_timeout: int) -> None:
    # sanlock itself takes 0 as "default" and 61 as is.
    with pytest.raises(storage.InvalidArgument, match="1..60"):
        sanlockdirect.init_lockspace("ls", areas[0], io_timeout=io_timeout)


def test_bad_geometry(areas: tuple[str, str]) -> None:
    with pytest.raises(storage.InvalidArgument, match="alignment"):
        sanlockdirect.init_lockspace("ls", areas[0], align=3 * MiB)
    with pytest.raises(storage.InvalidArgument, match="sector"):
        sanlockdirect.init_resource("ls", "SDM", areas[1], MiB, sector_size=1024)


def test_free_resource(areas: tuple[str, str]) -> None:
    _, leases = areas
    sanlockdirect.init_resource("ls", "SDM", leases, MiB)
    leader = sanlockdirect.read_resource_leader("ls", "SDM", leases, MiB)
    assert leader == sanlockdirect.ResourceLeader("ls", "SDM", owner_id=0, owner_generation=0, timestamp=0, lver=0)
    assert not leader.held
    assert "SDM" in sanlockdirect.dump(leases, MiB)


def test_read_unformatted(areas: tuple[str, str]) -> None:
    ids, leases = areas
    with pytest.raises(storage.LeaseAreaError, match="read_leader done") as e:
        sanlockdirect.read_resource_leader("ls", "SDM", leases, MiB)
    assert e.value.path == leases and e.value.offset == MiB
    assert b"magic 0x0" in e.value.raw
    with pytest.raises(storage.LeaseAreaError):
        sanlockdirect.lockspace_io_timeout("ls", ids)


def test_read_other_resource(areas: tuple[str, str]) -> None:
    ids, leases = areas
    sanlockdirect.init_resource("ls", "OTHER", leases, MiB)
    with pytest.raises(storage.LeaseAreaError, match="found ls:OTHER"):
        sanlockdirect.read_resource_leader("ls", "SDM", leases, MiB)
    # A lockspace formatted under another name is not ours either.
    sanlockdirect.init_lockspace("other", ids)
    with pytest.raises(storage.LeaseAreaError, match="found other:"):
        sanlockdirect.lockspace_io_timeout("ls", ids)
