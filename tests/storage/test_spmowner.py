"""``xtnd volume create|remove`` on a host that is not the SPM, against real sanlock.

Another host (a sanlock daemon in its own namespace, LeaseAgent holding
the SDM lease like an SPM does) is the SPM of a master block domain on a
loop PV; the pytest process plays a host without an SPM daemon (host id
HOST_ID, its sanlock daemon in the root namespace) and runs the CLI
through xtnd.tools.cli.main. With no SPM anywhere, the CLI takes the SPM
lease itself for the command.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator

import pytest
from testlib.lease_agent import AgentError, LeaseAgent
from xtnd import lvm, storage
from xtnd.mailbox import codec as notice_codec
from xtnd.mailbox import notice
from xtnd.mailbox.directio import DirectFile
from xtnd.spm import control
from xtnd.tools import cli, domain_cli
from xtnd.tools.rig.sanlockd import SanlockDaemon
from xtnd.tools.rig.spmd import lvm_commands, vg_locked
from xtnd.tools.rig.wait import wait_for

MiB = 1024**2
EXTENT = 4 * MiB
SPM_HOST_ID = 2
HOST_ID = 1


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
    return xtnd(config, *argv, "--initial-size", "8M", "--format", "raw", "--host-id", str(HOST_ID), *extra)


def remove(config: str, domain: uuid.UUID, vol: uuid.UUID, *extra: str) -> int:
    argv = ["volume", "remove", "--domain", str(domain), "--uuid", str(vol), "--host-id", str(HOST_ID)]
    return xtnd(config, *argv, *extra)


def lv_names(domain: storage.BlockDomain) -> set[str]:
    return {lv.name for lv in lvm.lvs(domain.runner, domain.vg)}


def test_refused_while_another_host_is_spm(
    sanlockd: SanlockDaemon,
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
    sanlockd: SanlockDaemon,
    master: storage.BlockDomain,
    spm: LeaseAgent,
    pvs: list[str],
    config: str,
    capsys: pytest.CaptureFixture[str],
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


def _xtnd_process(config: str, *argv: str, no_sanlock: bool = False) -> subprocess.Popen[str]:
    """The CLI as its own process on this host (root namespace); with
    no_sanlock, in a mount namespace where no sanlock daemon answers."""
    cmd = [sys.executable, "-m", "xtnd.tools.cli", *argv, "--storage-config", config]
    if no_sanlock:
        script = 'mount -t tmpfs xtnd-no-sanlock /run/sanlock && exec "$@"'
        cmd = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh", *cmd]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _create_argv(domain: uuid.UUID, vol: uuid.UUID) -> list[str]:
    return ["volume", "create", "--domain", str(domain), "--uuid", str(vol), "--capacity", "100M", "--format", "raw"]


def test_cli_holds_the_lease_for_the_command(
    sanlockd: SanlockDaemon,
    master: storage.BlockDomain,
    config: str,
    sanlock_hosts: Callable[[int], list[SanlockDaemon]],
) -> None:
    """No SPM anywhere: the CLI takes the SPM lease for its command. While
    its lvcreate waits (the test holds LVM's VG lock), another host cannot
    take the lease; once the command is done it can."""
    [other] = sanlock_hosts(1)
    ls, lease = master.lockspace(), master.spm_lease()
    agent = LeaseAgent(other, ls.name, SPM_HOST_ID, ls.path, lease.path, io_timeout=1)
    agent.call("join")
    vol = uuid.uuid4()
    # Shared: the CLI's reports go on, its lvcreate waits.
    with vg_locked(str(master.uuid), shared=True):
        proc = _xtnd_process(config, *_create_argv(master.uuid, vol), "--host-id", str(HOST_ID))
        wait_for(
            lambda: lvm_commands("lvcreate", str(master.uuid)) or proc.poll() is not None,
            timeout=60,
            what="the CLI's lvcreate",
        )
        assert proc.poll() is None, proc.communicate()
        with pytest.raises(AgentError) as e:
            agent.call("acquire")
        assert [o["host_id"] for o in e.value.owners] == [HOST_ID]
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert str(vol) in lv_names(master)
    leader = master.spm_lease_leader()
    assert leader is not None and not leader.held and leader.owner_id == HOST_ID
    # Released: the other host takes it, and the CLI is refused again.
    agent.call("acquire")
    proc = _xtnd_process(config, *_create_argv(master.uuid, uuid.uuid4()), "--host-id", str(HOST_ID))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and f"run the command on host {SPM_HOST_ID}" in err


def test_refused_when_the_lease_cannot_be_taken(
    master: storage.BlockDomain,
    config: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    workdir: str,
) -> None:
    before = lv_names(master)
    # This host's id is nowhere.
    monkeypatch.setattr(domain_cli, "SPM_CONFIG", os.path.join(workdir, "no-spm.conf"))
    monkeypatch.setattr(domain_cli, "HSM_CONFIG", os.path.join(workdir, "no-hsm.conf"))
    assert xtnd(config, *_create_argv(master.uuid, uuid.uuid4())) == 2
    err = capsys.readouterr().err
    assert "this host's id is unknown (give --host-id" in err
    # No sanlock daemon answers this host.
    proc = _xtnd_process(config, *_create_argv(master.uuid, uuid.uuid4()), "--host-id", str(HOST_ID), no_sanlock=True)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err
    assert f"cannot take the SPM lease of master domain {master.uuid} as host {HOST_ID}" in err
    assert "Traceback" not in err
    assert lv_names(master) == before


def test_resize_under_the_lease(
    sanlockd: SanlockDaemon,
    master: storage.BlockDomain,
    spm: LeaseAgent,
    config: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``volume resize`` as create: refused while another host is the SPM;
    with no SPM anywhere it takes the lease, records the capacity and writes
    the resize notice into the master's outbox."""
    vol = uuid.uuid4()
    master.create_volume(vol, 64 * MiB, initial_size=8 * MiB)
    argv = ["volume", "resize", "--domain", str(master.uuid), "--uuid", str(vol), "--host-id", str(HOST_ID)]

    def sent() -> notice_codec.ResizeNotice | None:
        with DirectFile(master.mailbox().outbox, readonly=True) as f:
            return notice.read(f)

    before = sent()
    assert xtnd(config, *argv, "--size", "128M") == 2
    assert f"run the command on host {SPM_HOST_ID}" in capsys.readouterr().err
    assert master.volume_info(vol).capacity == 64 * MiB
    assert sent() == before

    spm.call("release")
    assert xtnd(config, *argv, "--size", "128M") == 0
    assert master.volume_info(vol).capacity == 128 * MiB
    n = sent()
    assert n is not None and (n.domain, n.volume, n.capacity) == (master.uuid, vol, 128 * MiB)
    leader = master.spm_lease_leader()
    assert leader is not None and not leader.held and leader.owner_id == HOST_ID
