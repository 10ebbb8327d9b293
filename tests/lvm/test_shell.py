"""The LVM shell: one ``lvm`` process running many commands (lvm/shell.py).

Besides the runner tests that run both ways (conftest.runner), these prove
what only a long-lived process can get wrong: stale metadata after changes
made by other processes and other hosts, and a process that hangs or dies.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import pytest
from xtnd import lvm
from xtnd.lvm import shell as lvm_shell
from xtnd.lvm import sysdir
from xtnd.tools.rig.wait import wait_for

from .conftest import EXTENT


@pytest.fixture
def runner(pvs: list[str]) -> lvm.Runner:
    """The vg fixture's runner: processes (these tests use shell_runner)."""
    return lvm.Runner(pvs)


@pytest.fixture
def shell_runner(pvs: list[str], shell: lvm.LvmShell) -> lvm.Runner:
    return lvm.Runner(pvs, shell=shell, timeout=20)


def size_of(runner: lvm.Runner, vg: str, lv: str) -> int:
    return lvm.lv_info(runner, vg, lv).size


def plain_lvextend(pvs: list[str], vg: str, lv: str, size: int, prefix: tuple[str, ...] = ()) -> None:
    """lvextend by another process with the host's own LVM config."""
    subprocess.run(
        [*prefix, *lvm.Runner(pvs, system_dir="").argv("lvextend", "--size", f"{size}b", f"{vg}/{lv}")],
        check=True,
        capture_output=True,
    )


