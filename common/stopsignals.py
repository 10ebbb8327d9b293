"""Turn SIGTERM/SIGINT into a call made from an ordinary thread.

A Python signal handler runs in the main thread, between two bytecodes of
whatever the main thread was doing. Our daemons' main threads sit in
``threading.Event.wait(timeout)``, and the obvious handler calls
``Event.set()``. That deadlocks when the signal lands just after ``wait``
re-took the event's internal lock: the handler then blocks on that same
(non-reentrant) lock, held by the thread it interrupted, forever. The
daemon ignores every later signal and systemd has to SIGKILL it after
TimeoutStopSec, with its lease or host id still held.

This was seen in a fault-injection trial (an SPM that logged nothing after
SIGTERM) and reproduces in about a thousand signals against a tight wait
loop (tests/common/test_stopsignals.py).

So the Python-level handler does nothing. The interpreter's C-level handler
writes the signal number to a wakeup pipe (``signal.set_wakeup_fd``) the
moment the signal arrives, whatever the main thread holds, and a small
thread reading that pipe calls ``callback(name)``: taking a lock from there
only waits until the main thread lets go of it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterable
from types import FrameType

log = logging.getLogger("xtnd.signals")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _ignore(signo: int, frame: FrameType | None) -> None:
    """Python-level handler: the work is done by the pipe's reader thread."""


class StopSignals:
    """Installed by ``install``; ``close()`` puts the old handlers back."""

    def __init__(self, callback: Callable[[str], None], signals: Iterable[signal.Signals]):
        self._callback = callback
        self._signals = tuple(signals)
        self._wanted = {int(s) for s in self._signals}
        self._r, self._w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self._w, False)
        self._old_fd = signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)
        self._old = {s: signal.signal(s, _ignore) for s in self._signals}
        self._thread = threading.Thread(target=self._run, name="xtnd-signals", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                data = os.read(self._r, 64)
            except OSError:
                return  # closed
            if not data:
                return
            for signo in data:
                if signo not in self._wanted:
                    continue  # another signal with a Python handler
                try:
                    self._callback(signal.Signals(signo).name)
                except Exception:  # a broken callback must not end signal handling
                    log.exception("signal callback failed")

    def close(self) -> None:
        """Restore the previous handlers and wakeup fd (main thread only)."""
        for s, old in self._old.items():
            signal.signal(s, old)
        signal.set_wakeup_fd(self._old_fd)
        os.close(self._w)  # the reader sees EOF
        self._thread.join(timeout=1.0)
        with contextlib.suppress(OSError):
            os.close(self._r)


def install(callback: Callable[[str], None], signals: Iterable[signal.Signals] = STOP_SIGNALS) -> StopSignals:
    """Call ``callback(signal_name)`` from a thread of ours for each of
    ``signals``. Must be called from the main thread (as signal.signal)."""
    return StopSignals(callback, signals)
