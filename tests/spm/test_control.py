"""The control socket in-process (real LVM, fake lease), and xtnd volume through it."""

from __future__ import annotations

import os
import socket
import stat
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from testlib.cli import xtnd
from xtnd import storage
from xtnd.mailbox import notice
from xtnd.mailbox.directio import DirectFile, Storage
from xtnd.spm.control import ControlClient, ControlError, ControlServer
from xtnd.spm.domains import DomainRegistry
from xtnd.spm.extend import ExtendService
from xtnd.spm.lease import LeaseLost
from xtnd.spm.ops import VolumeOps
from xtnd.tools.rig.spmd import MiB, Pool


class Spm:
    """The daemon's control side without the daemon: registry, service, server."""

    def __init__(self, pool: Pool, path: str, allowed_uid: int = 0, outbox: Storage | None = None):
        self.lost: str | None = None
        self.calls: list[str] = []
        self.registry = registry = DomainRegistry(lambda u: pool.domain, [pool.uuid], ttl=60)
        self.service = ExtendService(registry, self.fence, lambda reason: None)
        stats = lambda: {"extends": self.service.metrics.snapshot()}  # noqa: E731
        table = VolumeOps(registry, self.service, stats, outbox).table()
        self.server = ControlServer(path, {op: self._spy(op, f) for op, f in table.items()}, allowed_uid)

    def fence(self) -> None:
        if self.lost:
            raise LeaseLost(self.lost)

    def _spy(self, op: str, func: Any) -> Any:
        def call(args: dict[str, Any]) -> Any:
            self.calls.append(op)
            return func(args)

        return call


@pytest.fixture
def sock(workdir: str) -> str:
    return os.path.join(workdir, "spm.sock")


@pytest.fixture
def spm(pool: Pool, sock: str) -> Iterator[Spm]:
    s = Spm(pool, sock)
    s.server.start()
    yield s
    s.server.stop()


def test_volume_ops(pool: Pool, spm: Spm, sock: str) -> None:
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    client = ControlClient(sock)
    assert client.call("ping") == "pong"
    vol = str(uuid.uuid4())
    info = client.call("volume_create", domain=str(pool.uuid), uuid=vol, capacity=100 * MiB, initial_size=8 * MiB)
    assert (info["uuid"], info["size"], info["max_size"], info["format"]) == (vol, 8 * MiB, 110 * MiB, "qcow2")
    assert [v["uuid"] for v in client.call("volume_list", domain=str(pool.uuid))] == [vol]
    assert client.call("volume_info", domain=str(pool.uuid), uuid=vol)["capacity"] == 100 * MiB
    with pytest.raises(ControlError) as e:
        client.call("volume_create", domain=str(pool.uuid), uuid=vol, capacity=100 * MiB)
    assert e.value.error == "VolumeExists"
    client.call("volume_remove", domain=str(pool.uuid), uuid=vol)
    with pytest.raises(ControlError) as e:
        client.call("volume_info", domain=str(pool.uuid), uuid=vol)
    assert e.value.error == "VolumeNotFound"
    with pytest.raises(ControlError) as e:
        client.call("volume_list", domain=str(uuid.uuid4()))
    assert e.value.error == "DomainNotManaged"
    with pytest.raises(ControlError) as e:
        client.call("no_such_op")
    assert e.value.error == "BadRequest"
    assert "results" in client.call("stats")["extends"]


def test_lease_lost_refuses_changes(pool: Pool, spm: Spm, sock: str) -> None:
    spm.lost = "gone"
    vol = str(uuid.uuid4())
    with pytest.raises(ControlError) as e:
        ControlClient(sock).call("volume_create", domain=str(pool.uuid), uuid=vol, capacity=100 * MiB)
    assert e.value.error == "LeaseLost"
    assert pool.domain.list_volumes() == []


