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
comparing each chunk with the kept area in one numpy pass, and only
changed blocks cost Python work (InboxView).
"""

from __future__ import annotations

import logging
import mmap
import queue
import threading
from collections.abc import Callable, Iterator

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
_HOLDS_TABLE = numpy.frombuffer(_HOLDS_MESSAGE, numpy.uint8).astype(bool) if _HAVE_NUMPY else None

# A new message: (host id, slot index, its 64 bytes).
NewMessage = tuple[int, int, bytes]

# What a read gives: bytes, or a kept buffer (Reader).
Data = bytes | mmap.mmap

# A read's outcome: its bytes, or the error it raised.
_Outcome = tuple[Data, None] | tuple[None, BaseException]


# Below this many blocks, checksums_valid() checks block by block.
VECTOR_MIN_BLOCKS = 32


def checksums_valid(area: Data, offsets: list[int]) -> list[bool]:
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
    # 4092 bytes sum to at most 1,043,460: uint32 holds it, and summing
    # into it is ~2x faster than into int64.
    sums: list[int] = rows[:, :codec.CHECKSUM_OFFSET].sum(axis=1, dtype=numpy.uint32).tolist()
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
        # Storage that reads into a buffer (DirectFile, MemoryStorage) gets
        # one kept mmap per read of a scan: no allocation, no copy.
        self._readinto: Callable[[int, mmap.mmap], None] | None = getattr(storage, "readinto", None)
        self._buffers: list[mmap.mmap] = []
        self._jobs: queue.SimpleQueue[tuple[int, int, int, queue.SimpleQueue[_Outcome]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="mailbox-spm-read", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            offset, length, n, out = job
            try:
                out.put((self._read(offset, length, n), None))
            except BaseException as e:  # noqa: BLE001 - handed to the caller, raised there
                out.put((None, e))

    def _read(self, offset: int, length: int, n: int) -> Data:
        if self._readinto is None:
            return self._storage.read(offset, length)
        buf = self._buffers[n]
        self._readinto(offset, buf)
        return buf

    def read_all(self, reads: list[tuple[int, int]]) -> Iterator[Data]:
        """Queue every (offset, length) read; yield their bytes in order.

        What is yielded is valid until the next read_all(): the buffers are
        reused.
        """
        out: queue.SimpleQueue[_Outcome] = queue.SimpleQueue()
        for n, (_, length) in enumerate(reads):
            if n == len(self._buffers):
                self._buffers.append(mmap.mmap(-1, length))
            elif len(self._buffers[n]) != length:
                # Not closed: a read of an abandoned scan may still use it.
                self._buffers[n] = mmap.mmap(-1, length)
        for n, (offset, length) in enumerate(reads):
            self._jobs.put((offset, length, n, out))
        for _ in reads:
            data, error = out.get()
            if error is not None:
                raise error
            assert data is not None
            yield data

    def close(self) -> None:
        self._jobs.put(None)


class InboxView:
    """The inbox as last scanned, and the scan that compares with it.

    The area is kept as one bytearray, every block as the last scan saw it
    (a block with a bad checksum kept as zeros). A chunk read is compared
    with it whole, 8 bytes at a time with numpy: only changed blocks cost
    Python work, and nothing is allocated per host, so an idle scan of a
    2000-host inbox costs ~1 ms and a wave's cost follows the blocks that
    changed. Without numpy, blocks are compared one by one (memcmp).
    """

    def __init__(self, inbox: Storage, max_hosts: int, chunk: int, rlog: RateLimitedLog, stats: dict[str, int]):
        self._inbox = inbox
        self.max_hosts = max_hosts
        self._length = (max_hosts + 1) * BLOCK
        self._chunk = chunk
        self._rlog = rlog
        self._stats = stats
        self._area = bytearray(self._length)
        self._words = numpy.frombuffer(self._area, numpy.uint64) if _HAVE_NUMPY else None
        self._differs: numpy.ndarray | None = None  # type: ignore[type-arg]
        self.last_event = b""
        # Set by the SPM while its threads run; None reads in the caller.
        self.reader: Reader | None = None

    def forget(self) -> None:
        """Take every block as all zeros: every pending message is new."""
        self._area[:] = bytes(self._length)
        self.last_event = b""

    def holds(self, host: int, index: int, raw: bytes) -> bool:
        """True if the last scan saw ``raw`` in slot ``index`` of ``host``."""
        start = host * BLOCK + index * MESSAGE
        return self._area[start : start + MESSAGE] == raw

    def event_changed(self) -> bool:
        """Read the event block; True if it differs from the last one seen."""
        raw = self._inbox.read(0, BLOCK)
        self._stats["event_reads"] += 1
        return raw != self.last_event

    def scan(self) -> Iterator[list[NewMessage]]:
        """Read the inbox; yield the new messages of each chunk as it is done."""
        for offset, data in self._read():
            if offset == 0:
                self.last_event = data[:BLOCK]
            found: list[NewMessage] = []
            changed = [h for h in self._changed_hosts(offset, data) if h > 0]
            if changed:
                # Checksums of all changed blocks at once (checksums_valid).
                valid = checksums_valid(data, [host * BLOCK - offset for host in changed])
                if self._words is not None and len(changed) >= VECTOR_MIN_BLOCKS:
                    self._blocks_changed(offset, data, changed, valid, found)
                else:
                    for host, ok in zip(changed, valid, strict=True):
                        start = host * BLOCK - offset
                        self._block_changed(host, data[start : start + BLOCK], ok, found)
            yield found

    def _scratch(self, blocks: int, words: int) -> numpy.ndarray:  # type: ignore[type-arg]
        """A kept (blocks, words) bool array for comparisons."""
        if self._differs is None or self._differs.shape[0] < blocks:
            self._differs = numpy.empty((blocks, words), bool)
        return self._differs[:blocks]

    def _changed_hosts(self, offset: int, data: Data) -> list[int]:
        """Block numbers in ``data`` (read at ``offset``) that differ from the kept ones."""
        first = offset // BLOCK
        if self._words is not None:
            words = BLOCK // 8
            new = numpy.frombuffer(data, numpy.uint64).reshape(-1, words)
            old = self._words[offset // 8 : (offset + len(data)) // 8].reshape(-1, words)
            # Into a kept buffer: a fresh 256 KiB one per chunk is mmapped
            # and page-faulted by malloc each time (~0.5 ms here).
            differs = self._scratch(len(data) // BLOCK, words)
            numpy.not_equal(new, old, out=differs)
            # 8 bools are one uint64: a block differs if one is non-zero.
            rows: list[int] = numpy.flatnonzero(differs.view(numpy.uint64).any(axis=1)).tolist()
            return [first + r for r in rows]
        area = self._area
        out = []
        for n in range(len(data) // BLOCK):
            start = n * BLOCK
            # bytes slices: comparing memoryviews goes item by item in
            # CPython (milliseconds per scan); bytes compare with memcmp.
            if data[start : start + BLOCK] != area[offset + start : offset + start + BLOCK]:
                out.append(first + n)
        return out

    def _read(self) -> Iterator[tuple[int, Data]]:
        size = self._chunk * BLOCK
        offsets = range(0, self._length, size)
        reader = self.reader
        if reader is None or len(offsets) == 1:
            for offset in offsets:
                yield offset, self._inbox.read(offset, min(size, self._length - offset))
            return
        reads = [(offset, min(size, self._length - offset)) for offset in offsets]
        yield from zip(offsets, reader.read_all(reads), strict=True)

    def _blocks_changed(self, offset: int, data: Data, hosts: list[int], valid: list[bool],
                        found: list[NewMessage]) -> None:
        """_block_changed() of many blocks of a chunk in a few numpy passes:
        the slots that differ from the kept ones and hold a message, for
        every valid block at once; Python work only per new message."""
        assert self._words is not None and _HOLDS_TABLE is not None
        first = offset // BLOCK
        for host in (h for h, ok in zip(hosts, valid, strict=True) if not ok):
            start = host * BLOCK - offset
            self._block_changed(host, data[start : start + BLOCK], False, found)  # counted and logged
        # Over the whole chunk (no fancy-indexed copies): unchanged blocks
        # have no differing slot, invalid ones are masked out.
        blocks = len(data) // BLOCK
        words = BLOCK // 8
        new = numpy.frombuffer(data, numpy.uint64).reshape(blocks, words)
        kept = self._words[first * words : (first + blocks) * words].reshape(blocks, words)
        # _changed_hosts() just compared this chunk into the scratch array.
        differs = self._scratch(blocks, words)
        slots = codec.MESSAGES_PER_BLOCK
        # The 8 word results of a slot are one uint64: non-zero if it differs.
        new_slot = differs.view(numpy.uint64)[:, :slots] != 0
        heads = numpy.frombuffer(data, numpy.uint8).reshape(blocks, codec.SLOTS_PER_BLOCK, MESSAGE)[:, :slots, 0]
        new_slot &= _HOLDS_TABLE[heads]
        bad = [h - first for h, ok in zip(hosts, valid, strict=True) if not ok]
        if offset == 0:
            bad.append(0)  # the event block is not a host's
        new_slot[bad] = False
        block_rows, slot_ids = numpy.nonzero(new_slot)
        for r, i in zip(block_rows.tolist(), slot_ids.tolist(), strict=True):
            start = r * BLOCK + i * MESSAGE
            found.append((first + r, i, data[start : start + MESSAGE]))
        # Keep the chunk as read, blocks with a bad checksum as zeros (the
        # event block too: it is not compared).
        kept[:] = new
        kept[bad] = 0

    def _block_changed(self, host: int, block: bytes, valid: bool, found: list[NewMessage]) -> None:
        """Keep ``host``'s new block; add its new messages to ``found``."""
        at = host * BLOCK
        if block == codec.EMPTY_BLOCK:
            self._area[at : at + BLOCK] = block
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
            self._area[at : at + BLOCK] = codec.EMPTY_BLOCK  # reconsider everything once valid
            return
        old = self._area[at : at + BLOCK]
        self._area[at : at + BLOCK] = block
        marks = block[_FIRST_BYTES].translate(_HOLDS_MESSAGE)
        i = marks.find(1)
        while i != -1:
            start = i * MESSAGE
            raw = block[start : start + MESSAGE]
            if raw != old[start : start + MESSAGE]:
                found.append((host, i, raw))
            i = marks.find(1, i + 1)
