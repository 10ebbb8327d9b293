"""The systemd watchdog helper: period from the environment, pings, withholding."""

from __future__ import annotations

import os
import threading

from xtnd.common import watchdog


def test_period() -> None:
    assert watchdog.period({}) is None
    assert watchdog.period({"WATCHDOG_USEC": "30000000"}) == 30.0
    assert watchdog.period({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}) == 30.0
    assert watchdog.period({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None  # meant for another process
    assert watchdog.period({"WATCHDOG_USEC": "x"}) is None
    assert watchdog.period({"WATCHDOG_USEC": "0"}) is None


def test_pings_only_when_healthy() -> None:
    sent: list[str] = []
    wd = watchdog.Watchdog(sent.append, {"WATCHDOG_USEC": "2000000"})
    assert wd.interval == 1.0
    assert wd.wait_time(300.0) == 1.0 and wd.wait_time(0.5) == 0.5 and wd.wait_time(None) == 1.0
    wd.ping()
    wd.ping(False, "lease checks failing")
    wd.ping(False, "lease checks failing")
    assert sent == ["WATCHDOG=1"] and wd.withheld == 2
    wd.ping()
    assert sent == ["WATCHDOG=1"] * 2 and wd.withheld == 0


def test_disabled_outside_systemd() -> None:
    sent: list[str] = []
    wd = watchdog.Watchdog(sent.append, {})
    wd.ping()
    with wd.covering("x"):
        pass
    assert sent == [] and wd.wait_time(5.0) == 5.0


def test_covering_pings_while_blocked() -> None:
    sent: list[str] = []
    three = threading.Event()

    def notify(state: str) -> None:
        sent.append(state)
        if len(sent) >= 3:
            three.set()

    wd = watchdog.Watchdog(notify, {"WATCHDOG_USEC": "20000"})  # a ping every 10 ms
    with wd.covering("join"):
        assert three.wait(10)
    assert not any(t.name == "xtnd-watchdog-join" for t in threading.enumerate())


def test_notify_failure_is_logged_not_raised() -> None:
    def broken(state: str) -> None:
        raise ConnectionRefusedError("gone")

    wd = watchdog.Watchdog(broken, {"WATCHDOG_USEC": "2000000"})
    wd.ping()
    assert wd.pings == 0
