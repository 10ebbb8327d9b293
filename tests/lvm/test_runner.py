from __future__ import annotations

import logging
import os

import pytest
from xtnd import lvm


def test_argv_restricts_devices(runner: lvm.Runner, pvs: list[str]) -> None:
    argv = runner.argv("vgs")
    assert argv[:2] == ["lvm", "vgs"]
    # LVM is given links to the PVs in a scan directory of their own.
    links = argv[argv.index("--devices") + 1].split(",")
    assert [os.readlink(link) for link in links] == pvs
    scan_dir = os.path.dirname(links[0])
    assert sorted(os.listdir(scan_dir)) == sorted(os.path.basename(link) for link in links)
    assert f'scan=["{scan_dir}"]' in argv[argv.index("--config") + 1]
    # The host's own configuration: no scan directory, the devices as given.
    plain = lvm.Runner(pvs, system_dir="").argv("vgs")
    assert plain[plain.index("--devices") + 1] == ",".join(pvs)
    if not lvm.device_mapper_available():
        assert argv[argv.index("--driverloaded") + 1] == "n"


def test_runner_needs_devices() -> None:
    with pytest.raises(ValueError):
        lvm.Runner([])


def test_vg_not_found(runner: lvm.Runner) -> None:
    with pytest.raises(lvm.VGNotFound) as e:
        lvm.vg_info(runner, "no-such-vg")
    assert e.value.vg == "no-such-vg"
    assert e.value.rc != 0
    assert e.value.cmd[1] == "vgs"
    assert "not found" in e.value.err


def test_lv_not_found(runner: lvm.Runner, vg: str) -> None:
    with pytest.raises(lvm.LVNotFound) as e:
        lvm.lv_info(runner, vg, "missing")
    assert (e.value.vg, e.value.lv) == (vg, "missing")


def test_extend_missing_lv(runner: lvm.Runner, vg: str) -> None:
    with pytest.raises(lvm.LVNotFound):
        lvm.extend(runner, vg, "missing", 8 * 1024**2)


def test_failure_dumps_history(runner: lvm.Runner, vg: str, caplog: pytest.LogCaptureFixture) -> None:
    lvm.lvcreate(runner, vg, "a", 4 * 1024**2)
    caplog.set_level(logging.ERROR, logger="xtnd.lvm")
    with pytest.raises(lvm.LVMError) as e:
        # An LV name LVM rejects: a generic LVMError, not a not-found.
        lvm.lvcreate(runner, vg, "a", 4 * 1024**2)
    assert type(e.value) is lvm.LVMError
    assert "already exists" in e.value.err
    records = runner.history.records()
    assert records[-1].rc == e.value.rc
    assert records[-2].argv[1] == "lvcreate" and records[-2].rc == 0
    assert "recent lvm commands" in caplog.text
    assert "lvcreate" in caplog.text


def test_history_is_bounded(pvs: list[str]) -> None:
    runner = lvm.Runner(pvs, history=lvm.CommandHistory(size=2))
    for _ in range(3):
        lvm.vgs(runner)
    assert len(runner.history.records()) == 2
    # The counts (for benchmarks) are not bounded.
    assert runner.history.counts() == {"vgs": 3}
