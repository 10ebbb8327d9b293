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
"""

from __future__ import annotations

import logging
import shutil
import subprocess
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


def _argv(cmd: Sequence[str]) -> list[str]:
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
    with subprocess.Popen(
        _argv(cmd),
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(env) if env is not None else None,
    ) as proc:
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise CommandTimeout(cmd, timeout or 0, out, err) from None
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    elapsed = time.monotonic() - start
    log.debug("done cmd=%s rc=%d elapsed=%.3f", cmd[0], proc.returncode, elapsed)
    if check and proc.returncode != 0:
        raise CommandError(cmd, proc.returncode, out, err)
    return out