def gone(pid: int) -> bool:
    """The process exited (a zombie not yet reaped counts)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_quote() -> None:
    assert lvm_shell.quote("vg/lv") == "vg/lv"
    assert lvm_shell.quote('devices { hints="none" }') == """'devices { hints="none" }'"""
    assert lvm_shell.quote("it's") == '''"it's"'''
    assert lvm_shell.quote("") == "''"
    for bad in ("a\nlvremove vg", "a\rb", "a\0b", "'\"", "a\x1bb"):
        with pytest.raises(ValueError):
            lvm_shell.quote(bad)


def test_one_process_many_commands(shell_runner: lvm.Runner, shell: lvm.LvmShell, vg: str) -> None:
    lvm.lvcreate(shell_runner, vg, "a", EXTENT, tags=("t1",))
    pid = shell.pid
    for i in range(2, 6):
        assert lvm.lvextend(shell_runner, vg, "a", i * EXTENT) == i * EXTENT
    info = lvm.lv_info(shell_runner, vg, "a")
    assert (info.size, info.tags, info.seg_count) == (5 * EXTENT, ("t1",), 1)
    assert shell.pid == pid and shell.starts == 1
    records = shell_runner.history.records()
    assert [r.argv[1] for r in records][-2:] == ["lvextend", "lvs"]
    # Settings and devices are in the process's system directory, not on
    # each line (LVM 2.03.16 crashes on the third command with --devices
    # but without --config: six ran here).
    assert not any("--config" in r.argv or "--devices" in r.argv for r in records[-6:])


def test_failures_are_typed(shell_runner: lvm.Runner, vg: str) -> None:
    lvm.lvcreate(shell_runner, vg, "a", EXTENT)
    free = lvm.vg_info(shell_runner, vg).free_extents
    with pytest.raises(lvm.NotEnoughFreeExtents) as e:
        lvm.lvextend(shell_runner, vg, "a", (free + 5) * EXTENT)
    assert (e.value.free, e.value.needed) == (free, free + 4)
    assert e.value.rc == 5
    with pytest.raises(lvm.LVNotFound):
        lvm.lv_info(shell_runner, vg, "missing")
    with pytest.raises(lvm.VGNotFound):
        lvm.vg_info(shell_runner, "no-such-vg")
    with pytest.raises(lvm.LVMError) as e2:
        shell_runner.run("nosuchcommand")
    assert "No such command" in e2.value.err
    # Still the same process, and it still works.
    assert lvm.lvextend(shell_runner, vg, "a", 2 * EXTENT) == 2 * EXTENT


def test_sees_changes_by_another_process(shell_runner: lvm.Runner, pvs: list[str], vg: str) -> None:
    lvm.lvcreate(shell_runner, vg, "a", EXTENT)
    assert size_of(shell_runner, vg, "a") == EXTENT
    plain_lvextend(pvs, vg, "a", 3 * EXTENT)
    assert size_of(shell_runner, vg, "a") == 3 * EXTENT
    lvm.lvcreate(lvm.Runner(pvs), vg, "b", EXTENT)
    assert [i.name for i in lvm.lvs(shell_runner, vg)] == ["a", "b"]
    # And its own writes start from what is on disk now.
    assert lvm.lvextend(shell_runner, vg, "a", 4 * EXTENT) == 4 * EXTENT
    assert lvm.lv_info(lvm.Runner(pvs), vg, "a").size == 4 * EXTENT


def test_sees_changes_by_another_host(shell_runner: lvm.Runner, pvs: list[str], vg: str, workdir: str) -> None:
    """Another host: own mount namespace with its own /run (LVM locks, no xtnd dir)."""
    lvm.lvcreate(shell_runner, vg, "a", EXTENT)
    assert size_of(shell_runner, vg, "a") == EXTENT
    script = 'mount -t tmpfs run /run && exec "$@"'
    host = ("unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh")
    plain_lvextend(pvs, vg, "a", 2 * EXTENT, prefix=host)
    assert size_of(shell_runner, vg, "a") == 2 * EXTENT
    plain_lvextend(pvs, vg, "a", 5 * EXTENT, prefix=host)
    info = lvm.lv_info(shell_runner, vg, "a")
    assert (info.size, info.segments[0].extents) == (5 * EXTENT, 5)


def test_hung_shell_times_out_and_restarts(pvs: list[str], shell: lvm.LvmShell, vg: str) -> None:
    runner = lvm.Runner(pvs, shell=shell, timeout=1.0)
    lvm.lvcreate(runner, vg, "a", EXTENT)
    pid = shell.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    start = time.monotonic()
    with pytest.raises(lvm.ShellError) as e:
        lvm.lvextend(runner, vg, "a", 2 * EXTENT)
    assert time.monotonic() - start < 10
    assert e.value.rc == -9 and "timed out" in str(e.value)
    assert e.value.cmd[1] == "lvextend"
    assert runner.history.records()[-1].rc == -9
    # The stopped process was killed, not left behind.
    assert gone(pid)
    # The next command runs in a new process, seeing what is on disk.
    assert size_of(runner, vg, "a") == EXTENT
    assert shell.pid != pid and shell.starts == 2
    assert lvm.lvextend(runner, vg, "a", 2 * EXTENT) == 2 * EXTENT


def test_killed_shell_fails_command_in_flight(shell_runner: lvm.Runner, shell: lvm.LvmShell, vg: str) -> None:
    lvm.lvcreate(shell_runner, vg, "a", EXTENT)
    pid = shell.pid
    assert pid is not None
    # Hold the command in flight: stop the process, start the command, kill it.
    os.kill(pid, signal.SIGSTOP)
    errors: list[BaseException] = []

    def extend() -> None:
        try:
            lvm.lvextend(shell_runner, vg, "a", 2 * EXTENT)
        except BaseException as e:  # noqa: BLE001 - checked below
            errors.append(e)

    t = threading.Thread(target=extend)
    t.start()
    wait_for(lambda: shell.commands == 2, timeout=10)
    os.kill(pid, signal.SIGKILL)
    t.join(timeout=10)
    assert not t.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], lvm.ShellError)
    assert "exited" in str(errors[0])
    assert size_of(shell_runner, vg, "a") == EXTENT
    assert shell.starts == 2


def test_idle_shell_killed_is_replaced(shell_runner: lvm.Runner, shell: lvm.LvmShell, vg: str) -> None:
    """A process that died between commands costs no command."""
    lvm.lvcreate(shell_runner, vg, "a", EXTENT)
    pid = shell.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: gone(pid), timeout=10)
    assert lvm.lvextend(shell_runner, vg, "a", 2 * EXTENT) == 2 * EXTENT
    assert shell.starts == 2


def test_threads_share_one_shell(shell_runner: lvm.Runner, shell: lvm.LvmShell, vg: str) -> None:
    names = [f"lv{i}" for i in range(8)]
    for name in names:
        lvm.lvcreate(shell_runner, vg, name, EXTENT)
    errors: list[BaseException] = []

    def grow(name: str) -> None:
        try:
            for n in range(2, 5):
                assert lvm.lvextend(shell_runner, vg, name, n * EXTENT) == n * EXTENT
        except BaseException as e:  # noqa: BLE001 - checked below
            errors.append(e)

    threads = [threading.Thread(target=grow, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert {i.name: i.size for i in lvm.lvs(shell_runner, vg)} == dict.fromkeys(names, 4 * EXTENT)
    assert shell.starts == 1


def test_short_lived_caller_thread_does_not_kill_shell(shell_runner: lvm.Runner, shell: lvm.LvmShell, vg: str) -> None:
    """The death signal is tied to the starting thread: never the caller's."""
    t = threading.Thread(target=lambda: lvm.vgs(shell_runner))
    t.start()
    t.join()
    pid = shell.pid
    assert shell.starts == 1
    assert lvm.vgs(shell_runner) == [vg]
    assert shell.pid == pid and shell.starts == 1


