"""What the local sanlock daemon knows, from the sanlock command line tool.

(Formatting and reading sanlock areas on storage, which needs no daemon,
is xtnd.storage.sanlockdirect. Used by the SPM lease and by the lockspace
membership of both daemons.)

- lockspace_status(): what the local daemon knows about the renewal of our
  host id. The Python binding does not expose it: get_hosts() reports our own
  delta lease as read at the start of the last renewal, so it lags one
  renewal behind; `sanlock client status -D` reports the daemon's clock and
  the time of the last successful renewal, both in whole seconds of
  CLOCK_MONOTONIC, and the flags the daemon sets when it gives up on the
  lockspace (renew_fail, space_dead, killing_pids). It costs ~3 ms.
"""

from __future__ import annotations

import dataclasses

from xtnd.common import cmd

SANLOCK = "sanlock"
STATUS_TIMEOUT = 10.0


@dataclasses.dataclass(frozen=True)
class LockspaceStatus:
    """The local daemon's view of our host id in one lockspace.

    Times are whole seconds of the daemon's CLOCK_MONOTONIC.
    """

    monotime: int
    renewal_last_success: int
    renewal_last_result: int
    renew_fail: bool
    space_dead: bool
    killing_pids: bool
    corrupt: bool
    adding: bool
    removing: bool

    @property
    def renewal_age(self) -> int:
        """Upper bound of the seconds since the last successful renewal.

        Both clocks are truncated to seconds, so the true age is less than
        this (+1 covers the truncation).
        """
        return self.monotime - self.renewal_last_success + 1

    def trouble(self) -> str | None:
        """Why the daemon has given up on this lockspace, or None."""
        if self.space_dead:
            return "sanlock declared the lockspace dead"
        if self.killing_pids:
            return "sanlock is killing the lease holders"
        if self.renew_fail:
            return "sanlock failed to renew the host id in time"
        if self.corrupt:
            return "sanlock found the lockspace corrupted"
        if self.removing:
            return "the lockspace is being removed"
        return None


def parse_status(text: str, lockspace: str, host_id: int) -> LockspaceStatus | None:
    """Parse `sanlock client status -D`; None if the lockspace is absent.

    The output is a list of sections: an unindented header line ("daemon
    ...", "p PID", "s NAME:HOST_ID:PATH:OFFSET [ADD|REM]", "r ...") followed
    by indented key=value lines.
    """
    daemon: dict[str, str] = {}
    space: dict[str, str] | None = None
    header = ""
    current: dict[str, str] | None = None
    prefix = f"s {lockspace}:{host_id}:"
    for line in text.splitlines():
        if not line.startswith((" ", "\t")):
            current = None
            if line.startswith("daemon "):
                current = daemon
            elif line.startswith(prefix):
                space = current = {}
                header = line
            continue
        if current is not None:
            key, _, value = line.strip().partition("=")
            current[key] = value
    if space is None:
        return None
    try:
        return LockspaceStatus(
            monotime=int(daemon["monotime"]),
            renewal_last_success=int(space["renewal_last_success"]),
            renewal_last_result=int(space["renewal_last_result"]),
            renew_fail=space.get("renew_fail", "0") != "0",
            space_dead=space.get("space_dead", "0") != "0",
            killing_pids=space.get("killing_pids", "0") != "0",
            corrupt=space.get("corrupt_result", "0") != "0",
            adding=header.endswith(" ADD"),
            removing=header.endswith(" REM"),
        )
    except (KeyError, ValueError) as e:
        raise ValueError(f"unexpected sanlock status for lockspace {lockspace}: {e!r}") from e


def lockspace_status(
    lockspace: str, host_id: int, sanlock: str = SANLOCK, timeout: float = STATUS_TIMEOUT
) -> LockspaceStatus | None:
    """Ask the local daemon; raise CommandError if it does not answer."""
    out = cmd.run([sanlock, "client", "status", "-D"], timeout=timeout)
    return parse_status(out.decode("utf-8", "replace"), lockspace, host_id)


def daemon_name(sanlock: str = SANLOCK, timeout: float = STATUS_TIMEOUT) -> str:
    """The local daemon's host name (our_host_name): the owner its delta
    leases carry on disk. New at every daemon start unless configured."""
    out = cmd.run([sanlock, "client", "status", "-D"], timeout=timeout).decode("utf-8", "replace")
    for line in out.splitlines():
        if line.startswith("daemon "):
            return line.split(None, 1)[1].strip()
    raise ValueError("sanlock status names no daemon")
