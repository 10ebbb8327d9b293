"""The one subprocess helper: typed errors, timeouts, no orphans."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
from xtnd.common import cmd
from xtnd.tools.rig.wait import wait_for


def test_output() -> None:
    assert cmd.run(["echo", "hello"]) == b"hello\n"


def test_input() -> None:
    assert cmd.run(["cat"], input=b"data") == b"data"


def test_failure_is_typed() -> None:
    with pytest.raises(cmd.CommandError) as e:
        cmd.run(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (e.value.rc, e.value.out, e.value.err) == (3, b"out\n", b"err\n")
    assert e.value.cmd == ["sh", "-c", "echo out; echo err >&2; exit 3"]
    assert "rc=3" in str(e.value)


def test_no_check() -> None:
    assert cmd.run(["sh", "-c", "echo x; exit 1"], check=False) == b"x\n"


def test_timeout_kills_child() -> None:
    with pytest.raises(cmd.CommandTimeout):
        cmd.run(["sleep", "30"], timeout=0.2)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_child_dies_with_parent() -> None:
    """SIGKILL of the caller takes its command with it (PR_SET_PDEATHSIG)."""
    pidfile = os.path.join("/var/tmp", f"xtnd-cmd-test-{os.getpid()}")
    script = textwrap.dedent(
        f"""
        from xtnd.common import cmd
        cmd.run(["sh", "-c", "echo $$ > {pidfile}; exec sleep 60"])
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script])
    try:
        wait_for(lambda: os.path.exists(pidfile) and open(pidfile).read().strip(), what="child started")
        child = int(open(pidfile).read())
        assert _alive(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        wait_for(lambda: not _alive(child), timeout=10, what="child killed with its parent")
    finally:
        parent.kill()
        parent.wait()
        if os.path.exists(pidfile):
            os.unlink(pidfile)
