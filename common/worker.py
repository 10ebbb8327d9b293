"""The life cycle of a daemon's background thread, written once.

A Worker owns one named daemon thread running _run(). stop() sets a flag
under a condition, wakes every wait on that condition and joins the
thread with a timeout, so a loop that waits with _pause() (never a bare
sleep) ends at once. A thread blocked elsewhere (select(), libvirt's
event loop) is woken by overriding _wake().

Subclasses share the condition for their own state (pass lock= to build
it on a lock they already use), so "stop" and "work arrived" wake the
same waits.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Callable


class Worker(abc.ABC):
    def __init__(self, name: str, lock: threading.Lock | None = None):
        """name: the thread's name (ps -L, py-spy); lock: the lock under
        the condition, when the subclass guards its state with it."""
        self.name = name
        self._cond = threading.Condition(lock)
        self._stopping = False
        self._thread: threading.Thread | None = None

    @abc.abstractmethod
    def _run(self) -> None:
        """The thread's body; returns once stopping (see _pause)."""

    def _wake(self) -> None:  # noqa: B027 - an optional hook, not abstract
        """Called by stop() after setting the flag: wake a thread blocked
        outside the condition. Nothing by default."""

    def start(self) -> None:
        """Start the thread; a stopped worker may be started again."""
        if self._thread is not None:
            raise RuntimeError(f"{self.name} already started")
        with self._cond:
            self._stopping = False
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> bool:
        """Ask the thread to end and wait up to timeout seconds for it; True
        once it ended (or never started), False if it is still running."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        thread = self._thread
        if thread is None:
            return True
        self._wake()
        thread.join(timeout)
        if thread.is_alive():
            return False
        self._thread = None
        return True

    @property
    def alive(self) -> bool:
        """The thread runs (a daemon's health checks look at it)."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    @property
    def stopping(self) -> bool:
        with self._cond:
            return self._stopping

    def _pause(self, timeout: float | None, until: Callable[[], bool] | None = None) -> bool:
        """Wait up to timeout seconds (None: no limit), less if until()
        becomes true (checked under the condition, after each notify) or
        stop() is called. False when stopping: the loop should end.
        Call without holding the condition's lock."""
        with self._cond:
            self._cond.wait_for(lambda: self._stopping or (until is not None and until()), timeout)
            return not self._stopping
