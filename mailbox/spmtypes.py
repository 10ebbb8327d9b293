"""What the SPM side of the mailbox shows its users: its configuration, the
requests it hands to handlers, and how a handler declines to answer.

Imported through xtnd.mailbox.spm, which re-exports all of it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

from . import codec


class NoReply(Exception):
    """Raised by a handler to leave a request unanswered: no reply is
    written and the next SPM serves the request (e.g. while stopping)."""


@dataclasses.dataclass
class SPMConfig:
    # How often the event block is read while mail is flowing (seconds).
    event_interval: float = 0.002
    # How often it is read when idle: bounds idle CPU and storage load
    # (1 / idle_event_interval reads per second) and the extra latency of
    # the first request after a quiet period.
    idle_event_interval: float = 0.025
    # Seconds after the last mail during which the SPM polls fast.
    active_window: float = 3.0
    # Full inbox scan even without a new event (seconds).
    scan_interval: float = 2.0
    # Worker threads running request handlers. 0 runs them inline in step()
    # (for tests that drive the SPM step by step without threads).
    workers: int = 8
    # Blocks per inbox read: 512 (2 MiB) reads a 2000-host inbox in 4 reads,
    # overlapped with the scan (see inbox.py); 250 hosts in one.
    scan_chunk: int = 512
    # Delay between retries after a storage error (seconds).
    error_backoff: float = 1.0
    # Minimum seconds between repeated log lines about the same bad input.
    log_interval: float = 60.0


class Request(NamedTuple):
    """A new request found in the inbox (immutable; a NamedTuple because
    a frozen dataclass costs ~1.3 us more to build, 2.6 ms of a 2000-host
    wave)."""

    host_id: int
    slot: int
    message: codec.Extend
    raw: bytes
    received: float


# A handler returns the granted size in MiB; raising means failure (size 0).
Handler = Callable[[Request], int]
