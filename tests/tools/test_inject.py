"""``xtnd inject`` end to end: every scenario's short form (one trial)
against the real rig, verdicts from the recorded history; the long ones
(host-freeze waits for sanlock's host-dead time, ~70 s) and many trials
are soak tests."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
from testlib import cli
from xtnd import lvm
from xtnd.tools.inject import harness, scenarios
from xtnd.tools.rig import guest, loops, sanlockd
from xtnd.tools.rig.wait import wait_for

XTND = [sys.executable, "-m", "xtnd.tools.cli"]


def _need_rig() -> None:
    if not loops.is_root():
        pytest.skip("needs root")
    if sanlockd.missing():
        pytest.skip(f"sanlock: {sanlockd.missing()}")
    if lvm.device_mapper_available():
        pytest.skip("the rig maps LVs with loop devices (no device-mapper)")


def run(*args: str, timeout: float = 600) -> tuple[int, dict[str, object], str]:
    out = subprocess.run([*XTND, "inject", *args, "--json"], capture_output=True, text=True, timeout=timeout)
    lines = out.stdout.strip().splitlines()
    assert lines, f"no output rc={out.returncode}\n{out.stderr[-3000:]}"
    return out.returncode, json.loads(lines[-1]), out.stderr


def test_list() -> None:
    out = subprocess.run([*XTND, "inject", "--list"], capture_output=True, text=True, check=True)
    for s in scenarios.SCENARIOS:
        assert s.name in out.stdout
        assert s.expect, f"{s.name} states no outcome"


def test_bad_usage() -> None:
    out = subprocess.run([*XTND, "inject", "no-such-scenario"], capture_output=True, text=True)
    assert out.returncode == 2
    expected = "xtnd inject: unknown scenario no-such-scenario (see xtnd inject --list)"
    assert out.stderr.strip().splitlines() == [expected]
    out = subprocess.run([*XTND, "inject"], capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr


SHORT = [s.name for s in scenarios.SCENARIOS if not s.long and not s.guests]
LONG = [s.name for s in scenarios.SCENARIOS if s.long]
# Scenarios with real guests: run together (one private libvirtd, one rig).
GUESTS = [s.name for s in scenarios.SCENARIOS if s.guests and not s.long]

# Scenarios that fail for a known product bug not fixed yet, with the
# bug (none now: spm-stop found the stall guard's false loss after a freeze,
# fixed in spm/lease.py).
KNOWN: dict[str, str] = {}


def test_short_scenarios() -> None:
    """Every scenario but the long ones, one trial each, on one rig (as
    `xtnd inject A B C` runs them)."""
    _need_rig()
    rc, report, err = run(*SHORT, "--seed", "1")
    by_name = {s["scenario"]: s for s in report["scenarios"]}  # type: ignore[attr-defined]
    assert sorted(by_name) == sorted(SHORT)
    for name, s in by_name.items():
        assert s["trials"] == 1
        assert isinstance(s["lost"], int) and s["verdict"] in ("pass", "fail")
        if name in KNOWN:
            continue
        assert s["verdict"] == "pass", f"{name}: {s.get('reason')}\n{err[-3000:]}"
        assert s["sent"] >= 1 and s["answered"] == s["sent"] and s["lost"] == 0, s
    known_failed = [n for n in KNOWN if by_name[n]["verdict"] != "pass"]
    assert rc == (1 if known_failed else 0)
    if known_failed:
        pytest.xfail("; ".join(f"{n}: {by_name[n].get('reason')} (known: {KNOWN[n]})" for n in known_failed))


def _need_guests() -> None:
    _need_rig()
    try:
        guest.build_rig()
    except guest.RigUnavailable as e:
        pytest.skip(f"guest rig unavailable: {e}")


def _check_short(names: list[str], rc: int, report: dict[str, object], err: str) -> None:
    by_name = {s["scenario"]: s for s in report["scenarios"]}  # type: ignore[attr-defined]
    assert sorted(by_name) == sorted(names)
    for name, s in by_name.items():
        assert s["trials"] == 1 and s["verdict"] == "pass", f"{name}: {s.get('reason')}\n{err[-3000:]}"
        assert s["sent"] >= 1 and s["answered"] == s["sent"] and s["lost"] == 0, s
    assert rc == 0


@pytest.mark.timeout(600)
def test_guest_scenarios() -> None:
    """The scenarios with real guests (7: HSM killed while its VM is paused
    on ENOSPC; 11, paused half: full VG; 14: libvirtd restarted), one trial
    each, in one run: one private libvirtd, guests booted per trial."""
    _need_guests()
    rc, report, err = run(*GUESTS, "--seed", "1")
    _check_short(GUESTS, rc, report, err)


@pytest.mark.soak
@pytest.mark.timeout(3600)
def test_guest_scenarios_trials() -> None:
    """Every variant of the guest scenarios: 5 trials each."""
    _need_guests()
    rc, report, err = run(*GUESTS, "--trials", "5", "--seed", "2", timeout=3600)
    assert report["verdict"] == "pass", err[-3000:]
    assert rc == 0


def _qemus_under(path: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read()
        except OSError:
            continue
        if b"qemu-system" in argv.split(b"\0")[0] and (path + "/").encode() in argv:
            found.append(int(pid))
    return found


def test_guests_of_a_killed_harness_are_swept(tmp_path: object) -> None:
    """A harness killed outright (SIGKILL) while its guest runs leaves the
    QEMU process (libvirtd starts it detached); the next run kills it and
    removes the rig."""
    _need_guests()
    err_path = os.path.join(str(tmp_path), "err")
    with open(err_path, "w") as err:
        proc = subprocess.Popen([*XTND, "inject", "libvirtd-restart"], stdout=subprocess.DEVNULL, stderr=err)
    try:
        def booted() -> bool:
            with open(err_path) as f:
                return "started on volume" in f.read()

        wait_for(booted, timeout=180, interval=0.05, what="a guest to start")
        with open(err_path) as f:
            rig = _rig_dir(f.read())
        wait_for(lambda: _qemus_under(rig), timeout=30, what="its QEMU process")
    finally:
        proc.kill()
        proc.wait()
    assert _qemus_under(rig), "the guest died with the harness: nothing to sweep"
    assert rig in harness.clean_stale()
    assert not _qemus_under(rig)
    assert not os.path.exists(rig)
    # Detached; the kernel frees a device once its last user (the dead
    # harness's sanlock daemons, dying of PR_SET_PDEATHSIG) closed it.
    wait_for(lambda: not _loops_under(rig), timeout=30, what="the rig's loop devices to go")


@pytest.mark.soak
@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", LONG)
def test_scenario_long(name: str) -> None:
    _need_rig()
    rc, report, err = run(name, "--seed", "1")
    assert report["verdict"] == "pass", err[-3000:]
    assert rc == 0


@pytest.mark.soak
@pytest.mark.timeout(7200)
def test_all_trials() -> None:
    _need_rig()
    rc, report, err = run("--all", "--trials", "5", timeout=7200)
    assert report["verdict"] == "pass", err[-3000:]
    assert rc == 0
    assert os.geteuid() == 0


def _rig_dir(stderr: str) -> str:
    for line in stderr.splitlines():
        if "rig in " in line:
            return line.split("rig in ", 1)[1].strip()
    raise AssertionError(f"no rig line in:\n{stderr[-2000:]}")


def _loops_under(path: str) -> list[str]:
    return [dev for dev, backing in loops._loops().items() if backing.startswith(path + "/")]


def test_interrupt_tears_the_rig_down(tmp_path: object) -> None:
    """SIGINT (Ctrl-C) in the middle of a trial: exit 130, the rig's loop
    devices, files and processes are gone."""
    _need_rig()
    err_path = os.path.join(str(tmp_path), "err")
    with open(err_path, "w") as err:
        proc = subprocess.Popen([*XTND, "inject", "spm-kill"], stdout=subprocess.DEVNULL, stderr=err,
                                preexec_fn=cli.ctrl_c_default)
    try:
        def started() -> bool:
            with open(err_path) as f:
                return "spm-kill trial 1: start" in f.read()

        wait_for(started, timeout=120, interval=0.05, what="the trial to start")
        with open(err_path) as f:
            rig = _rig_dir(f.read())
        assert os.path.isdir(rig) and _loops_under(rig)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not os.path.exists(rig)
    assert not _loops_under(rig)
    with open(err_path) as f:
        assert "Traceback" not in f.read()


def test_rig_of_a_killed_harness_is_cleaned_up(tmp_path: object) -> None:
    """A harness killed outright (SIGKILL) leaves its rig; the next run removes it."""
    _need_rig()
    os.makedirs(harness.WORK_BASE, exist_ok=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    rig = os.path.join(harness.WORK_BASE, f"test-stale-{os.getpid()}")
    os.makedirs(rig)
    with open(os.path.join(rig, harness.OWNER), "w") as f:
        f.write(f"{dead.pid} 12345\n")
    device = loops.losetup(loops.make_file(os.path.join(rig, "pv0"), 1024**2))
    try:
        assert rig in harness.clean_stale()
        assert not os.path.exists(rig)
        assert not _loops_under(rig)
    finally:
        loops.detach(device)
    # A live harness's rig stays.
    live = os.path.join(harness.WORK_BASE, f"test-live-{os.getpid()}")
    os.makedirs(live)
    with open(os.path.join(live, harness.OWNER), "w") as f:
        f.write(f"{os.getpid()} {harness._start_time(os.getpid())}\n")
    try:
        assert live not in harness.clean_stale()
        assert os.path.isdir(live)
    finally:
        shutil.rmtree(live)


@pytest.mark.soak
@pytest.mark.timeout(900)
def test_soak_250_hosts() -> None:
    """250 lean hosts plus two real HSM clients for 60 s with random faults:
    every request answered."""
    _need_rig()
    rc, report, err = run("soak", "--hosts", "250", "--duration", "60", "--seed", "1")
    [s] = report["scenarios"]  # type: ignore[misc]
    assert s["verdict"] == "pass", f"{s.get('reason')}\n{err[-3000:]}"
    assert s["lost"] == 0 and s["sent"] == s["answered"] > 250
    assert sum(s["faults"].values()) >= 3
    assert rc == 0
