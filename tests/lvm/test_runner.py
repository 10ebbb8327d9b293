from __future__ import annotations

import logging
import os
import stat
import uuid

import pytest
from xtnd import lvm
from xtnd.tools.rig import loops
from xtnd.tools.rig.wait import wait_for

EXTENT = 4 * 1024**2


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


@pytest.mark.parametrize("through", ["process", "shell"])
def test_pv_node_recreated_with_other_numbers(workdir: str, need_root: None, through: str) -> None:
    """A PV's node (a multipath /dev/mapper/<wwid> here played by a node in
    workdir) is re-created with another major:minor: the same runner finds
    the VG through it (the scan directory holds links, not copies of the
    node). A shell process would fail ("fstat failed: Has device name
    changed?": LVM keeps the old numbers cached): the next command goes to a
    new process, and the old one ends."""
    lun = loops.make_file(os.path.join(workdir, "lun"), 64 * 1024**2)
    paths = [loops.losetup(lun)]
    node = os.path.join(workdir, "wwid-node")
    os.mknod(node, 0o600 | stat.S_IFBLK, os.stat(paths[0]).st_rdev)
    shell = lvm.LvmShell("test-lvm-node") if through == "shell" else None
    runner = lvm.Runner([node], shell=shell)
    vg = str(uuid.uuid4())
    try:
        lvm.pvcreate(runner, node)
        lvm.vgcreate(runner, vg, [node], EXTENT)
        lvm.lvcreate(runner, vg, "a", EXTENT)
        pid = shell.pid if shell is not None else None
        # The LUN comes back on another device: same data, new numbers.
        paths.append(loops.losetup(lun))
        loops.detach(paths[0])
        old = os.stat(node).st_rdev
        os.unlink(node)
        os.mknod(node, 0o600 | stat.S_IFBLK, os.stat(paths[1]).st_rdev)
        assert os.stat(node).st_rdev != old
        assert lvm.lvextend(runner, vg, "a", 2 * EXTENT) == 2 * EXTENT
        info = lvm.vg_info(runner, vg)
        assert [pv.name for pv in info.pvs] == [node]
        assert lvm.lv_info(runner, vg, "a").size == 2 * EXTENT
        if shell is not None and pid is not None:
            assert shell.pid != pid and shell.starts == 2
            wait_for(lambda: not os.path.exists(f"/proc/{pid}"), timeout=10)
        lvm.vgremove(runner, vg)
    finally:
        if shell is not None:
            shell.close()
        for path in paths:
            loops.detach(path)
