"""The SPM's view of the inbox: which messages are new since the last scan.

The SPM keeps every host's inbox block as last scanned. A scan reads the
inbox (host blocks 1..max_hosts after the event block) and reports, for
each block that differs from the one kept, the slots that hold a message
whose bytes changed:

- a changed block is checksum-checked before any of its slots is used; a
  bad one is ignored and forgotten, so it is reconsidered once valid (a
  torn write, an HSM's block being rewritten while read);
- only slots whose first byte marks a message are looked at (one strided
  slice of the block's first bytes), so a block costs what its messages
  cost, not 63 slot comparisons;
- the reads: ``chunk`` blocks each. With a Reader (one daemon thread)
  every read is queued at once and done while the caller works through the
  chunks already read: the 8 MiB of a 2000-host inbox take ~8 ms of storage
  time here, then hidden behind the scan. Each host's block lies whole in
  one chunk; the event block comes with the first.

The protocol does not say which host wrote (the event block is one id for
all), so a scan reads every host's block; what changed is found by
comparing each block with the kept one (memcmp), and only changed blocks
cost more.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator

from xtnd.common.ratelimit import RateLimitedLog

try:
    import numpy

    _HAVE_NUMPY = True
except ImportError:  # checksums_valid() sums block by block
    _HAVE_NUMPY = False

from . import codec
from .directio import Storage

log = logging.getLogger("xtnd.mailbox.spm")

BLOCK = codec.BLOCK_SIZE
MESSAGE = codec.MESSAGE_SIZE

# The first byte of every message slot of a block, and a table mapping a
# first byte to 1 when the slot holds a message (codec.is_empty is false).
_FIRST_BYTES = slice(0, codec.MESSAGES_PER_BLOCK * MESSAGE, MESSAGE)
_HOLDS_MESSAGE = bytes(0 if codec.is_empty(bytes([b])) else 1 for b in range(256))

# A new message: (host id, slot index, its 64 bytes).
NewMessage = tuple[int, int, bytes]

# A read's outcome: its bytes, or the error it raised.
_Outcome = tuple[bytes, None] | tuple[None, BaseException]


# Below this many blocks, checksums_valid() checks block by block.
VECTOR_MIN_BLOCKS = 32


def checksums_valid(area: bytes, offsets: list[int]) -> list[bool]:
    """checksum_valid() of the whole blocks at ``offsets`` (multiples of
    4096) of ``area``, a run of whole blocks.

    When the SPM scans a wave from 2000 hosts, block by block costs ~4.5 us
    each; with numpy (Debian's python3-numpy, optional) the sums of every
    block of the area take one pass, ~4x faster. Without numpy, or for a
    few blocks, the result is the same computed block by block.
    """
    usable = _HAVE_NUMPY and len(offsets) >= VECTOR_MIN_BLOCKS and len(area) % BLOCK == 0
    if not usable or any(o % BLOCK for o in offsets):
        return [codec.checksum_valid(area[o : o + BLOCK]) for o in offsets]
    blocks = len(area) // BLOCK
    rows = numpy.frombuffer(area, numpy.uint8).reshape(blocks, BLOCK)
    sums: list[int] = rows[:, :codec.CHECKSUM_OFFSET].sum(axis=1, dtype=numpy.int64).tolist()
    stored: list[int] = numpy.ndarray(
        (blocks,), dtype="<i4", buffer=area, offset=codec.CHECKSUM_OFFSET, strides=(BLOCK,)
    ).tolist()
    return [sums[o // BLOCK] == stored[o // BLOCK] for o in offsets]


class Reader:
    """One daemon thread doing the reads a scan queues, in order.

    Not a concurrent.futures executor: its threads are joined at
    interpreter exit, and a read stuck on dead storage would hang the
    daemon's exit.
    """

    def __init__(self, storage: Storage):
        self._storage = storage
        self._jobs: queue.SimpleQueue[tuple[int, int, queue.SimpleQueue[_Outcome]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="mailbox-spm-read", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            offset, length, out = job
            try:
                out.put((self._storage.read(offset, length), None))
            except BaseException as e:  # noqa: BLE001 - handed to the caller, raised there
                out.put((None, e))

    def read_all(self, reads: list[tuple[int, int]]) -> Iterator[bytes]:
        """Queue every (offset, length) read; yield their bytes in order."""
        out: queue.SimpleQueue[_Outcome] = queue.SimpleQueue()
        for offset, length in reads:
            self._jobs.put((offset, length, out))
        for _ in reads:
            data, error = out.get()
            if error is not None:
                raise error
            assert data is not None
            yield data

    def close(self) -> None:
        self._jobs.put(None)


class InboxView:
    """Host blocks as last scanned, and the scan that compares with them."""

    def __init__(self, inbox: Storage, max_hosts: int, chunk: int, rlog: RateLimitedLog, stats: dict[str, int]):
        self._inbox = inbox
        self.max_hosts = max_hosts
        self._length = (max_hosts + 1) * BLOCK
        self._chunk = chunk
        self._rlog = rlog
        self._stats = stats
        self._blocks = [codec.EMPTY_BLOCK] * (max_hosts + 1)
        self.last_event = b""
        # Set by the SPM while its threads run; None reads in the caller.
        self.reader: Reader | None = None

    def forget(self) -> None:
        """Take every block as all zeros: every pending message is new."""
        self._blocks = [codec.EMPTY_BLOCK] * (self.max_hosts + 1)
        self.last_event = b""

    def holds(self, host: int, index: int, raw: bytes) -> bool:
        """True if the last scan saw ``raw`` in slot ``index`` of ``host``."""
        start = index * MESSAGE
        return self._blocks[host][start : start + MESSAGE] == raw

    def event_changed(self) -> bool:
        """Read the event block; True if it differs from the last one seen."""
        raw = self._inbox.read(0, BLOCK)
        self._stats["event_reads"] += 1
        return raw != self.last_event

    def scan(self) -> Iterator[list[NewMessage]]:
        """Read the inbox; yield the new messages of each chunk as it is done."""
        blocks = self._blocks
        for offset, data in self._read():
            if offset == 0:
                self.last_event = data[:BLOCK]
            first = max(1, offset // BLOCK)
            changed: list[tuple[int, bytes]] = []
            for host in range(first, first + len(data) // BLOCK - (offset == 0)):
                start = host * BLOCK - offset
                # bytes slices: comparing memoryviews goes item by item in
                # CPython (milliseconds per scan); bytes compare with memcmp.
                block = data[start : start + BLOCK]
                if block != blocks[host]:
                    changed.append((host, block))
            found: list[NewMessage] = []
            # Checksums of all changed blocks at once (checksums_valid).
            valid = checksums_valid(data, [host * BLOCK - offset for host, _ in changed])
            for (host, block), ok in zip(changed, valid, strict=True):
                self._changed(host, block, ok, found)
            yield found

    def _read(self) -> Iterator[tuple[int, bytes]]:
        size = self._chunk * BLOCK
        offsets = range(0, self._length, size)
        reader = self.reader
        if reader is None or len(offsets) == 1:
            for offset in offsets:
                yield offset, self._inbox.read(offset, min(size, self._length - offset))
            return
        reads = [(offset, min(size, self._length - offset)) for offset in offsets]
        yield from zip(offsets, reader.read_all(reads), strict=True)

    def _changed(self, host: int, block: bytes, valid: bool, found: list[NewMessage]) -> None:
        if block == codec.EMPTY_BLOCK:
            self._blocks[host] = block
            return
        if not valid:
            self._stats["bad_blocks"] += 1
            self._rlog.log(
                logging.WARNING,
                ("checksum", host),
                "bad checksum, ignoring block host_id=%d stored=%d computed=%d",
                host,
                codec.stored_checksum(block),
                codec.checksum(block),
            )
            self._blocks[host] = codec.EMPTY_BLOCK  # reconsider everything once valid
            return
        old = self._blocks[host]
        self._blocks[host] = block
        marks = block[_FIRST_BYTES].translate(_HOLDS_MESSAGE)
        i = marks.find(1)
        while i != -1:
            start = i * MESSAGE
            raw = block[start : start + MESSAGE]
            if raw != old[start : start + MESSAGE]:
                found.append((host, i, raw))
            i = marks.find(1, i + 1)
