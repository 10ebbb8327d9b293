"""Running external commands: argv only, typed errors, no orphans.

Every external tool (lvm, losetup, qemu-img, sanlock, ...) runs through
run(): it never uses a shell, raises CommandError with the command, exit
code and both outputs when the command fails, and kills the child if the
caller is interrupted or the timeout expires, so nothing is left behind.

Children also die with their parent: each runs under util-linux's
``setpriv --pdeathsig KILL``, which asks the kernel (PR_SET_PDEATHSIG) to
SIGKILL the child when the thread that started it dies. This matters most
for the SPM: if it is SIGKILLed mid-extend, sanlock frees its lease at
once, and an lvextend still running after that could change LVM metadata
while another host is already the SPM. (subprocess's preexec_fn could set
the same flag, but it is unsafe in a process with threads.)

A dying parent is not enough, though: a SIGKILLed child that sits in
uninterruptible I/O (its metadata write queued on a slow PV) lives on
until the I/O ends, and the kernel lets a process exit only once its
in-flight asynchronous I/O completes. So every child is also registered
in CHILDREN until it is reaped: a daemon whose right to write ends with
its own life (the SPM's lease ends when its sanlock registration closes)
closes the registry, kills what is left and waits until each child is
dead before it exits or releases anything.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import select
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence

log = logging.getLogger("xtnd.cmd")

_SETPRIV = shutil.which("setpriv")
if _SETPRIV is None:
    log.warning("setpriv not found: child processes will not die with their parent")


def pdeathsig_missing() -> str | None:
    """Why children cannot be tied to our life, or None when they are.

    The SPM refuses to start then: a child outliving it could write LVM
    metadata after its lease was freed.
    """
    if _SETPRIV is None:
        return "setpriv (util-linux) not found in PATH: LVM children cannot be tied to the daemon's life"
    return None


def tied_argv(cmd: Sequence[str]) -> list[str]:
    """cmd wrapped so that the child dies with the thread that starts it.

    For a long-lived child started with subprocess directly (the LVM shell);
    run() uses it for every command.
    """
    if _SETPRIV is None:
        return list(cmd)
    return [_SETPRIV, "--pdeathsig", "KILL", "--", *cmd]


class CommandError(Exception):
    """An external command failed."""

    def __init__(self, cmd: Sequence[str], rc: int, out: bytes, err: bytes):
        self.cmd = list(cmd)
        self.rc = rc
        self.out = out
        self.err = err
        super().__init__(str(self))

    def __str__(self) -> str:
        err = self.err.decode("utf-8", "replace").strip()
        return f"command {self.cmd} failed rc={self.rc} err={err!r}"


class CommandTimeout(CommandError):
    """An external command did not finish in time and was killed."""

    def __init__(self, cmd: Sequence[str], timeout: float, out: bytes, err: bytes):
        self.timeout = timeout
        super().__init__(cmd, -9, out, err)

    def __str__(self) -> str:
        return f"command {self.cmd} timed out after {self.timeout}s and was killed"


class ChildrenClosed(CommandError):
    """The process is exiting: no new child may start."""

    def __init__(self, cmd: Sequence[str], reason: str):
        self.reason = reason
        super().__init__(cmd, -1, b"", reason.encode())

    def __str__(self) -> str:
        return f"command {self.cmd} not started: {self.reason}"


@dataclasses.dataclass(frozen=True)
class Child:
    pid: int
    pidfd: int  # names this very process, even after its pid is reused
    cmd: tuple[str, ...]
    started: float  # monotonic


class Children:
    """The children of this process that run() started and has not reaped.

    One per process (CHILDREN), as the children themselves are the
    process's. close() makes every later run() fail before it forks; kill()
    SIGKILLs the live children; wait() returns once all of them are dead
    (a dead child cannot write any more; its reaping is run()'s job).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._children: dict[int, Child] = {}
        self._closed: str | None = None

    def add(self, proc: subprocess.Popen[bytes], cmd: Sequence[str]) -> Child:
        """Register a child just started; raise ChildrenClosed (after
        killing it) if close() came first."""
        child = Child(proc.pid, os.pidfd_open(proc.pid), tuple(cmd), time.monotonic())
        with self._lock:
            self._children[child.pid] = child
            closed = self._closed
        if closed is not None:
            # Started between our check and close(): it is registered, so
            # whoever closed waits for it too.
            proc.kill()
            raise ChildrenClosed(cmd, closed)
        return child

    def check(self, cmd: Sequence[str]) -> None:
        if self._closed is not None:
            raise ChildrenClosed(cmd, self._closed)

    def remove(self, child: Child) -> None:
        with self._lock:
            self._children.pop(child.pid, None)
        os.close(child.pidfd)

    def close(self, reason: str) -> None:
        with self._lock:
            if self._closed is None:
                self._closed = reason

    @property
    def closed(self) -> bool:
        return self._closed is not None

    def live(self) -> list[Child]:
        with self._lock:
            return list(self._children.values())

    def kill(self) -> list[Child]:
        """SIGKILL every registered child; return them."""
        children = self.live()
        for child in children:
            try:
                signal.pidfd_send_signal(child.pidfd, signal.SIGKILL)
            except (ProcessLookupError, OSError):
                pass  # already dead (or its pidfd closed by run() meanwhile)
        return children

    def wait(self, timeout: float) -> list[Child]:
        """Wait until every registered child is dead; return those still
        alive after timeout (an empty list: none is left)."""
        deadline = time.monotonic() + timeout
        while True:
            alive = [c for c in self.live() if not _dead(c)]
            left = deadline - time.monotonic()
            if not alive or left <= 0:
                return alive
            poller = select.poll()
            for child in alive:
                poller.register(child.pidfd, select.POLLIN)
            poller.poll(max(1, int(left * 1000)))


def _dead(child: Child) -> bool:
    """A pidfd polls readable once its process has exited."""
    poller = select.poll()
    try:
        poller.register(child.pidfd, select.POLLIN)
    except (OSError, ValueError):
        return True  # closed by run(): reaped
    return any(mask & (select.POLLIN | select.POLLNVAL) for _, mask in poller.poll(0))


# This process's children (see Children).
CHILDREN = Children()


def run(
    cmd: Sequence[str],
    input: bytes | None = None,
    timeout: float | None = None,
    env: Mapping[str, str] | None = None,
    check: bool = True,
) -> bytes:
    """Run cmd, return its stdout; raise CommandError if it fails."""
    start = time.monotonic()
    log.debug("run cmd=%s", cmd)
    CHILDREN.check(cmd)
    with subprocess.Popen(
        tied_argv(cmd),
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(env) if env is not None else None,
    ) as proc:
        child: Child | None = None
        try:
            child = CHILDREN.add(proc, cmd)
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise CommandTimeout(cmd, timeout or 0, out, err) from None
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            if child is not None and proc.returncode is not None:
                CHILDREN.remove(child)
    elapsed = time.monotonic() - start
    log.debug("done cmd=%s rc=%d elapsed=%.3f", cmd[0], proc.returncode, elapsed)
    if check and proc.returncode != 0:
        raise CommandError(cmd, proc.returncode, out, err)
    return out
