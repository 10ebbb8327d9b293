"""Real sanlock daemons, one per simulated host.

The sanlock daemon cannot start on our test machines as is (no
CAP_SYS_RESOURCE, hard RLIMIT_MEMLOCK of 8 MiB): a tiny LD_PRELOAD shim
(sanlock_shim.c, shipped in this package, compiled with gcc on first use and
cached under RIG_DIR) makes its setrlimit() calls succeed, and the daemon
runs without watchdog, RT priority or mlockall. Never for production hosts.

One daemon holds one host id per lockspace, so every simulated host needs its
own daemon. Clients (the sanlock Python binding, the sanlock CLI) always talk
to /run/sanlock/sanlock.sock, so each daemon runs in its own mount namespace
with a private tmpfs on /run/sanlock, and a client of host N must run in host
N's namespace: SanlockDaemon.popen() starts any command there (through
nsenter), for example an SPM daemon or lease_agent. All hosts share the same
lockspace and lease files, as hosts share a storage domain.

namespace=False runs the daemon in the root namespace instead, so simple
tests can use the binding in their own process. If another daemon already
answers there it is reused and left alone.

stop() kills a daemon and every client started through it; every child also
gets PR_SET_PDEATHSIG(SIGKILL), so nothing survives a rig process that is
killed outright.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import signal
import subprocess
from collections.abc import Mapping, Sequence
from typing import IO, Any

from xtnd.tools.rig import loops
from xtnd.tools.rig.wait import wait_for

log = logging.getLogger("xtnd.rig.sanlockd")

# Built artefacts shared by every rig user (guest kernels, the shim).
RIG_DIR = "/var/tmp/xtnd-rig"

SHIM_SOURCE = os.path.join(os.path.dirname(__file__), "sanlock_shim.c")
RUN_DIR = "/run/sanlock"
SOCKET = os.path.join(RUN_DIR, "sanlock.sock")
DAEMON_ARGS = ("daemon", "-D", "-w", "0", "-h", "0", "-l", "0", "-U", "root", "-G", "root")

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGKILL when its parent (this process) dies."""
    # Runs in the child between fork and exec. The flag survives exec of
    # non-setuid programs (unshare, sh, nsenter, sanlock, python).
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def missing() -> str | None:
    """Why real sanlock daemons cannot run here, or None if they can."""
    if not loops.is_root():
        return "needs root"
    for tool in ("sanlock", "gcc", "unshare", "nsenter", "mount"):
        if shutil.which(tool) is None:
            return f"{tool} not installed"
    return None


def shim() -> str:
    """Compile the setrlimit shim once per source version; return its path."""
    with open(SHIM_SOURCE, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:12]
    os.makedirs(RIG_DIR, mode=0o755, exist_ok=True)
    path = os.path.join(RIG_DIR, f"sanlock-shim-{digest}.so")
    if not os.path.exists(path):
        # Concurrent sessions may compile at the same time: build under a
        # private name, then rename atomically.
        tmp = f"{path}.{os.getpid()}.tmp"
        subprocess.run(
            ["gcc", "-shared", "-fPIC", "-O2", "-Wall", "-o", tmp, SHIM_SOURCE, "-ldl"],
            check=True,
            capture_output=True,
        )
        os.replace(tmp, path)
    return path


class SanlockDaemon:
    """A real sanlock daemon playing one host.

    namespace=True: own mount namespace with its own /run/sanlock; run its
    clients with popen(). namespace=False: the root namespace, where the
    calling process itself is a client.
    """

    def __init__(self, name: str, logdir: str, namespace: bool = True):
        self.name = name
        self.namespace = namespace
        self.logfile = os.path.join(logdir, f"sanlock-{name}.log")
        self.proc: subprocess.Popen[bytes] | None = None
        self.owned = False
        self._children: list[subprocess.Popen[Any]] = []

    @property
    def pid(self) -> int:
        assert self.proc is not None, "daemon not started"
        return self.proc.pid

    @property
    def socket(self) -> str:
        """The daemon's socket as seen from the root namespace."""
        if self.namespace:
            return f"/proc/{self.pid}/root{SOCKET}"
        return SOCKET

    def start(self, timeout: float = 30.0) -> SanlockDaemon:
        env = dict(os.environ, LD_PRELOAD=shim())
        daemon = ["sanlock", *DAEMON_ARGS]
        if self.namespace:
            os.makedirs(RUN_DIR, exist_ok=True)
            # Private propagation: the tmpfs stays inside the namespace, and
            # the daemon's pid and lock files do not clash with other hosts.
            # The shell execs the daemon, so the Popen pid is the daemon's.
            script = f'mount -t tmpfs -o mode=0755 xtnd-sanlock {RUN_DIR} && exec "$@"'
            argv = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh", *daemon]
        else:
            if self._answers():
                log.info("reusing sanlock daemon already running in the root namespace")
                return self
            os.makedirs(RUN_DIR, exist_ok=True)
            argv = daemon
        log.info("starting sanlock daemon name=%s namespace=%s log=%s", self.name, self.namespace, self.logfile)
        with open(self.logfile, "ab") as logf:
            self.proc = subprocess.Popen(
                argv, env=env, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, preexec_fn=die_with_parent
            )
        self.owned = True
        try:
            wait_for(self._ready, timeout=timeout, interval=0.02, what=f"sanlock daemon {self.name} to answer")
        except BaseException:
            self.stop()
            raise
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"sanlock daemon {self.name} exited rc={self.proc.returncode}, see {self.logfile}")
        return self._answers()

    def _answers(self) -> bool:
        if not os.path.exists(self.socket):
            return False
        return self.client("status", check=False).returncode == 0

    def argv(self, cmd: Sequence[str]) -> list[str]:
        """cmd, run inside this host's mount namespace."""
        if not self.namespace:
            return list(cmd)
        # Entering a mount namespace resets the working directory: keep ours.
        return ["nsenter", "--target", str(self.pid), "--mount", f"--wd={os.getcwd()}", "--", *cmd]

    def popen(
        self,
        cmd: Sequence[str],
        env: Mapping[str, str] | None = None,
        stdin: int | IO[Any] | None = subprocess.DEVNULL,
        stdout: int | IO[Any] | None = None,
        stderr: int | IO[Any] | None = None,
        text: bool = False,
    ) -> subprocess.Popen[Any]:
        """Start cmd as a client of this daemon; it is killed by stop()."""
        proc = subprocess.Popen(
            self.argv(cmd),
            env=dict(env) if env is not None else None,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            text=text,
            preexec_fn=die_with_parent,
        )
        self._children.append(proc)
        return proc

    def client(self, *args: str, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run `sanlock client ARGS` against this daemon."""
        return subprocess.run(
            self.argv(["sanlock", "client", *args]), capture_output=True, text=True, timeout=timeout, check=check
        )

    def kill(self) -> None:
        """SIGKILL the daemon: the host dies, its leases stay on storage."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        """Kill the clients started here, then the daemon (never a reused one)."""
        for child in self._children:
            if child.poll() is None:
                child.kill()
            child.wait()
        self._children.clear()
        if self.owned:
            # SIGKILL, not SIGTERM: the daemon ignores SIGTERM while it is
            # still in a lockspace, and tests never need a clean shutdown.
            self.kill()
            self.owned = False
