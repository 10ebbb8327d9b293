"""What one SPM wave cost, and where its time went.

A wave runs from the read that first saw new mail while nothing was in
flight to the write that left nothing in flight. Its service time alone
does not say whether the SPM was slow or the mail came in late (a client's
writes spread over several scans) or the SPM waited for a CPU (a small,
shared machine). A Wave says that too:

- ``scans``, ``read_bytes``, ``outbox_writes``: the I/O it took;
- ``intake_seconds``: from the start to the end of the last scan that found
  a request: the part that is the clients' spread, not the SPM's work;
- ``io_cpu_seconds`` and ``io_wait_cpu_seconds``: CPU the I/O thread used,
  and the time it was ready to run but waited for a CPU (the kernel's
  schedstat run delay), so a wave slowed by other processes shows it;
- ``cpu_seconds``: CPU of the whole SPM process (I/O thread, reader,
  handlers) during the wave; ``handler_seconds``: time in handlers, summed
  over the workers.

Sampling costs ~20 us, taken only when a wave begins and ends.
"""

from __future__ import annotations

import time
from typing import NamedTuple


class Wave(NamedTuple):
    seconds: float
    requests: int
    messages: int
    scans: int = 0
    read_bytes: int = 0
    outbox_writes: int = 0
    intake_seconds: float = 0.0
    handler_seconds: float = 0.0
    io_cpu_seconds: float = 0.0
    io_wait_cpu_seconds: float = 0.0
    cpu_seconds: float = 0.0
    # time.monotonic() at the start and the end (one clock for every
    # process of a machine: the bench lines waves up with its clients).
    start: float = 0.0
    end: float = 0.0


class ThreadTimes(NamedTuple):
    """The calling thread's CPU time and run delay, and the process's CPU."""

    cpu: float
    run_delay: float
    process_cpu: float


def thread_times() -> ThreadTimes:
    """Sample the calling thread (Linux schedstat; zeros where missing)."""
    try:
        with open("/proc/thread-self/schedstat", "rb") as f:
            fields = f.read().split()
        cpu, delay = int(fields[0]) / 1e9, int(fields[1]) / 1e9
    except (OSError, ValueError, IndexError):
        cpu, delay = time.thread_time(), 0.0
    return ThreadTimes(cpu, delay, time.process_time())
