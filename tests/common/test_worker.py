"""common.worker with real threads: every wait here ends on an event, none on a sleep."""

from __future__ import annotations

import threading

import pytest
from xtnd.common.worker import Worker

# Long enough never to pass by accident on a loaded machine: a stop that
# works returns at once, one that does not waits this long and fails.
TIMEOUT = 10.0


class Sleeper(Worker):
    """Waits without a time limit until stopped or given jobs; counts rounds."""

    def __init__(self, lock: threading.Lock | None = None):
        super().__init__("xtnd-test-sleeper", lock)
        self.jobs = 0
        self.done = 0
        self.started = threading.Event()
        self.thread_name = ""
        self.ended = threading.Event()

    def _run(self) -> None:
        self.thread_name = threading.current_thread().name
        self.started.set()
        while self._pause(None, lambda: self.jobs > 0):
            with self._cond:
                self.jobs -= 1
                self.done += 1
                self._cond.notify_all()
        self.ended.set()

    def add_job(self) -> None:
        with self._cond:
            self.jobs += 1
            self._cond.notify_all()

    def wait_done(self, n: int) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.done >= n, TIMEOUT)


def test_start_runs_a_named_daemon_thread_and_stop_ends_it() -> None:
    w = Sleeper()
    w.start()
    assert w.started.wait(TIMEOUT)
    assert w.alive
    assert w.thread_name == "xtnd-test-sleeper"
    assert w._thread is not None and w._thread.daemon
    # The thread waits with no time limit: only stop() can end it.
    assert w.stop(TIMEOUT)
    assert w.ended.is_set()
    assert not w.alive


def test_until_wakes_the_pause_without_stopping() -> None:
    w = Sleeper()
    w.start()
    try:
        w.add_job()
        assert w.wait_done(1)
        w.add_job()
        w.add_job()
        assert w.wait_done(3)
        assert w.alive and not w.stopping
    finally:
        assert w.stop(TIMEOUT)


def test_pause_times_out_and_reports_not_stopping() -> None:
    w = Sleeper()
    # Not started: _pause is usable from any thread, and returns on its timeout.
    assert w._pause(0.01) is True
    assert w.stop(TIMEOUT)  # never started: nothing to join
    assert w._pause(None) is False  # stopping: returns at once even without a limit


def test_start_twice_raises_and_a_stopped_worker_restarts() -> None:
    w = Sleeper()
    w.start()
    try:
        with pytest.raises(RuntimeError, match="xtnd-test-sleeper already started"):
            w.start()
    finally:
        assert w.stop(TIMEOUT)
    w.started.clear()
    w.start()
    assert w.started.wait(TIMEOUT)
    assert not w.stopping
    w.add_job()
    assert w.wait_done(1)
    assert w.stop(TIMEOUT)


def test_shared_lock_is_the_condition_lock() -> None:
    lock = threading.Lock()
    w = Sleeper(lock)
    with w._cond:
        assert lock.locked()
    assert not lock.locked()
    w.start()
    try:
        # A job added under the subclass's own lock wakes the worker.
        with lock:
            w.jobs += 1
            w._cond.notify_all()
        assert w.wait_done(1)
    finally:
        assert w.stop(TIMEOUT)


class Blocked(Worker):
    """Blocks on an event outside the condition: only _wake() can end it."""

    def __init__(self, wake: bool):
        super().__init__("xtnd-test-blocked")
        self.release = threading.Event()
        self.inside = threading.Event()
        self.wakes = 0
        self._use_wake = wake

    def _wake(self) -> None:
        self.wakes += 1
        if self._use_wake:
            self.release.set()

    def _run(self) -> None:
        while not self.stopping:
            self.inside.set()
            self.release.wait()


def test_wake_hook_ends_a_thread_blocked_elsewhere() -> None:
    w = Blocked(wake=True)
    w.start()
    assert w.inside.wait(TIMEOUT)
    assert w.stop(TIMEOUT)
    assert w.wakes == 1
    assert not w.alive


def test_stop_reports_a_thread_that_does_not_end() -> None:
    w = Blocked(wake=False)
    w.start()
    assert w.inside.wait(TIMEOUT)
    assert w.stop(0.05) is False
    assert w.alive
    # Still stoppable once what blocks it lets go; the worker stays stopping.
    w.release.set()
    assert w.stop(TIMEOUT)
    assert not w.alive
    assert w.wakes == 2
