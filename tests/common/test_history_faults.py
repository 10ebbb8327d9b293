"""History records (one JSON line per event, shared by processes) and fault
points (off unless armed; fire on the Nth pass)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from xtnd.common import faults, history


def test_history_off_by_default_and_records_when_enabled(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "h.jsonl")
    history.disable()
    history.record("sent", host=1)
    assert not os.path.exists(path)
    history.enable(path, "me")
    try:
        history.record("sent", host=1, volume="v", size_mb=12)
    finally:
        history.disable()
    [e] = history.read(path)
    assert (e["ev"], e["name"], e["host"], e["size_mb"], e["pid"]) == ("sent", "me", 1, 12, os.getpid())


def test_history_from_env_in_many_processes(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "h.jsonl")
    code = "from xtnd.common import history\nfor i in range(200): history.record('seen', i=i, pad='x' * 300)"
    env = {**os.environ, history.ENV: path, history.ENV_NAME: "child"}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env) for _ in range(4)]
    assert [p.wait() for p in procs] == [0] * 4
    events = history.read(path)
    # Lines of concurrent writers never interleave.
    assert len(events) == 800
    assert {e["name"] for e in events} == {"child"}


def test_history_skips_a_cut_line(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "h.jsonl")
    with open(path, "w") as f:
        f.write('{"t": 1, "ev": "sent"}\n{"t": 2, "ev": "se')
    assert [e["ev"] for e in history.read(path)] == ["sent"]


def test_fault_spec_errors() -> None:
    for bad in ("nothing", "p=explode", "p=kill@x", "p=sleep:soon", "=kill"):
        with pytest.raises(faults.FaultSpecError):
            faults.parse(bad)
    assert faults.parse("a=kill@3, b=sleep:0.5") == {"a": ("kill", 3), "b": ("sleep:0.5", 1)}


def test_fault_point_fires_on_nth_pass_only() -> None:
    code = (
        "from xtnd.common import faults\n"
        "for i in range(5):\n"
        "    print(i, flush=True)\n"
        "    faults.point('x.y')\n"
    )
    env = {**os.environ, faults.ENV: "x.y=exit@3"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == faults.EXIT_FAULT
    assert out.stdout.split() == ["0", "1", "2"]
    unarmed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert unarmed.returncode == 0 and unarmed.stdout.split() == ["0", "1", "2", "3", "4"]
