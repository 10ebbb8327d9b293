"""systemd's service watchdog (``WatchdogSec=``): WATCHDOG=1 from a main loop.

systemd passes the period in $WATCHDOG_USEC (and the pid it is meant for in
$WATCHDOG_PID) and restarts the service when no "WATCHDOG=1" came within
it. A daemon pings from its main loop, only after checking that the work
it exists for still happens (the SPM: its lease checks succeed), so a stuck
loop or a silently dead thread is restarted, not only a dead process.
Outside systemd (no $WATCHDOG_USEC) nothing is sent.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping

log = logging.getLogger("xtnd.watchdog")


def period(env: Mapping[str, str] | None = None) -> float | None:
    """The watchdog period systemd asks of this process (seconds), or None."""
    env = os.environ if env is None else env
    pid = env.get("WATCHDOG_PID")
    if pid and pid.strip() != str(os.getpid()):
        return None
    try:
        usec = int(env.get("WATCHDOG_USEC", "0"))
    except ValueError:
        return None
    return usec / 1e6 if usec > 0 else None


class Watchdog:
    """Pings at half the period; interval is how long a loop may wait between pings."""

    def __init__(
        self,
        notify: Callable[[str], object],
        env: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._notify = notify
        self._clock = clock
        self.period = period(env)
        self.interval = self.period / 2 if self.period else None
        self._last = float("-inf")
        self.pings = 0
        self.withheld = 0
        if self.period:
            log.info("systemd watchdog enabled period=%.1fs", self.period)

    @property
    def enabled(self) -> bool:
        return self.period is not None

    def wait_time(self, default: float | None) -> float | None:
        """How long a main loop may sleep (its own default, or less for the next ping)."""
        if self.interval is None:
            return default
        return self.interval if default is None else min(default, self.interval)

    def ping(self, healthy: bool = True, why: str = "") -> None:
        """Send WATCHDOG=1 if healthy; log (rate: once per state change) when not."""
        if not self.enabled:
            return
        if not healthy:
            if self.withheld == 0:
                log.error("withholding the systemd watchdog ping: %s", why or "unhealthy")
            self.withheld += 1
            return
        if self.withheld:
            log.warning("systemd watchdog pings resumed after %d withheld", self.withheld)
            self.withheld = 0
        try:
            self._notify("WATCHDOG=1")
        except OSError as e:
            log.warning("cannot ping the systemd watchdog: %s", e)
            return
        self._last = self._clock()
        self.pings += 1

    @contextlib.contextmanager
    def covering(self, what: str) -> Iterator[None]:
        """Ping from a helper thread while the main loop blocks in a bounded call
        (e.g. joining a sanlock lockspace, which takes tens of seconds)."""
        if self.interval is None:
            yield
            return
        done = threading.Event()
        interval = self.interval

        def run() -> None:
            while not done.wait(interval):
                self.ping()

        thread = threading.Thread(target=run, name=f"xtnd-watchdog-{what}", daemon=True)
        self.ping()
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()
