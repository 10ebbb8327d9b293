"""Waiting on conditions with timeouts, never bare sleeps."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class Timeout(AssertionError):
    pass


def wait_for(predicate: Callable[[], T | None], timeout: float = 30.0, interval: float = 0.01, what: str = "") -> T:
    """Poll predicate until it returns a true value; return that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise Timeout(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)
