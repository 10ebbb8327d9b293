"""A recorded history of what a process did, checked by ``xtnd inject``.

Off by default and free when off: ``record()`` returns after one test of a
module global. ``XTND_HISTORY=PATH`` in the environment (or ``enable()``)
turns it on: every record becomes one JSON line appended to PATH with a
single ``write()`` on an ``O_APPEND`` descriptor, so any number of
processes (SPMs, HSMs, the harness's clients) share one file and their
lines never interleave. ``XTND_HISTORY_NAME`` names the process in its
lines (default: the program's pid only).

Every line carries ``t`` (CLOCK_MONOTONIC, shared by all processes of a
machine), ``pid``, ``name`` and ``ev``, the event, plus its fields.
Events written by the daemons (the checker in xtnd.tools.inject.checker
reads them):

- ``serving`` (host, generation): the SPM holds the lease and starts serving;
  ``stopped`` (host, reason): it stops serving (clean stop or lease lost);
- ``seen`` (host, slot, volume, size_mb): the SPM found a new request;
- ``lvm_start``/``lvm_done`` (cmd, vg, lv, size, host, generation; done
  adds ``ok``): an LVM command writing metadata, run by the SPM;
- ``reply`` (host, slot, volume, size_mb, granted): a reply the SPM puts
  in the outbox (written in the same pass of its I/O thread);
- ``sent``/``taken`` (host, volume, size_mb, granted): the HSM side;
- ``paused``/``resumed`` (vm, reason): the HSM saw a VM pause or resumed it;
- ``fault`` (point, action): an armed fault point fired (xtnd.common.faults).
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

ENV = "XTND_HISTORY"
ENV_NAME = "XTND_HISTORY_NAME"

_fd: int | None = None
_name = ""
_lock = threading.Lock()


def enable(path: str, name: str = "") -> None:
    """Append this process's records to path from now on."""
    global _fd, _name
    with _lock:
        if _fd is not None:
            os.close(_fd)
        _fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        _name = name


def disable() -> None:
    global _fd
    with _lock:
        if _fd is not None:
            os.close(_fd)
        _fd = None


def enabled() -> bool:
    return _fd is not None


def record(ev: str, **fields: Any) -> None:
    """Append one event (no-op unless enabled). Never raises."""
    fd = _fd
    if fd is None:
        return
    line = {"t": round(time.monotonic(), 6), "pid": os.getpid(), "name": _name, "ev": ev, **fields}
    try:
        os.write(fd, (json.dumps(line, default=str, separators=(",", ":")) + "\n").encode())
    except OSError:
        pass  # a full or gone history file must never stop a daemon


def read(path: str) -> list[dict[str, Any]]:
    """Every well-formed line of a history file, in file order."""
    events = []
    with open(path, errors="replace") as f:
        for line in f:
            try:
                event = json.loads(line)
            except ValueError:
                continue  # a line cut by a crash of its writer
            if isinstance(event, dict) and "ev" in event and "t" in event:
                events.append(event)
    return events


if os.environ.get(ENV):
    try:
        enable(os.environ[ENV], os.environ.get(ENV_NAME, ""))
    except OSError:
        pass
