"""The SPM's image of the outbox, written in as few I/Os as possible.

The SPM is the only writer of the outbox, so it keeps the whole area in
memory and knows which host blocks changed since they were last written.
flush() writes them in runs: blocks of adjacent hosts go out in one write,
and so do runs separated by a gap of at most ``max_gap`` unchanged blocks
(rewriting an unchanged block puts the same bytes on storage: it is
harmless and cheaper than another I/O). Every write starts and ends on a
4096-byte block boundary and carries whole host blocks, byte for byte what
one write per host would have written, so a wave of replies to 2000 hosts
costs one write instead of 2000.
"""

from __future__ import annotations

from . import codec
from .directio import Storage

BLOCK = codec.BLOCK_SIZE

# Unchanged blocks a run may span to join the next changed one: 8 blocks
# (32 KiB) cost less to rewrite than a separate I/O on any storage we know.
MAX_GAP = 8


def runs(hosts: list[int], max_gap: int = MAX_GAP) -> list[tuple[int, int]]:
    """Group sorted host ids into (first, last) runs, joining small gaps."""
    out: list[tuple[int, int]] = []
    for host in hosts:
        if out and host - out[-1][1] <= max_gap + 1:
            out[-1] = (out[-1][0], host)
        else:
            out.append((host, host))
    return out


class OutboxImage:
    """The outbox as the SPM last meant it to be: host 0 .. max_hosts."""

    def __init__(self, max_hosts: int, max_gap: int = MAX_GAP):
        self.max_hosts = max_hosts
        self.max_gap = max_gap
        self.data = bytearray((max_hosts + 1) * BLOCK)
        self._view = memoryview(self.data)
        self.dirty: set[int] = set()

    def clear(self) -> None:
        self._view[:] = bytes(len(self.data))
        self.dirty.clear()

    def put(self, host: int, index: int, raw: bytes) -> None:
        """Store a message in slot ``index`` of ``host``'s block."""
        if not 0 <= index < codec.MESSAGES_PER_BLOCK:
            raise IndexError(f"message slot index out of range: {index}")
        if len(raw) != codec.MESSAGE_SIZE:
            raise ValueError(f"slot must be {codec.MESSAGE_SIZE} bytes, got {len(raw)}")
        start = host * BLOCK + index * codec.MESSAGE_SIZE
        self.data[start : start + codec.MESSAGE_SIZE] = raw
        self.dirty.add(host)

    def block(self, host: int) -> bytes:
        return bytes(self._view[host * BLOCK : (host + 1) * BLOCK])

    def flush(self, storage: Storage) -> int:
        """Write every changed block; returns the number of writes.

        A run leaves the dirty set only once written: after a storage error
        the rest is written by the next flush.
        """
        writes = 0
        for first, last in runs(sorted(self.dirty), self.max_gap):
            storage.write(first * BLOCK, self._view[first * BLOCK : (last + 1) * BLOCK])
            self.dirty.difference_update(range(first, last + 1))
            writes += 1
        return writes
