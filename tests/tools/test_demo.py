"""xtnd demo, headless: the real cluster (hosts, sanlock, SPM failover, guests)
in a short run, its JSON summary, and that it leaves nothing behind."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys

import libvirt
import pytest
from xtnd.tools import demo

XTND = [sys.executable, "-m", "xtnd.tools.cli", "demo"]

pytestmark = pytest.mark.usefixtures("need_root")


def our_loops() -> list[str]:
    found = []
    for name in os.listdir("/sys/block"):
        try:
            with open(f"/sys/block/{name}/loop/backing_file") as f:
                if f.read().startswith(demo.BASE + "/"):
                    found.append(name)
        except OSError:
            continue
    return found


def demo_domains() -> list[str]:
    conn = libvirt.open("qemu:///system")
    try:
        return [d.name() for d in conn.listAllDomains() if d.name().startswith(demo.DOMAIN_PREFIX)]
    finally:
        conn.close()


def demo_processes() -> list[str]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if (demo.BASE + "/run-").encode() in f.read():
                        found.append(entry)
            except OSError:
                continue
    return found


def test_short_run() -> None:
    """Extends happen, the standby takes over, no request is lost, every
    guest's data reads back, and nothing of the run is left."""
    # The cheapest run that still has a failover in the middle (~60 s).
    proc = subprocess.run([*XTND, "--duration", "24", "--json"], capture_output=True, text=True, timeout=400)
    assert proc.stdout.count("\n") == 1, proc.stdout + proc.stderr
    summary = json.loads(proc.stdout)
    assert proc.returncode == 0, (summary, proc.stderr[-3000:])
    for key in ("hosts", "extends", "pauses", "resumed", "failover_s", "lost", "guest_data_ok", "p50_ms", "p99_ms"):
        assert key in summary
    assert summary["hosts"] == 3
    assert summary["extends"] > 0
    assert summary["failover_s"] is not None and summary["killed_spm_host"] != summary["new_spm_host"]
    assert summary["lost"] == 0
    assert summary["guest_data_ok"] is True
    assert [g["data"] for g in summary["guests"]] == ["ok"] * 3
    # The no-headroom guest ran out of space and was resumed every time.
    assert summary["pauses"] > 0 and summary["resumed"] == summary["pauses"]
    assert summary["p50_ms"] <= summary["p99_ms"]
    assert summary["left_behind"] == []
    assert our_loops() == []
    assert demo_domains() == []
    assert demo_processes() == []
    assert [n for n in os.listdir(demo.BASE) if n != "lock"] == []


def test_refuses_while_another_runs() -> None:
    os.makedirs(demo.BASE, exist_ok=True)
    fd = os.open(os.path.join(demo.BASE, "lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        proc = subprocess.run([*XTND, "--json"], capture_output=True, text=True, timeout=60)
    finally:
        os.close(fd)
    assert proc.returncode == demo.EXIT_CANNOT_START
    assert proc.stdout == ""
    assert "another xtnd demo is running" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "args, fact",
    [(["--hosts", "0"], "--hosts"), (["--duration", "3"], "--duration"), (["--chunk-mb", "6"], "--chunk-mb")],
)
def test_bad_arguments(args: list[str], fact: str) -> None:
    proc = subprocess.run([*XTND, *args, "--json"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == demo.EXIT_CANNOT_START
    assert fact in proc.stderr and "Traceback" not in proc.stderr