def test_closed_shell_refuses(shell_runner: lvm.Runner, shell: lvm.LvmShell, vg: str) -> None:
    lvm.vgs(shell_runner)
    shell.close()
    with pytest.raises(lvm.ShellError):
        lvm.vgs(shell_runner)


def test_sysdir(tmp_path: object) -> None:
    path = str(tmp_path)
    host = os.path.join(path, "host")
    os.makedirs(host)
    with open(os.path.join(host, "lvm.conf"), "w") as f:
        f.write("# comment\ndevices {\n\t# filter = []\n\n\tfilter = [ \"r|#|\", # kept\n\t\"a|.*|\" ]\n}\n")
    with open(os.path.join(host, "lvmlocal.conf"), "w") as f:
        f.write('local {\n\tsystem_id = "h1"\n}\n')
    mine = sysdir.prepare(os.path.join(path, "mine"), host_dir=host)
    conf = open(os.path.join(mine, "lvm.conf")).read()
    assert conf == 'devices {\n\tfilter = [ "r|#|", # kept\n\t"a|.*|" ]\n}\n'
    # LVM reads the same settings from both.
    env = {**os.environ, "LVM_SYSTEM_DIR": host}
    host_view = subprocess.run(["lvmconfig", "devices/filter"], env=env, capture_output=True, text=True)
    env["LVM_SYSTEM_DIR"] = mine
    mine_view = subprocess.run(["lvmconfig", "devices/filter"], env=env, capture_output=True, text=True)
    assert host_view.stdout == mine_view.stdout and "r|#|" in mine_view.stdout
    local = open(os.path.join(mine, "lvmlocal.conf")).read()
    assert local.startswith('local {\n\tsystem_id = "h1"\n}\n') and "use_aio = 0" in local
    # The shell keeps no history (LVM would rewrite it after every command).
    history = subprocess.run(["lvmconfig", "shell/history_size"], env=env, capture_output=True, text=True)
    assert history.stdout.strip() == "history_size=0"
    assert os.path.exists(os.path.join(mine, "profile", sysdir.SHELL_PROFILE + ".profile"))
    assert sysdir.prepare(mine, host_dir=host) == mine


def test_read_only_runner_through_the_shell(
    pvs: list[str], shell: lvm.LvmShell, shell_runner: lvm.Runner, vg: str
) -> None:
    """The HSM's read-only runner over a shell: LVM refuses metadata changes,
    reads work, and nothing leaks into the writable runner's commands (each
    set of settings has its own process and system directory)."""
    ro = lvm.Runner(pvs, shell=shell, read_only=True)
    lvm.lvcreate(shell_runner, vg, "a", EXTENT)
    with pytest.raises(lvm.LVMError):
        lvm.lvcreate(ro, vg, "b", EXTENT)
    with pytest.raises(lvm.LVMError):
        lvm.lvextend(ro, vg, "a", 2 * EXTENT)
    assert size_of(ro, vg, "a") == EXTENT
    assert lvm.lvextend(shell_runner, vg, "a", 2 * EXTENT) == 2 * EXTENT
    assert size_of(ro, vg, "a") == 2 * EXTENT
    with pytest.raises(lvm.LVMError):
        lvm.lvextend(ro, vg, "a", 3 * EXTENT)
    assert [i.name for i in lvm.lvs(lvm.Runner(pvs), vg)] == ["a"]
    assert size_of(shell_runner, vg, "a") == 2 * EXTENT
    assert shell.starts == 2


