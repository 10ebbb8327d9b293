"""Named fault points: moments no outer layer can hit, armed by tests.

Off by default and free when off: ``point(NAME)`` returns after one test of
a module global. ``XTND_FAULTS`` arms points for a process, a comma
separated list of ``NAME=ACTION`` or ``NAME=ACTION@N`` (fire on the Nth
pass only; default the first). Actions:

- ``kill``: SIGKILL this process (a crash: nothing after it runs);
- ``exit``: ``os._exit(EXIT_FAULT)`` without cleanup;
- ``stop``: SIGSTOP this process (someone else sends SIGCONT);
- ``sleep:SECONDS``: block this thread for that long.

A point that fires records a ``fault`` event in the history
(xtnd.common.history) first. Points in the code:

- ``spm.after_lvextend``: lvextend returned, the reply is not written yet;
- ``spm.before_lvextend``: the lease was fenced, lvextend is not run yet;
- ``spm.before_outbox_write``: replies are in memory, not on storage.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

from xtnd.common import history

log = logging.getLogger("xtnd.faults")

ENV = "XTND_FAULTS"
EXIT_FAULT = 99


class FaultSpecError(ValueError):
    """XTND_FAULTS cannot be parsed."""


_armed: dict[str, tuple[str, int]] = {}
_passes: dict[str, int] = {}
_lock = threading.Lock()

ACTIONS = ("kill", "exit", "stop", "sleep")


def parse(spec: str) -> dict[str, tuple[str, int]]:
    armed: dict[str, tuple[str, int]] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, sep, action = item.partition("=")
        if not sep or not name:
            raise FaultSpecError(f"fault {item!r}: expected NAME=ACTION[@N]")
        action, _, nth = action.partition("@")
        try:
            n = int(nth) if nth else 1
        except ValueError:
            raise FaultSpecError(f"fault {item!r}: @N must be a number") from None
        kind, _, arg = action.partition(":")
        if kind not in ACTIONS:
            raise FaultSpecError(f"fault {item!r}: unknown action {kind!r} (one of {', '.join(ACTIONS)})")
        if kind == "sleep":
            try:
                float(arg)
            except ValueError:
                raise FaultSpecError(f"fault {item!r}: sleep needs seconds, sleep:N") from None
        armed[name] = (action, n)
    return armed


def arm(spec: str) -> None:
    """Arm the points of spec (replacing what was armed)."""
    global _armed
    parsed = parse(spec)
    with _lock:
        _armed = parsed
        _passes.clear()


def point(name: str) -> None:
    """A fault point: does nothing unless armed (see the module doc)."""
    if not _armed or name not in _armed:
        return
    with _lock:
        action, nth = _armed[name]
        _passes[name] = n = _passes.get(name, 0) + 1
        if n != nth:
            return
    log.warning("fault point fired point=%s action=%s pass=%d", name, action, n)
    history.record("fault", point=name, action=action)
    for handler in logging.getLogger().handlers:
        handler.flush()
    kind, _, arg = action.partition(":")
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "exit":
        os._exit(EXIT_FAULT)
    elif kind == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    elif kind == "sleep":
        time.sleep(float(arg))


if os.environ.get(ENV):
    try:
        arm(os.environ[ENV])
    except FaultSpecError as e:
        log.error("ignoring %s: %s", ENV, e)
