"""common/stopsignals: a stop signal is never lost to a deadlocked handler.

The child process below is a daemon's main loop at its most exposed: it
waits on a threading.Event with a tiny timeout, over and over, so a signal
very often lands while Event.wait holds the event's internal lock. With the
naive handler (Event.set() inside the signal handler) the child deadlocks
within about a thousand signals (the "naive" case proves the test can see
it); through stopsignals it handles every burst and exits when told.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

CHILD = textwrap.dedent(
    """
    import signal, sys, threading, time
    from xtnd.common import stopsignals

    ev = threading.Event()
    done = threading.Event()
    seen = [0]

    def on_signal(name):
        if name == "SIGUSR1":
            seen[0] += 1
            ev.set()
        else:
            done.set()
            ev.set()

    if sys.argv[1] == "naive":
        def handler(signo, frame):
            on_signal(signal.Signals(signo).name)
        signal.signal(signal.SIGUSR1, handler)
        signal.signal(signal.SIGTERM, handler)
    else:
        stopsignals.install(on_signal, (signal.SIGUSR1, signal.SIGTERM))
    print("ready", flush=True)
    while not done.is_set():
        ev.wait(0.0001)
        ev.clear()
    print("stopped", seen[0], flush=True)
    """
)


def _storm(mode: str, seconds: float) -> tuple[int | None, str, int]:
    """Send SIGUSR1 as fast as possible for ``seconds``, then SIGTERM;
    return (exit code or None if it hung, its output, signals sent)."""
    child = subprocess.Popen([sys.executable, "-c", CHILD, mode], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "ready"
    sent = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        os.kill(child.pid, signal.SIGUSR1)
        sent += 1
        time.sleep(0.0002)
    child.send_signal(signal.SIGTERM)
    try:
        out, _ = child.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate()
        return None, "", sent
    return child.returncode, out, sent


def test_stop_after_a_signal_storm() -> None:
    rc, out, sent = _storm("stopsignals", 4.0)
    assert rc == 0, f"the child did not stop on SIGTERM after {sent} SIGUSR1 (rc={rc})"
    words = out.split()
    assert words[0] == "stopped" and int(words[1]) > 0, out


@pytest.mark.soak
def test_naive_handler_deadlocks() -> None:
    """The failure the module exists for (soak: it needs a hung child)."""
    rc, out, sent = _storm("naive", 8.0)
    assert rc != 0, f"the naive handler survived {sent} signals; the storm is too weak to prove anything"
