"""Real sanlock daemons for tests, one per simulated host.

The sanlock daemon cannot start on the test machines as is (no
CAP_SYS_RESOURCE, hard RLIMIT_MEMLOCK of 8 MiB): a tiny LD_PRELOAD shim
(sanlock_shim.c, compiled with gcc on first use and cached under
/var/tmp/xtnd-tests) makes its setrlimit() calls succeed, and the daemon runs
without watchdog, RT priority or mlockall.

One daemon holds one host id per lockspace, so every simulated host needs its
own daemon. Clients (the sanlock Python binding, the sanlock CLI) always talk
to /run/sanlock/sanlock.sock, so each daemon runs in its own mount namespace
with a private tmpfs on /run/sanlock, and a client of host N must run in host
N's namespace: SanlockDaemon.popen() starts any command there (through
nsenter), for example an SPM daemon or lease_agent. All hosts share the same
lockspace and lease files, as hosts share a storage domain.

The default daemon (fixture `sanlockd`) runs in the root namespace instead,
so simple tests can use the binding in the pytest process itself. If another
daemon already answers there it is reused and left alone.

Everything is started from fixtures and killed at teardown, even when a test
fails; every child also gets PR_SET_PDEATHSIG(SIGKILL) so that nothing
survives a pytest process that is killed outright.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import logging
import os
import shutil
import signal
import struct
import subprocess
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import IO, Any

import pytest

from . import storage
from .wait import wait_for

log = logging.getLogger("xtnd.tests.sanlockd")

SHIM_SOURCE = os.path.join(os.path.dirname(__file__), "sanlock_shim.c")
RUN_DIR = "/run/sanlock"
SOCKET = os.path.join(RUN_DIR, "sanlock.sock")
DAEMON_ARGS = ("daemon", "-D", "-w", "0", "-h", "0", "-l", "0", "-U", "root", "-G", "root")

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # Runs in the child between fork and exec. The flag survives exec of
    # non-setuid programs (unshare, sh, nsenter, sanlock, python).
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def missing() -> str | None:
    """Why real sanlock daemons cannot run here, or None if they can."""
    if not storage.is_root():
        return "needs root"
    for tool in ("sanlock", "gcc", "unshare", "nsenter", "mount"):
        if shutil.which(tool) is None:
            return f"{tool} not installed"
    return None


def shim() -> str:
    """Compile the setrlimit shim once per source version; return its path."""
    with open(SHIM_SOURCE, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:12]
    os.makedirs(storage.BASE, exist_ok=True)
    path = os.path.join(storage.BASE, f"sanlock-shim-{digest}.so")
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
    pytest process itself is a client.
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
                argv, env=env, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, preexec_fn=_die_with_parent
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
            preexec_fn=_die_with_parent,
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


# Making one host's storage fail: sanlock opens its ids and leases once and
# keeps the descriptors, so changing paths or permissions (root!) has no
# effect. Instead each host reaches the shared files through its own loop
# device; shrinking that device's size limit to one sector makes every
# sanlock read of the host come back short (sanlock logs error -90) while the
# other hosts, on their own loop devices over the same files, go on working.

_LOOP_SET_STATUS64 = 0x4C04
_LOOP_GET_STATUS64 = 0x4C05
# struct loop_info64 from <linux/loop.h>; lo_sizelimit is the 5th field.
_LOOP_INFO64 = struct.Struct("=QQQQQIIII64s64s32s2Q")


def set_loop_sizelimit(device: str, sizelimit: int) -> None:
    """Change a loop device's size limit in place (0 = up to the file's end)."""
    fd = os.open(device, os.O_RDONLY)
    try:
        buf = bytearray(_LOOP_INFO64.size)
        fcntl.ioctl(fd, _LOOP_GET_STATUS64, buf)
        fields = list(_LOOP_INFO64.unpack(buf))
        fields[4] = sizelimit
        fcntl.ioctl(fd, _LOOP_SET_STATUS64, _LOOP_INFO64.pack(*fields))
    finally:
        os.close(fd)


def fail_storage(*devices: str) -> None:
    """Make every read past the first sector of these loop devices short."""
    for device in devices:
        set_loop_sizelimit(device, 512)


def restore_storage(*devices: str) -> None:
    for device in devices:
        set_loop_sizelimit(device, 0)


def attach_loop(path: str) -> str:
    """A loop device over path with direct I/O, so hosts never see stale data."""
    cmd = ["losetup", "--find", "--show", "--direct-io=on", path]
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()


# Fixtures: imported by tests/conftest.py.


@pytest.fixture(scope="session")
def sanlockd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SanlockDaemon]:
    """A sanlock daemon serving the pytest process (root namespace)."""
    reason = missing()
    if reason:
        pytest.skip(f"sanlock: {reason}")
    logdir = tmp_path_factory.mktemp("sanlockd")
    daemon = SanlockDaemon("root", str(logdir), namespace=False).start()
    yield daemon
    daemon.stop()


@pytest.fixture
def sanlock_hosts(workdir: str) -> Iterator[Callable[[int], list[SanlockDaemon]]]:
    """Factory: start(n) -> n daemons, one per host, each in its own namespace.

    All of them are killed at the end of the test, with their clients.
    """
    reason = missing()
    if reason:
        pytest.skip(f"sanlock: {reason}")
    started: list[SanlockDaemon] = []

    def start(count: int) -> list[SanlockDaemon]:
        hosts = []
        for _ in range(count):
            daemon = SanlockDaemon(f"host{len(started) + 1}", workdir)
            started.append(daemon)
            hosts.append(daemon.start())
        return hosts

    yield start
    for daemon in reversed(started):
        daemon.stop()
