"""A pool of 2000 hosts (sanlock's limit): ``domain create --max-hosts 2000``
on 4 KiB-sector storage (the largest lease alignment, 8 MiB), its sanlock
areas, and a mailbox whose SPM serves host ids 1 and 2000."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator

import pytest
from testlib.cli import xtnd
from xtnd import storage
from xtnd.mailbox import codec, directio
from xtnd.mailbox.hsm import HSMMailbox
from xtnd.mailbox.spm import SPMConfig, SPMMailbox
from xtnd.storage import constants as c
from xtnd.tools.rig import loops

MiB = 1024**2
HOSTS = 2000


@pytest.fixture
def pv4k(workdir: str, loop_mode: None) -> Iterator[str]:
    path = loops.make_file(os.path.join(workdir, "pv4k"), loops.PV_SIZE)
    device = loops.losetup(path, 4096)
    try:
        yield device
    finally:
        subprocess.run(["wipefs", "--all", "--quiet", device], check=False, capture_output=True)
        loops.detach(device)


def serve_first_and_last(location: storage.MailboxLocation) -> None:
    """The SPM sees requests of host ids 1 and 2000 and answers both."""
    inbox, outbox = directio.DirectFile(location.inbox), directio.DirectFile(location.outbox)
    try:
        spm = SPMMailbox(inbox, outbox, location.max_hosts, SPMConfig(workers=0))
        spm.register(codec.EXTEND_OPCODE, lambda req: req.message.size_mb)
        spm.reset()
        reqs = {h: codec.encode(codec.Extend(uuid.uuid4(), uuid.uuid4(), h)) for h in (1, HOSTS)}
        for h, raw in reqs.items():
            inbox.write(h * codec.BLOCK_SIZE, codec.build_block([raw]))
        inbox.write(0, codec.encode_event())
        spm.step()
        for h, raw in reqs.items():
            assert codec.slot(outbox.read(h * codec.BLOCK_SIZE, codec.BLOCK_SIZE), 0) == raw
    finally:
        inbox.close()
        outbox.close()


def test_block_domain_for_2000_hosts(pv4k: str, workdir: str) -> None:
    sd = str(uuid.uuid4())
    config = storage.HostConfig(os.path.join(workdir, "storage.json"), activation="loop")
    config.save()  # loop activation on any kernel
    cfg = ["--storage-config", config.path]
    assert (
        xtnd(
            "domain",
            "create",
            "--uuid",
            sd,
            "--pv",
            pv4k,
            "--master",
            "--max-hosts",
            str(HOSTS),
            "--extent-size",
            "4M",
            *cfg,
        )
        == 0
    )
    domain = storage.open_domain(uuid.UUID(sd), pvs=[pv4k], activation="loop")
    try:
        info = domain.info()
        assert info.max_hosts == HOSTS
        assert info.spm_lease_offset == 8 * MiB  # sanlock's alignment for 2000 hosts on 4 KiB sectors
        leader = domain.spm_lease_leader()
        assert leader is not None and leader.owner_id == 0  # formatted, never acquired
        location = domain.mailbox()
        assert location.max_hosts == HOSTS
        for path in (location.inbox, location.outbox):
            with directio.DirectFile(path, readonly=True) as f:
                assert f.size >= (HOSTS + 1) * codec.BLOCK_SIZE
                assert f.read(0, (HOSTS + 1) * codec.BLOCK_SIZE) == bytes((HOSTS + 1) * codec.BLOCK_SIZE)
        serve_first_and_last(location)
    finally:
        domain.deactivate_special()


def test_file_domain_for_2000_hosts(workdir: str) -> None:
    domain = storage.create_file_domain(uuid.uuid4(), os.path.join(workdir, "sd"), master=True, max_hosts=HOSTS)
    assert domain.info().max_hosts == HOSTS
    location = domain.mailbox()
    serve_first_and_last(location)
    # The daemons' classes with their threads: host 2000's HSM is served.
    spm = SPMMailbox(
        directio.DirectFile(location.inbox), directio.DirectFile(location.outbox), HOSTS, SPMConfig(workers=2)
    )
    spm.register(codec.EXTEND_OPCODE, lambda req: req.message.size_mb + 1)
    hsm = HSMMailbox(directio.DirectFile(location.inbox), directio.DirectFile(location.outbox), HOSTS)
    spm.start()
    hsm.start()
    try:
        assert hsm.submit(uuid.uuid4(), uuid.uuid4(), 1024 * MiB).result(timeout=30) == 1025 * MiB
    finally:
        hsm.stop()
        spm.stop()


def test_more_than_2000_hosts_refused(workdir: str) -> None:
    with pytest.raises(storage.InvalidArgument, match=f"1..{c.MAX_HOSTS_LIMIT}"):
        storage.create_file_domain(uuid.uuid4(), os.path.join(workdir, "sd"), max_hosts=HOSTS + 1)
