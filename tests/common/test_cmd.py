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


def test_children_registered_until_reaped() -> None:
    children = cmd.Children()
    assert children.live() == []
    with subprocess.Popen(["sleep", "60"]) as proc:
        child = children.add(proc, ["sleep", "60"])
        assert [c.pid for c in children.live()] == [proc.pid]
        # Alive: wait() gives up after its timeout and names it.
        assert [c.pid for c in children.wait(0.05)] == [proc.pid]
        assert [c.pid for c in children.kill()] == [proc.pid]
        # Dead but not reaped yet: wait() returns at once.
        assert children.wait(30) == []
        proc.wait()
        children.remove(child)
    assert children.live() == []


def test_closed_children_refuse_new_commands() -> None:
    children = cmd.Children()
    children.close("exiting")
    with pytest.raises(cmd.ChildrenClosed, match="exiting"):
        children.check(["true"])
    # A child that started before close() was seen is killed and still
    # registered, so that whoever closed waits for it too.
    with subprocess.Popen(["sleep", "60"]) as proc:
        with pytest.raises(cmd.ChildrenClosed):
            children.add(proc, ["sleep", "60"])
        assert proc.wait(30) == -signal.SIGKILL
        assert [c.pid for c in children.live()] == [proc.pid]
        assert children.wait(30) == []


def test_run_unregisters_its_children() -> None:
    cmd.run(["true"])
    with pytest.raises(cmd.CommandTimeout):
        cmd.run(["sleep", "60"], timeout=0.1)
    assert cmd.CHILDREN.live() == []
