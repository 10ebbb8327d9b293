"""Zeroing a raw volume before it is handed out.

A new LV gets whatever its extents held before: another volume's data, if
that volume was removed. A qcow2 image reads unallocated clusters as zeros,
but a raw volume shows the guest its blocks as they are, so they are
zeroed first, with BLKZEROOUT: the kernel uses the storage's write-zeroes
or write-same command when there is one (and the file system's zero range
under a loop device), and writes zero pages otherwise. It runs in
chunks, with the caller's fence before each, so a long zeroing stops
writing soon after the lease is lost.
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
import time

from .model import Fence, no_fence

log = logging.getLogger("xtnd.storage")

# <linux/fs.h>: _IO(0x12, 127); argument: uint64 start, uint64 length.
BLKZEROOUT = 0x127F
CHUNK = 1024**3


def zero_device(path: str, length: int, fence: Fence = no_fence, chunk: int = CHUNK, start: int = 0) -> None:
    """Zero bytes [start, length) of the block device at path (both
    multiples of 512, as LV sizes are; a grown raw volume zeroes only its
    new part)."""
    began = time.monotonic()
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        offset = start
        while offset < length:
            n = min(chunk, length - offset)
            fence()
            fcntl.ioctl(fd, BLKZEROOUT, struct.pack("=QQ", offset, n))
            offset += n
    finally:
        os.close(fd)
    log.info("zeroed device=%s start=%d length=%d duration=%.3f", path, start, length - start, time.monotonic() - began)
