from __future__ import annotations

import os
import uuid

import pytest
from xtnd import storage
from xtnd.mailbox.directio import DirectFile
from xtnd.storage import constants as c
from xtnd.storage import qemuimg, sanlockdirect

MiB = 1024**2


@pytest.fixture
def domain(workdir: str) -> storage.FileDomain:
    return storage.create_file_domain(uuid.uuid4(), workdir, master=True, max_hosts=10)


def test_create_layout(workdir: str) -> None:
    lines: list[str] = []
    sd = uuid.uuid4()
    domain = storage.create_file_domain(sd, workdir, progress=lines.append)
    assert domain.path == os.path.join(workdir, str(sd))
    assert sorted(os.listdir(os.path.join(domain.path, "dom_md"))) == sorted([*c.SPECIAL_NAMES, "metadata"])
    assert lines[-1] == f"domain {sd} created"
    info = storage.open_domain(sd, root=workdir).info()
    assert (info.kind, info.master, info.max_hosts, info.volumes) == ("file", False, 250, ())
    assert info.free > 0
    assert info.special[c.INBOX] == os.path.join(domain.path, "dom_md", "inbox")
    with pytest.raises(storage.DomainExists):
        storage.create_file_domain(sd, workdir)


def test_open_missing(workdir: str) -> None:
    with pytest.raises(storage.DomainNotFound):
        storage.open_domain(uuid.uuid4(), root=workdir)


def test_sanlock_and_mailbox(domain: storage.FileDomain) -> None:
    ls = domain.lockspace()
    assert sanlockdirect.read_lockspace_leader(ls.name, ls.path, ls.offset)["space_name"] == str(domain.uuid)
    lease = domain.spm_lease()
    assert "SDM" in sanlockdirect.dump(lease.path, lease.offset)
    mb = domain.mailbox()
    with DirectFile(mb.inbox, readonly=True) as f:
        assert f.read(0, 11 * 4096) == bytes(11 * 4096)


def test_io_timeout(workdir: str) -> None:
    lines: list[str] = []
    domain = storage.create_file_domain(uuid.uuid4(), workdir, io_timeout=3, progress=lines.append)
    assert any("io_timeout 3 s" in line for line in lines)
    assert domain.info().io_timeout == 3
    ls = domain.lockspace()
    assert sanlockdirect.read_lockspace_leader(ls.name, ls.path, ls.offset)["io_timeout"] == "3"
    with pytest.raises(storage.InvalidArgument, match="io_timeout"):
        storage.create_file_domain(uuid.uuid4(), workdir, io_timeout=61)


def test_io_timeout_unreadable(domain: storage.FileDomain) -> None:
    with open(domain.lockspace().path, "r+b") as f:
        f.write(bytes(512))
    assert domain.info().io_timeout is None


def test_volumes(domain: storage.FileDomain) -> None:
    q = domain.create_volume(uuid.uuid4(), 100 * MiB, "qcow2")
    r = domain.create_volume(uuid.uuid4(), 10 * MiB, "raw")
    assert q.path is not None
    assert qemuimg.info(q.path)["virtual-size"] == 100 * MiB
    assert r.size == 10 * MiB
    assert {v.uuid for v in domain.list_volumes()} == {q.uuid, r.uuid}
    # File volumes grow by themselves: extend is a successful no-op.
    assert domain.extend_volume(q.uuid, 50 * MiB) == 50 * MiB
    assert domain.prepare_volume(q.uuid) == q.path
    domain.remove_volume(q.uuid)
    assert [v.uuid for v in domain.list_volumes()] == [r.uuid]
    assert not os.path.exists(q.path)
    with pytest.raises(storage.VolumeNotFound):
        domain.remove_volume(q.uuid)
    with pytest.raises(storage.VolumeExists):
        domain.create_volume(r.uuid, 10 * MiB, "raw")


def test_max_size() -> None:
    assert storage.max_size(1024 * MiB) == 1127 * MiB  # 1126.4 rounded up
    assert storage.max_size(10 * MiB) == 11 * MiB
    assert storage.max_size(1) == MiB
