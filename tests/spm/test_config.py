from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest
from xtnd.spm import config as spm_config
from xtnd.spm.daemon import managed_domains
from xtnd.storage import HostConfig

MASTER = "8adbc85e-e554-4ae0-b318-8a5465fe5fe1"
OTHER = "d772f1c6-3ebb-43c3-a42e-73fcd8255a5f"


def write(path: str, text: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return path


@pytest.fixture
def conf(workdir: str) -> str:
    return write(
        os.path.join(workdir, "spm.conf"),
        f"[spm]\nhost_id = 3\nmaster_domain = {MASTER}\n\n[lease]\nio_timeout = 1\n\n"
        f"[domain {OTHER}]\npath = /srv/xtnd\n",
    )


def test_defaults_and_file(conf: str) -> None:
    config = spm_config.load(conf)
    assert config.spm.host_id == 3
    assert config.master_uuid == uuid.UUID(MASTER)
    assert config.lease.io_timeout == 1
    assert config.lease.acquire_interval == spm_config.LeaseSection.acquire_interval
    assert config.mailbox.workers == 8
    assert config.lvm.shell is True
    assert config.domain[OTHER].path == "/srv/xtnd"
    assert config.sources == [conf]


def test_drop_ins_in_name_order(conf: str) -> None:
    write(conf + ".d/20-b.conf", "[mailbox]\nworkers = 2\n")
    write(conf + ".d/10-a.conf", "[mailbox]\nworkers = 5\nscan_interval = 0.5\n")
    write(conf + ".d/ignored.txt", "[mailbox]\nworkers = 99\n")
    config = spm_config.load(conf)
    assert config.mailbox.workers == 2
    assert config.mailbox.scan_interval == 0.5
    assert [os.path.basename(p) for p in config.sources] == ["spm.conf", "10-a.conf", "20-b.conf"]


@pytest.mark.parametrize(
    "text, error",
    [
        ("[spm]\nhost_id = 1\n", "master_domain: is required"),
        (f"[spm]\nmaster_domain = {MASTER}\n", "host_id: is required"),
        (f"[spm]\nhost_id = 1\nmaster_domain = {MASTER}\nbogus = 1\n", "bogus = '1': unknown option"),
        (f"[spm]\nhost_id = one\nmaster_domain = {MASTER}\n", "not an integer"),
        (f"[spm]\nhost_id = 1\nmaster_domain = {MASTER}\n[nope]\n", "unknown section"),
        (f"[spm]\nhost_id = 1\nmaster_domain = {MASTER}\n[domain {OTHER}]\n", "exactly one of pvs, path"),
        (f"[spm]\nhost_id = 1\nmaster_domain = {MASTER}\n[domain xyz]\npvs = /dev/a\n", "not a UUID"),
        (f"[spm]\nhost_id = 1\nmaster_domain = {MASTER}\nshutdown_grace = 5\n", "below \\[spm\\] shutdown_grace"),
        (f"[spm]\nhost_id = 1\nmaster_domain = {MASTER}\n[lvm]\nshell = maybe\n", "shell = .maybe.: not a boolean"),
    ],
)
def test_errors(workdir: str, text: str, error: str) -> None:
    path = write(os.path.join(workdir, "bad.conf"), text)
    with pytest.raises(spm_config.ConfigError, match=error):
        spm_config.load(path)


def test_missing_file(workdir: str) -> None:
    with pytest.raises(spm_config.ConfigError, match="no such config file"):
        spm_config.load(os.path.join(workdir, "missing.conf"))


def test_show_round_trips(conf: str, workdir: str) -> None:
    write(conf + ".d/10.conf", "[lvm]\nalloc = contiguous\nshell = false\n")
    text = spm_config.show(spm_config.load(conf))
    assert f"# from {conf}" in text
    copy = write(os.path.join(workdir, "copy", "spm.conf"), text)
    again = spm_config.load(copy)
    assert again.lvm.alloc == "contiguous"
    assert again.lvm.shell is False
    assert again.spm.host_id == 3
    assert again.domain[OTHER].path == "/srv/xtnd"


def test_managed_domains(conf: str, workdir: str) -> None:
    third = str(uuid.uuid4())
    hostcfg = HostConfig(os.path.join(workdir, "storage.json"), domains={MASTER: {}, third: {}})
    config = spm_config.load(conf)
    assert managed_domains(config, hostcfg) == [uuid.UUID(MASTER), uuid.UUID(OTHER)]
    write(conf + ".d/all.conf", "[spm]\ndomains = *\n")
    config = spm_config.load(conf)
    assert managed_domains(config, hostcfg) == [uuid.UUID(MASTER), uuid.UUID(third), uuid.UUID(OTHER)]


def test_cli_show_config(conf: str) -> None:
    """Through the real entry point: xtnd spm --config FILE --show-config."""
    xtnd = os.path.join(os.path.dirname(sys.executable), "xtnd")
    out = subprocess.run([xtnd, "spm", "--config", conf, "--show-config"], capture_output=True, text=True, check=True)
    assert "host_id = 3" in out.stdout
    assert "[mailbox]" in out.stdout
    bad = subprocess.run([xtnd, "spm", "--config", conf + ".missing"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert "no such config file" in bad.stderr
