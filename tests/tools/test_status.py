"""xtnd status and xtnd hsm|spm log-level against real control sockets.

The daemons' side is the real ControlServer with status tables shaped
like the daemons' (tests/hsm/test_hsm_guest.py and tests/spm/test_metrics.py
ask the real daemons); here the point is what the command makes of
healthy, degraded and missing daemons, and its exit codes.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from xtnd.common.control import ControlServer, set_log_level

XTND = [sys.executable, "-m", "xtnd.tools.cli"]
MASTER = "8adbc85e-e554-4ae0-b318-8a5465fe5fe1"


def spm_status(role: str = "serving") -> dict[str, Any]:
    return {
        "role": role, "host_id": 1, "master_domain": MASTER, "lease_held": role == "serving",
        "lease_holder": 1, "lease_holder_since": 1795924801.5, "lease_acquisitions": 1, "in_flight": 0,
        "results": {"extended": 3},
    }  # fmt: skip


def drive(state: str = "armed", reason: str | None = None) -> dict[str, Any]:
    return {
        "vm": "vm-1", "vm_uuid": "u", "drive": "vda", "domain": MASTER, "volume": "0b1c2d3e-aaaa",
        "state": state, "allocation": 3 << 30, "physical": 5 << 30, "capacity": 20 << 30,
        "disabled_reason": reason, "last_extend": 1795924801.5, "last_extend_ms": 812.4,
    }  # fmt: skip


def hsm_status(*drives: dict[str, Any], connected: bool = True) -> dict[str, Any]:
    return {
        "role": "hsm", "host_id": 1, "master_domain": MASTER, "libvirt_connected": connected, "in_flight": 0,
        "counters": {}, "mailbox": {}, "drives": list(drives),
    }  # fmt: skip


class Daemons:
    def __init__(self, workdir: str):
        self.workdir = workdir
        self.servers: list[ControlServer] = []

    def config(self, daemon: str, answer: dict[str, Any] | None) -> str:
        """A config naming a socket; a server answering status there unless answer is None."""
        sock = os.path.join(self.workdir, f"{daemon}.sock")
        path = os.path.join(self.workdir, f"{daemon}.conf")
        section = "spm" if daemon == "spm" else "host"
        with open(path, "w") as f:
            f.write(f"[{section}]\nhost_id = 1\nmaster_domain = {MASTER}\ncontrol_socket = {sock}\n")
        if answer is not None:
            server = ControlServer(sock, {"status": lambda args: answer, "log_level": set_log_level}, name=daemon)
            server.start()
            self.servers.append(server)
        return path

    def status(self, spm: str, hsm: str, *extra: str) -> tuple[int, str]:
        done = subprocess.run(
            [*XTND, "status", "--spm-config", spm, "--hsm-config", hsm, *extra], capture_output=True, text=True
        )
        assert "Traceback" not in done.stderr, done.stderr
        return done.returncode, done.stdout


@pytest.fixture
def daemons(workdir: str, need_root: None) -> Iterator[Daemons]:
    d = Daemons(workdir)
    yield d
    for server in d.servers:
        server.stop()


def test_healthy_pair(daemons: Daemons) -> None:
    rc, out = daemons.status(daemons.config("spm", spm_status()), daemons.config("hsm", hsm_status(drive())))
    assert rc == 0, out
    assert out.startswith("SPM  serving    host_id=1 lease holder: this host since ")
    assert "vm-1  vda    0b1c2d3e  armed  3072M  5120M  20480M" in out
    assert "812ms" in out and out.endswith("status: healthy\n")


def test_degraded(daemons: Daemons) -> None:
    hsm = hsm_status(drive("disabled", "improbable-allocation"), connected=False)
    rc, out = daemons.status(daemons.config("spm", spm_status("standby")), daemons.config("hsm", hsm), "--json")
    assert rc == 1
    report = json.loads(out)
    assert report["status"] == "degraded" and report["exit_code"] == 1
    assert report["problems"] == [
        "HSM is not connected to libvirt",
        "drive vm-1/vda disabled: improbable allocation",
    ]
    rc, out = daemons.status(daemons.config("spm", spm_status("standby")), daemons.config("hsm", hsm))
    assert "Disabled drives:\n  vm-1 vda: improbable-allocation" in out


def test_down(daemons: Daemons, workdir: str) -> None:
    hsm = daemons.config("hsm", hsm_status())
    rc, out = daemons.status(daemons.config("spm", None), hsm)
    assert rc == 3
    assert f"SPM  down       not running (no socket {workdir}/spm.sock)" in out
    # A stale socket file: nobody listens.
    open(os.path.join(workdir, "spm.sock"), "w").close()
    rc, out = daemons.status(os.path.join(workdir, "spm.conf"), hsm)
    assert rc == 3 and "SPM  down" in out
    # Nothing configured on this host.
    rc, out = daemons.status(os.path.join(workdir, "none.conf"), os.path.join(workdir, "none2.conf"))
    assert rc == 3 and "no daemon configured here" in out


def test_bad_config_is_usage_error(daemons: Daemons, workdir: str) -> None:
    path = os.path.join(workdir, "bad.conf")
    with open(path, "w") as f:
        f.write("[spm]\nno_such_option = 1\n")
    done = subprocess.run([*XTND, "status", "--spm-config", path, "--hsm-config", path + ".x"],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.startswith("xtnd status: ") and "Traceback" not in done.stderr


def test_log_level_through_the_socket(daemons: Daemons) -> None:
    hsm = daemons.config("hsm", hsm_status())
    logger = logging.getLogger("xtnd.test.status")
    logger.setLevel(logging.INFO)
    done = subprocess.run([*XTND, "hsm", "--config", hsm, "log-level", "xtnd.test.status", "debug"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    assert done.stdout == "xtnd.test.status: INFO -> DEBUG\n"
    assert logger.level == logging.DEBUG
    missing = subprocess.run([*XTND, "spm", "log-level", "x", "INFO", "--socket", hsm + ".nosock"],
                             capture_output=True, text=True)  # fmt: skip
    assert missing.returncode == 1 and "not running (no socket" in missing.stderr


def test_non_root_is_told(daemons: Daemons) -> None:
    spm = daemons.config("spm", spm_status())
    done = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *XTND, "status",
                           "--spm-config", spm], capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr == "xtnd status: must run as root (the control sockets are root only)\n"
