from __future__ import annotations

import argparse
import json
import os
import uuid

import pytest
from testlib.cli import xtnd
from xtnd import storage
from xtnd.storage import sanlockdirect
from xtnd.tools import domain_cli

MiB = 1024**2


@pytest.fixture
def config(workdir: str) -> str:
    path = os.path.join(workdir, "storage.json")
    storage.HostConfig(path, activation="loop").save()  # loop activation on any kernel
    return path


def test_parse_size() -> None:
    assert domain_cli.parse_size("1048576") == MiB
    assert domain_cli.parse_size("512M") == 512 * MiB
    assert domain_cli.parse_size("10G") == 10 * 1024 * MiB
    assert domain_cli.parse_size("2560MiB") == 2560 * MiB
    with pytest.raises(argparse.ArgumentTypeError):
        domain_cli.parse_size("ten")


def test_block_domain(pvs: list[str], config: str, capsys: pytest.CaptureFixture[str]) -> None:
    sd, vol = str(uuid.uuid4()), str(uuid.uuid4())
    cfg = ["--storage-config", config]
    assert xtnd("domain", "create", "--uuid", sd, "--pv", pvs[0], "--master", "--extent-size", "4M", *cfg) == 0
    out = capsys.readouterr().out
    assert "initializing sanlock lockspace" in out
    assert f"recorded in {config}" in out
    with open(config) as f:
        assert json.load(f)["domains"][sd] == {"pvs": [pvs[0]]}
    # The PVs come from the config from now on.
    assert xtnd("domain", "info", "--uuid", sd, "--json", *cfg) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["kind"], info["master"], info["pvs"]) == ("block", True, [pvs[0]])
    # --local: no sanlock here (taking the SPM lease: test_spmowner.py).
    create = ["volume", "create", "--domain", sd, "--uuid", vol, "--capacity", "100M", "--initial-size", "8M"]
    assert xtnd(*create, "--local", *cfg) == 0
    capsys.readouterr()
    assert xtnd("volume", "list", "--domain", sd, "--json", *cfg) == 0
    [listed] = json.loads(capsys.readouterr().out)
    assert (listed["uuid"], listed["format"], listed["size"], listed["max_size"]) == (vol, "qcow2", 8 * MiB, 110 * MiB)
    assert xtnd("volume", "remove", "--domain", sd, "--uuid", vol, "--local", *cfg) == 0
    capsys.readouterr()
    assert xtnd("volume", "info", "--domain", sd, "--uuid", vol, *cfg) == 1
    assert "not found" in capsys.readouterr().err


def test_file_domain(workdir: str, config: str, capsys: pytest.CaptureFixture[str]) -> None:
    sd, vol = str(uuid.uuid4()), str(uuid.uuid4())
    cfg = ["--storage-config", config]
    assert xtnd("domain", "create", "--uuid", sd, "--path", workdir, *cfg) == 0
    capsys.readouterr()
    assert xtnd("volume", "create", "--domain", sd, "--uuid", vol, "--capacity", "1G", "--format", "raw", *cfg) == 0
    capsys.readouterr()
    assert xtnd("domain", "info", "--uuid", sd, *cfg) == 0
    out = capsys.readouterr().out
    assert "kind: file" in out
    assert f"volumes: {vol}" in out


def test_unknown_domain(config: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert xtnd("domain", "info", "--uuid", str(uuid.uuid4()), "--storage-config", config) == 1
    assert "not found" in capsys.readouterr().err


def test_create_needs_pv_or_path(config: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert xtnd("domain", "create", "--uuid", str(uuid.uuid4()), "--storage-config", config) == 1
    assert "--pv" in capsys.readouterr().err


def test_io_timeout(pvs: list[str], config: str, capsys: pytest.CaptureFixture[str]) -> None:
    sd = str(uuid.uuid4())
    cfg = ["--storage-config", config]
    argv = ["domain", "create", "--uuid", sd, "--pv", pvs[0], "--master", "--extent-size", "4M", "--io-timeout", "3"]
    assert xtnd(*argv, *cfg) == 0
    assert f"initializing sanlock lockspace {sd} on ids (io_timeout 3 s)" in capsys.readouterr().out
    assert xtnd("domain", "info", "--uuid", sd, *cfg) == 0
    assert "io_timeout: 3" in capsys.readouterr().out.splitlines()
    domain = storage.HostConfig.load(config).open(sd)
    try:
        ls = domain.lockspace()
        assert sanlockdirect.read_lockspace_leader(ls.name, ls.path, ls.offset)["io_timeout"] == "3"
    finally:
        domain.deactivate_special()


@pytest.mark.parametrize("value", ["0", "61", "ten"])
def test_io_timeout_refused(workdir: str, config: str, capsys: pytest.CaptureFixture[str], value: str) -> None:
    sd = str(uuid.uuid4())
    with pytest.raises(SystemExit) as e:
        xtnd("domain", "create", "--uuid", sd, "--path", workdir, "--io-timeout", value, "--storage-config", config)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--io-timeout" in err and "1..60" in err
    assert not os.path.exists(os.path.join(workdir, sd))
    assert sd not in storage.HostConfig.load(config).domains