def test_peer_uid_checked(pool: Pool, workdir: str) -> None:
    path = os.path.join(workdir, "other.sock")
    spm = Spm(pool, path, allowed_uid=4242)  # we are root (uid 0): refused
    spm.server.start()
    try:
        with pytest.raises(ControlError) as e:
            ControlClient(path).call("ping")
        assert e.value.error == "PermissionError"
        assert spm.calls == []
    finally:
        spm.server.stop()
    assert not os.path.exists(path)


def test_volume_cli_through_spm(
    pool: Pool, spm: Spm, sock: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("XTND_SPM_SOCKET", sock)
    cfg = ["--storage-config", pool.storage_config]
    vol = str(uuid.uuid4())
    sd = str(pool.uuid)
    assert (
        xtnd("volume", "create", "--domain", sd, "--uuid", vol, "--capacity", "100M", "--initial-size", "8M", *cfg) == 0
    )
    assert xtnd("volume", "list", "--domain", sd, "--json", *cfg) == 0
    assert vol in capsys.readouterr().out
    assert xtnd("volume", "remove", "--domain", sd, "--uuid", vol, *cfg) == 0
    assert xtnd("volume", "info", "--domain", sd, "--uuid", vol, *cfg) == 1
    assert "not found" in capsys.readouterr().err
    assert spm.calls == ["ping", "volume_create", "ping", "volume_list", "ping", "volume_remove", "ping", "volume_info"]


def test_volume_resize_through_spm(
    pool: Pool, sock: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """xtnd volume resize goes to the SPM, which records the capacity, writes
    the notice and validates extends against the new max size at once."""
    monkeypatch.setenv("XTND_SPM_SOCKET", sock)
    sd, vol = str(pool.uuid), uuid.uuid4()
    pool.domain.create_volume(vol, 100 * MiB, initial_size=8 * MiB)
    with DirectFile(pool.domain.mailbox().outbox) as outbox:
        spm = Spm(pool, sock, outbox=outbox)
        spm.server.start()
        try:
            managed = spm.registry.get(pool.uuid)
            lv = managed.lookup(vol)
            assert lv is not None and lv.max_size == 110 * MiB
            resize = ["volume", "resize", "--domain", sd, "--uuid", str(vol), "--storage-config", pool.storage_config]
            assert xtnd(*resize, "--size", "200M", "--json") == 0
            assert '"changed": true' in capsys.readouterr().out
            assert spm.calls == ["ping", "volume_resize"]
            assert pool.domain.volume_info(vol).capacity == 200 * MiB
            lv = managed.lookup(vol)
            assert lv is not None and lv.max_size == storage.max_size(200 * MiB)
            sent = notice.read(outbox)
            assert sent is not None and (sent.domain, sent.volume, sent.capacity) == (pool.uuid, vol, 200 * MiB)
            assert xtnd(*resize, "--size", "100M") == 2
            assert "shrinking it to" in capsys.readouterr().err
            assert xtnd(*resize, "--size", "200M") == 0
            assert "nothing changed" in capsys.readouterr().out
            assert notice.read(outbox) == sent
            assert pool.domain.volume_info(vol).capacity == 200 * MiB
        finally:
            spm.server.stop()


def test_volume_cli_stale_socket_runs_locally(
    pool: Pool, sock: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A socket file nobody listens on, as a killed SPM leaves behind.
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(sock)
    s.close()
    monkeypatch.setenv("XTND_SPM_SOCKET", sock)
    vol = str(uuid.uuid4())
    cfg = ["--storage-config", pool.storage_config]
    assert (
        xtnd(
            "volume",
            "create",
            "--domain",
            str(pool.uuid),
            "--uuid",
            vol,
            "--capacity",
            "100M",
            "--initial-size",
            "8M",
            # No sanlock here: the local path without taking the lease. The
            # path that takes it is tested in tests/storage/test_spmowner.py.
            "--local",
            *cfg,
        )
        == 0
    )
    assert "stale SPM socket" in capsys.readouterr().err
    assert [str(v.uuid) for v in pool.domain.list_volumes()] == [vol]
