"""``xtnd inject`` end to end: every scenario's short form (one trial)
against the real rig, verdicts from the recorded history; the long ones
(host-freeze waits for sanlock's host-dead time, ~70 s) and many trials
are soak tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from xtnd import lvm
from xtnd.tools.inject import scenarios
from xtnd.tools.rig import loops, sanlockd

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


SHORT = [s.name for s in scenarios.SCENARIOS if not s.long]
LONG = [s.name for s in scenarios.SCENARIOS if s.long]


# Known product bug, found by spm-stop: after a freeze of the SPM process,
# the lease watchdog's stall guard wakes past valid_until and declares the
# lease lost (reason "lease check stalled for 0.0s") before the first check
# after the thaw can confirm it; the SPM exits instead of serving again
# (spm/lease.py LeaseWatchdog._deadline). Fails in some runs, not all.
KNOWN = {"spm-stop": "stall guard declares the lease lost after an SPM freeze (spm/lease.py)"}


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.xfail(reason=KNOWN[n], strict=False)) if n in KNOWN else n for n in SHORT
])
def test_scenario_short(name: str) -> None:
    _need_rig()
    rc, report, err = run(name, "--seed", "1")
    [s] = report["scenarios"]  # type: ignore[misc]
    assert s["scenario"] == name and s["trials"] == 1
    assert s["verdict"] == "pass", f"{s.get('reason')}\n{err[-3000:]}"
    assert rc == 0
    assert s["sent"] >= 1 and s["answered"] == s["sent"] and s["lost"] == 0


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
