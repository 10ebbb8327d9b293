"""A ring buffer of recent LVM commands, dumped in the log on failure.

When lvextend fails on the SPM the interesting question is usually what ran
just before it (another extend, a vgextend, a slow scan). Keeping the last
few commands with their timing costs nothing and answers that.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time


@dataclasses.dataclass(frozen=True)
class CommandRecord:
    argv: tuple[str, ...]
    rc: int
    duration: float
    err_tail: str
    started: float  # wall clock, for correlating with other logs

    def format(self) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(self.started))
        return f"{stamp} rc={self.rc} duration={self.duration:.3f}s argv={list(self.argv)} err={self.err_tail!r}"


class CommandHistory:
    """Thread-safe bounded record of the last ``size`` commands."""

    def __init__(self, size: int = 32, tail: int = 400):
        self._records: collections.deque[CommandRecord] = collections.deque(maxlen=size)
        self._tail = tail
        self._lock = threading.Lock()
        self._counts: collections.Counter[str] = collections.Counter()

    def add(self, argv: list[str], rc: int, duration: float, err: str, started: float) -> CommandRecord:
        tail = err.strip()[-self._tail :]
        record = CommandRecord(tuple(argv), rc, duration, tail, started)
        with self._lock:
            self._records.append(record)
            self._counts[argv[1] if len(argv) > 1 else ""] += 1
        return record

    def counts(self) -> dict[str, int]:
        """Commands recorded since the start, by LVM subcommand (for benchmarks)."""
        with self._lock:
            return dict(self._counts)

    def records(self) -> list[CommandRecord]:
        with self._lock:
            return list(self._records)

    def dump(self) -> str:
        return "\n".join(r.format() for r in self.records())
