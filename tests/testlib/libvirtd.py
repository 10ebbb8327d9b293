"""A private libvirtd that a test may kill and restart.

Other tests (and other people) use the machine's libvirtd; killing it
would break them. This one runs in its own mount namespace with empty
tmpfs over libvirt's state and config folders, so it sees no domain,
network or lock of the real one, and listens on a socket under the
test's directory: connect with uri().
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

from xtnd.tools.rig.wait import Timeout

# Folders where libvirtd keeps state, locks, caches and persistent config.
PRIVATE_DIRS = ("/run/libvirt", "/var/lib/libvirt", "/var/cache/libvirt", "/etc/libvirt")


class PrivateLibvirtd:
    def __init__(self, workdir: str):
        self.dir = os.path.join(workdir, "libvirtd")
        self.sock_dir = os.path.join(self.dir, "sock")
        os.makedirs(self.sock_dir, exist_ok=True)
        self.conf = os.path.join(self.dir, "libvirtd.conf")
        with open(self.conf, "w") as f:
            f.write(f'unix_sock_dir = "{self.sock_dir}"\n')
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def socket(self) -> str:
        return os.path.join(self.sock_dir, "libvirt-sock")

    def uri(self) -> str:
        return f"qemu:///system?socket={self.socket}"

    def start(self, timeout: float = 30.0) -> None:
        mounts = "; ".join(f"mount -t tmpfs xtnd-test {d} || exit 1" for d in PRIVATE_DIRS)
        self.starts += 1
        log = open(os.path.join(self.dir, f"libvirtd.{self.starts}.log"), "wb")
        with log:
            # unshare makes the mounts private to the new namespace; exec
            # keeps one process to signal: libvirtd itself.
            self.proc = subprocess.Popen(
                [
                    "unshare",
                    "--mount",
                    "sh",
                    "-c",
                    f'{mounts}; exec libvirtd -f "{self.conf}" -p "{self.dir}/libvirtd.pid"',
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while not self._accepts():
            if self.proc.poll() is not None:
                raise RuntimeError(f"private libvirtd exited rc={self.proc.returncode}, see {log.name}")
            if time.monotonic() > deadline:
                raise Timeout(f"private libvirtd did not listen on {self.socket} in {timeout}s")
            time.sleep(0.05)

    def _accepts(self) -> bool:
        # A killed daemon leaves its socket file: existence proves nothing.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(self.socket)
            except OSError:
                return False
            return True

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(30)
        self.proc = None
