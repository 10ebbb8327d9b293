"""``xtnd volume create|remove`` on a host that is not the SPM, against real sanlock.

Another host (a sanlock daemon in its own namespace, LeaseAgent holding
the SDM lease like an SPM does) is the SPM of a master block domain on a
loop PV; the pytest process plays a host without an SPM daemon and runs
the CLI through xtnd.tools.cli.main.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable, Iterator

import pytest
from testlib.lease_agent import LeaseAgent
from xtnd import lvm, storage
from xtnd.spm import control
from xtnd.tools import cli
from xtnd.tools.rig.sanlockd import SanlockDaemon

MiB = 1024**2
EXTENT = 4 * MiB
SPM_HOST_ID = 2


@pytest.fixture
def config(workdir: str, monkeypatch: pytest.MonkeyPatch) -> str:
    # No SPM daemon on this host: its socket does not exist.
    monkeypatch.setenv(control.ENV, os.path.join(workdir, "spm.sock"))
    return os.path.join(workdir, "storage.json")


@pytest.fixture
def master(pvs: list[str], config: str) -> Iterator[storage.BlockDomain]:
    domain = storage.create_block_domain(
        uuid.uuid4(), pvs[:1], master=True, max_hosts=10, extent_size=EXTENT, activation="loop", io_timeout=1
    )
    host = storage.HostConfig(config, activation="loop")
    host.add_block(domain.uuid, pvs[:1])
    host.save()
    yield domain
    domain.deactivate_special()


@pytest.fixture
def spm(master: storage.BlockDomain, sanlock_hosts: Callable[[int], list[SanlockDaemon]]) -> LeaseAgent:
    """Another host holding the master domain's SPM lease."""
    [host] = sanlock_hosts(1)
    ls, lease = master.lockspace(), master.spm_lease()
    agent = LeaseAgent(host, ls.name, SPM_HOST_ID, ls.path, lease.path, io_timeout=1)
    agent.call("join")
    agent.call("acquire")
    return agent


def xtnd(config: str, *argv: str) -> int:
    return cli.main([*argv, "--storage-config", config])


def create(config: str, domain: uuid.UUID, vol: uuid.UUID, *extra: str) -> int:
    argv = ["volume", "create", "--domain", str(domain), "--uuid", str(vol), "--capacity", "100M"]
    return xtnd(config, *argv, "--initial-size", "8M", "--format", "raw", *extra)


def remove(config: str, domain: uuid.UUID, vol: uuid.UUID, *extra: str) -> int:
    return xtnd(config, "volume", "remove", "--domain", str(domain), "--uuid", str(vol), *extra)


def lv_names(domain: storage.BlockDomain) -> set[str]:
    return {lv.name for lv in lvm.lvs(domain.runner, domain.vg)}


def test_refused_while_another_host_is_spm(
    master: storage.BlockDomain,
    spm: LeaseAgent,
    config: str,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    leader = master.spm_lease_leader()
    assert leader is not None and leader.held and leader.owner_id == SPM_HOST_ID
    before = lv_names(master)
    vol = uuid.uuid4()
    caplog.clear()

    assert create(config, master.uuid, vol) == 2
    err = capsys.readouterr().err
    assert f"host {SPM_HOST_ID} holds the SPM lease of master domain {master.uuid}" in err
    assert f"run the command on host {SPM_HOST_ID}" in err
    assert any(
        r.levelno == logging.WARNING and f"owner_host_id={SPM_HOST_ID}" in r.getMessage() for r in caplog.records
    )
    assert lv_names(master) == before, "nothing created"

    # The operator insists: bootstrap/recovery override.
    assert create(config, master.uuid, vol, "--local") == 0
    assert str(vol) in lv_names(master)
    capsys.readouterr()

    assert remove(config, master.uuid, vol) == 2
    assert f"host {SPM_HOST_ID} holds" in capsys.readouterr().err
    assert str(vol) in lv_names(master), "nothing removed"

    # Reading volumes changes nothing: never refused.
    assert xtnd(config, "volume", "info", "--domain", str(master.uuid), "--uuid", str(vol)) == 0

    # No SPM anywhere any more: released (owner id kept, timestamp 0).
    spm.call("release")
    leader = master.spm_lease_leader()
    assert leader is not None and not leader.held and leader.owner_id == SPM_HOST_ID
    assert remove(config, master.uuid, vol) == 0
    assert create(config, master.uuid, uuid.uuid4()) == 0


def test_other_domain_of_the_pool(
    master: storage.BlockDomain, spm: LeaseAgent, pvs: list[str], config: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A non-master domain: its pool's master is found in the host storage config."""
    sd, vol = uuid.uuid4(), uuid.uuid4()
    assert xtnd(config, "domain", "create", "--uuid", str(sd), "--pv", pvs[1], "--extent-size", "4M") == 0
    other = storage.HostConfig.load(config).open(sd)
    assert isinstance(other, storage.BlockDomain)
    capsys.readouterr()
    assert create(config, sd, vol) == 2
    assert f"master domain {master.uuid}" in capsys.readouterr().err
    assert str(vol) not in lv_names(other)
    spm.call("release")
    assert create(config, sd, vol) == 0


def test_holder_host_died(master: storage.BlockDomain, spm: LeaseAgent, config: str) -> None:
    """A dead SPM host's lease reads as held until a standby takes it over."""
    spm.host.kill()
    assert create(config, master.uuid, uuid.uuid4()) == 2


def test_file_domain_not_checked(
    workdir: str, config: str, need_root: None, sanlock_hosts: Callable[[int], list[SanlockDaemon]]
) -> None:
    """File volumes are files, not LVM metadata: today's behaviour, even under a held lease."""
    sd = uuid.uuid4()
    assert xtnd(config, "domain", "create", "--uuid", str(sd), "--path", workdir, "--master", "--io-timeout", "1") == 0
    domain = storage.HostConfig.load(config).open(sd)
    ls, lease = domain.lockspace(), domain.spm_lease()
    [host] = sanlock_hosts(1)
    agent = LeaseAgent(host, ls.name, SPM_HOST_ID, ls.path, lease.path, io_timeout=1)
    agent.call("join")
    agent.call("acquire")
    vol = uuid.uuid4()
    assert create(config, sd, vol) == 0
    assert domain.volume_info(vol).size == 100 * MiB
