"""A cheap, wakeable timed wait for I/O loops.

threading.Condition.wait(timeout) costs about twice the CPU of a plain
poll(2) per wake-up on our VMs (~100 us vs ~50 us): it allocates a lock and
re-acquires the condition's lock. A thread that wakes hundreds of times a
second to poll storage (the SPM's mailbox thread) pays that continuously,
so it waits on a pipe with poll() instead; other threads write a byte to
wake it at once.
"""

from __future__ import annotations

import math
import os
import select


class Waker:
    def __init__(self) -> None:
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._poll = select.poll()
        self._poll.register(self._r, select.POLLIN)

    def wake(self) -> None:
        """Make the current or next wait() return at once (any thread)."""
        if self._w == -1:
            return  # closed: nobody waits any more
        try:
            os.write(self._w, b"!")
        except BlockingIOError:
            pass  # the pipe is full: a wake-up is pending anyway

    def wait(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds; True if woken by wake()."""
        if not self._poll.poll(math.ceil(timeout * 1000)):
            return False
        try:
            while os.read(self._r, 4096):
                pass
        except BlockingIOError:
            pass
        return True

    def close(self) -> None:
        if self._w == -1:
            return
        w, self._w = self._w, -1
        os.close(w)
        os.close(self._r)