def _queue(shell: lvm.LvmShell, calls: list[tuple[str, object]]) -> tuple[list[threading.Thread], dict[str, object]]:
    """Start each call in its own thread, one after the other: each is
    written to the shell (shell.commands counts it) before the next starts."""
    results: dict[str, object] = {}
    threads = []
    for name, call in calls:

        def run(name: str = name, call: object = call) -> None:
            try:
                results[name] = call()  # type: ignore[operator]
            except BaseException as e:  # noqa: BLE001 - checked by the test
                results[name] = e

        before = shell.commands
        t = threading.Thread(target=run)
        t.start()
        threads.append(t)
        wait_for(lambda before=before: shell.commands == before + 1, timeout=10)
    return threads, results


def test_pipelined_commands_get_their_own_results(shell_runner: lvm.Runner, shell: lvm.LvmShell, vg: str) -> None:
    """Commands queued behind each other in one process: each gets its own
    report, exit code and error messages, in order."""
    lvm.lvcreate(shell_runner, vg, "a", EXTENT)
    pid = shell.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # everything below is queued before LVM runs any of it
    try:
        threads, results = _queue(
            shell,
            [
                ("grow", lambda: lvm.lvextend(shell_runner, vg, "a", 2 * EXTENT)),
                ("missing", lambda: lvm.lvextend(shell_runner, vg, "nope", 2 * EXTENT)),
                ("size", lambda: lvm.lv_info(shell_runner, vg, "a").size),
                ("novg", lambda: lvm.vg_info(shell_runner, "no-such-vg")),
                ("grow2", lambda: lvm.lvextend(shell_runner, vg, "a", 3 * EXTENT)),
            ],
        )
    finally:
        os.kill(pid, signal.SIGCONT)
    for t in threads:
        t.join(timeout=20)
    assert results["grow"] == 2 * EXTENT
    assert isinstance(results["missing"], lvm.LVNotFound)
    assert results["size"] == 2 * EXTENT
    assert isinstance(results["novg"], lvm.VGNotFound)
    assert results["grow2"] == 3 * EXTENT
    assert shell.pid == pid and shell.starts == 1


def test_killed_shell_fails_queued_commands(shell_runner: lvm.Runner, shell: lvm.LvmShell, vg: str) -> None:
    """The process dies with one command running and two queued: the first
    fails as in flight, the queued ones each with a ShellError saying they
    were not run; none ran, and the next command gets a new process."""
    lvm.lvcreate(shell_runner, vg, "a", EXTENT)
    lvm.lvcreate(shell_runner, vg, "b", EXTENT)
    pid = shell.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    threads, results = _queue(
        shell,
        [
            ("a", lambda: lvm.lvextend(shell_runner, vg, "a", 2 * EXTENT)),
            ("b", lambda: lvm.lvextend(shell_runner, vg, "b", 2 * EXTENT)),
            ("a2", lambda: lvm.lvextend(shell_runner, vg, "a", 3 * EXTENT)),
        ],
    )
    os.kill(pid, signal.SIGKILL)
    for t in threads:
        t.join(timeout=20)
    assert all(isinstance(results[n], lvm.ShellError) for n in ("a", "b", "a2"))
    assert "exited" in str(results["a"])
    assert "not run" in str(results["b"]) and "not run" in str(results["a2"])
    assert [e.cmd[1] for e in results.values() if isinstance(e, lvm.ShellError)] == ["lvextend"] * 3
    assert {i.name: i.size for i in lvm.lvs(shell_runner, vg)} == {"a": EXTENT, "b": EXTENT}
    assert shell.starts == 2 and shell.pid != pid
