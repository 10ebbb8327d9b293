"""Leaving the SPM role without a window for two writers.

The lease ends when this process's sanlock registration closes, at exit,
or when it is released. Either must wait until no child of ours can still
write the shared VG: a killed lvextend in uninterruptible I/O lives on, its
metadata write queued, until that I/O ends. reap_children() closes the
command runner to new children, SIGKILLs the live ones and returns once
each is dead; if one never dies, the process stays registered (so the lease
stays ours) and says why every REAP_LOG_INTERVAL (first after REAP_FIRST_REPORT), leaving the decision to
sanlock's own recovery (it kills us when renewals fail; the host's watchdog
fences it if that does not help).

GatedStorage keeps the mailbox from writing replies once the lease is
known lost, while the process waits for its children.
"""

from __future__ import annotations

import logging
import time

from xtnd.common import cmd
from xtnd.mailbox.directio import Counters, Storage, StorageError

log = logging.getLogger("xtnd.spm.exits")

# A child not dead this long after SIGKILL is stuck in I/O: say so, and
# again every REAP_LOG_INTERVAL.
REAP_FIRST_REPORT = 1.0
REAP_LOG_INTERVAL = 10.0


def reap_children(reason: str, log_interval: float = REAP_LOG_INTERVAL, close: bool = True) -> None:
    """No new child from now on (unless not close); kill the live ones;
    return once all are dead."""
    if close:
        cmd.CHILDREN.close(reason)
    killed = cmd.CHILDREN.kill()
    if not killed:
        return
    start = time.monotonic()
    log.warning(
        "killing children before giving up the lease reason=%s children=%s",
        reason,
        " ".join(f"{c.pid}:{c.cmd[0]}" for c in killed),
    )
    wait = REAP_FIRST_REPORT
    while True:
        alive = cmd.CHILDREN.wait(wait)
        wait = log_interval
        if not alive:
            break
        log.error(
            "children still alive after SIGKILL, keeping the sanlock registration (and the lease) "
            "until they are gone waited=%.1fs children=%s",
            time.monotonic() - start,
            "; ".join(f"pid={c.pid} cmd={' '.join(c.cmd[:2])}" for c in alive),
        )
    log.info("all children gone count=%d waited=%.3fs", len(killed), time.monotonic() - start)


class GatedStorage:
    """A mailbox area whose writes can be shut off (reads go on)."""

    def __init__(self, storage: Storage):
        self._storage = storage
        self.path = storage.path
        self.counters: Counters = storage.counters
        self._shut: str | None = None

    @property
    def size(self) -> int:
        return self._storage.size

    def read(self, offset: int, length: int) -> bytes:
        return self._storage.read(offset, length)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if self._shut is not None:
            raise StorageError(f"{self.path}: writes shut off: {self._shut}")
        self._storage.write(offset, data)

    def shut(self, reason: str) -> None:
        self._shut = reason

    def close(self) -> None:
        self._storage.close()
