"""Rate-limited logging for errors that repeat every scan."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable


class RateLimitedLog:
    """Log a message at most once per ``interval`` seconds per key.

    Repeats in between are counted and the count is reported with the next
    message, so nothing is silently lost.
    """

    def __init__(self, logger: logging.Logger, interval: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self._log = logger
        self._interval = interval
        self._clock = clock
        self._last: dict[Hashable, tuple[float, int]] = {}

    def log(self, level: int, key: Hashable, msg: str, *args: object) -> None:
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last[0] < self._interval:
            self._last[key] = (last[0], last[1] + 1)
            return
        suppressed = last[1] if last is not None else 0
        self._last[key] = (now, 0)
        if suppressed:
            msg += " (%d similar messages suppressed)"
            args = (*args, suppressed)
        self._log.log(level, msg, *args)

    def forget(self, key: Hashable) -> None:
        self._last.pop(key, None)
