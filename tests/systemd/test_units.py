"""The systemd units, tmpfiles entry and sample configs shipped in the package.

systemd-analyze verify runs offline (no init needed). The repository's
units name /usr/bin/xtnd, which exists only once the package is installed
(tests/package checks the installed units as they are): here each unit is
verified as a copy whose ExecStart names this checkout's xtnd, without the
man page check. Any line systemd-analyze prints about a unit fails the test.
"""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys

import pytest
from xtnd.hsm import config as hsm_config
from xtnd.spm import config as spm_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
UNITS = ("xtnd-spm.service", "xtnd-hsm.service")
XTND = os.path.join(os.path.dirname(sys.executable), "xtnd")
MASTER = "8adbc85e-e554-4ae0-b318-8a5465fe5fe1"


def analyze() -> str:
    path = shutil.which("systemd-analyze")
    assert path, "systemd-analyze is missing (Debian package systemd, installed by tools/run.sh)"
    return path


def verify(paths: list[str], *extra: str) -> str:
    result = subprocess.run([analyze(), "verify", *extra, *paths], capture_output=True, text=True)
    return result.stdout + result.stderr


@pytest.mark.parametrize("unit", UNITS)
def test_unit_verifies_without_warnings(unit: str, workdir: str) -> None:
    with open(os.path.join(REPO, "systemd", unit)) as f:
        text = f.read()
    assert "ExecStart=/usr/bin/xtnd " in text
    copy = os.path.join(workdir, unit)
    with open(copy, "w") as f:
        f.write(text.replace("/usr/bin/xtnd ", f"{XTND} "))
    output = verify([copy], "--man=no")
    assert unit not in output, output


def test_verify_catches_a_bad_unit(workdir: str) -> None:
    """The check above can fail: a misspelled option is reported."""
    with open(os.path.join(REPO, "systemd", "xtnd-spm.service")) as f:
        text = f.read().replace("/usr/bin/xtnd ", f"{XTND} ").replace("WatchdogSec=", "WatchdogSecs=")
    copy = os.path.join(workdir, "xtnd-spm.service")
    with open(copy, "w") as f:
        f.write(text)
    output = verify([copy], "--man=no")
    assert "xtnd-spm.service:" in output and "Unknown key 'WatchdogSecs'" in output, output


@pytest.mark.parametrize("unit", UNITS)
def test_unit_settings(unit: str) -> None:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(os.path.join(REPO, "systemd", unit))
    service = parser["Service"]
    assert service["Type"] == "notify"
    assert int(service["WatchdogSec"]) > 0
    assert service["RestartPreventExitStatus"] == "2"
    assert service["ProtectSystem"] == "full"
    assert "PrivateDevices" not in service  # LVM, device-mapper and loop devices need /dev


def test_tmpfiles() -> None:
    result = subprocess.run(
        ["systemd-tmpfiles", "--create", "--dry-run", os.path.join(REPO, "systemd", "xtnd.tmpfiles")],
        capture_output=True,
        text=True,
    )
    if "unrecognized option" in result.stderr:  # no --dry-run before systemd 253: parse only
        result = subprocess.run(
            ["systemd-tmpfiles", "--cat-config", os.path.join(REPO, "systemd", "xtnd.tmpfiles")],
            capture_output=True,
            text=True,
        )
    assert result.returncode == 0, result.stderr
    assert "d /run/xtnd 0755 root root -" in open(os.path.join(REPO, "systemd", "xtnd.tmpfiles")).read()


def filled(path: str, workdir: str, name: str) -> str:
    """The sample config with the two required options set, as an operator would."""
    with open(path) as f:
        text = (
            f.read().replace("host_id = 0", "host_id = 1").replace("master_domain =\n", f"master_domain = {MASTER}\n")
        )
    out = os.path.join(workdir, name)
    with open(out, "w") as f:
        f.write(text)
    return out


def test_sample_configs_load(workdir: str) -> None:
    etc = os.path.join(REPO, "etc", "xtnd")
    spm = spm_config.load(filled(os.path.join(etc, "spm.conf"), workdir, "spm.conf"))
    assert spm.metrics.listen == "127.0.0.1:9710" and spm.spm.control_socket == "/run/xtnd/spm.sock"
    hsm = hsm_config.load(filled(os.path.join(etc, "hsm.conf"), workdir, "hsm.conf"))
    hsm.validate()
    assert hsm.metrics.listen == "127.0.0.1:9711" and hsm.host.control_socket == "/run/xtnd/hsm.sock"
    # The drop-in examples are valid drop-ins once renamed to *.conf.
    for daemon, load in (("spm", spm_config.load), ("hsm", hsm_config.load)):
        main = filled(os.path.join(etc, f"{daemon}.conf"), workdir, f"{daemon}.conf")
        os.makedirs(main + ".d")
        shutil.copy(os.path.join(etc, f"{daemon}.conf.d", "50-local.conf.example"), main + ".d/50-local.conf")
        load(main)
