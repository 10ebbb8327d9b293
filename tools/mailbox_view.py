"""Read mailbox areas and turn them into a report of hosts and slots.

The inspection tool reads live inbox/outbox devices with O_DIRECT, read
only (the page cache of this host must not hide another host's write), and
also plain copies of a host's files. A copy may be shorter than max_hosts
blocks or end in a partial block: hosts past its end are reported as
missing, never an error. A copy put on tmpfs cannot be opened with
O_DIRECT; it is read through the page cache instead, which is harmless for
a file no one is writing.

Everything after reading is pure: ``build_report`` takes bytes. The JSON
form of the report is documented in xtnd.tools.inspect.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import stat
import uuid
from collections.abc import Iterable
from typing import Any

from xtnd.mailbox import codec, directio

from .mailbox_state import IDLE_STATES, Kind, Slot, State, Verdict, pair, printable, read_slot

log = logging.getLogger("xtnd.tools.inspect")

SCHEMA_VERSION = 1
MAX_HOSTS_CAP = 2000
# First bytes of an undecodable event block shown in reports.
EVENT_HEAD = 32


@dataclasses.dataclass(frozen=True)
class Area:
    """The first whole blocks of an inbox or outbox, as read."""

    path: str
    size: int
    data: bytes

    @property
    def blocks(self) -> int:
        return len(self.data) // codec.BLOCK_SIZE

    def block(self, index: int) -> bytes | None:
        if not 0 <= index < self.blocks:
            return None
        start = index * codec.BLOCK_SIZE
        return self.data[start : start + codec.BLOCK_SIZE]

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "blocks": self.size // codec.BLOCK_SIZE}


class AreaReader:
    """An open inbox or outbox, read again at every scan (watch keeps it)."""

    def __init__(self, path: str):
        self.path = path
        self._direct: directio.DirectFile | None = None
        try:
            self._direct = directio.DirectFile(path, readonly=True)
        except directio.StorageError as e:
            if e.errno != errno.EINVAL or not stat.S_ISREG(os.stat(path).st_mode):
                raise
            log.info("reading through the page cache, no O_DIRECT here: path=%s", path)

    @property
    def size(self) -> int:
        if self._direct is not None:
            return self._direct.size
        return os.stat(self.path).st_size

    def read(self, blocks: int) -> Area:
        """Read up to ``blocks`` whole blocks from the start, in one I/O."""
        size = self.size
        length = min(blocks, size // codec.BLOCK_SIZE) * codec.BLOCK_SIZE
        if length == 0:
            return Area(self.path, size, b"")
        if self._direct is not None:
            return Area(self.path, size, self._direct.read(0, length))
        with open(self.path, "rb") as f:
            return Area(self.path, size, f.read(length))

    def close(self) -> None:
        if self._direct is not None:
            self._direct.close()

    def __enter__(self) -> AreaReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def default_max_hosts(inbox_size: int, outbox_size: int) -> int:
    """Host ids the smaller area has room for (block 0 is not a host)."""
    return max(0, min(min(inbox_size, outbox_size) // codec.BLOCK_SIZE - 1, MAX_HOSTS_CAP))


@dataclasses.dataclass(frozen=True)
class MessageView:
    """One slot for reports: the decoded fields or why it cannot be decoded."""

    slot: Slot

    def describe(self) -> str:
        msg = self.slot.message
        if isinstance(msg, codec.Extend):
            return f"extend {msg.size_mb} MiB"
        if isinstance(msg, codec.Unknown):
            return f"unknown opcode {printable(msg.opcode)!r}"
        return self.slot.kind.value

    def to_json(self) -> dict[str, Any]:
        msg = self.slot.message
        extend = msg if isinstance(msg, codec.Extend) else None
        return {
            "kind": self.slot.kind.value,
            "domain": str(extend.domain) if extend else None,
            "volume": str(extend.volume) if extend else None,
            "size_mb": extend.size_mb if extend else None,
            "opcode": printable(msg.opcode) if isinstance(msg, codec.Unknown) else None,
            "reason": self.slot.reason or None,
            "raw": self.slot.raw.hex() if self.slot.kind is not Kind.MISSING else None,
        }


@dataclasses.dataclass(frozen=True)
class SlotReport:
    index: int
    inbox: MessageView
    outbox: MessageView
    verdict: Verdict

    @property
    def extend(self) -> codec.Extend | None:
        """The request, or else the reply, this slot is about."""
        for view in (self.inbox, self.outbox):
            if isinstance(view.slot.message, codec.Extend):
                return view.slot.message
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "slot": self.index,
            "state": self.verdict.state.value,
            "detail": self.verdict.detail,
            "inbox": self.inbox.to_json(),
            "outbox": self.outbox.to_json(),
        }


@dataclasses.dataclass(frozen=True)
class Checksum:
    stored: int
    computed: int

    @property
    def valid(self) -> bool:
        return self.stored == self.computed


@dataclasses.dataclass(frozen=True)
class HostReport:
    host: int
    inbox_present: bool
    outbox_present: bool
    checksum: Checksum | None
    slots: tuple[SlotReport, ...]
    inbox_reserved: bytes | None
    outbox_reserved: bytes | None

    @property
    def idle(self) -> bool:
        valid = self.checksum is None or self.checksum.valid
        return valid and all(s.verdict.state in IDLE_STATES for s in self.slots)

    def counts(self) -> dict[str, int]:
        return _count(s.verdict.state for s in self.slots)

    def to_json(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "idle": self.idle,
            "inbox_present": self.inbox_present,
            "outbox_present": self.outbox_present,
            "checksum": (
                None
                if self.checksum is None
                else {"stored": self.checksum.stored, "computed": self.checksum.computed, "valid": self.checksum.valid}
            ),
            "inbox_reserved": self.inbox_reserved.hex() if self.inbox_reserved else None,
            "outbox_reserved": self.outbox_reserved.hex() if self.outbox_reserved else None,
            "states": self.counts(),
            "slots": [s.to_json() for s in self.slots],
        }


def _count(states: Iterable[State]) -> dict[str, int]:
    counts = {s.value: 0 for s in State}
    for s in states:
        counts[s.value] += 1
    return counts


@dataclasses.dataclass(frozen=True)
class EventReport:
    """Inbox block 0: ``state`` is ok, never-written, invalid or missing."""

    state: str
    uuid: uuid.UUID | None = None
    reason: str = ""
    head: bytes = b""

    def describe(self) -> str:
        if self.state == "ok":
            return str(self.uuid)
        if self.state == "invalid":
            return f"invalid: {self.reason} (first bytes {self.head.hex()})"
        if self.state == "missing":
            return "missing (the inbox has no block 0)"
        return "never written"

    def to_json(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "uuid": str(self.uuid) if self.uuid else None,
            "reason": self.reason or None,
            "raw_head": self.head.hex() if self.head else None,
        }


def read_event(block: bytes | None) -> EventReport:
    if block is None:
        return EventReport("missing")
    try:
        event_id = codec.decode_event(block)
    except codec.BlockError as e:
        return EventReport("invalid", reason=e.reason, head=block[:EVENT_HEAD])
    if event_id is None:
        return EventReport("never-written")
    return EventReport("ok", event_id)


@dataclasses.dataclass(frozen=True)
class Report:
    inbox: Area
    outbox: Area
    max_hosts: int
    scanned: int
    event: EventReport
    hosts: tuple[HostReport, ...]

    def counts(self) -> dict[str, int]:
        return _count(s.verdict.state for h in self.hosts for s in h.slots)

    @property
    def busy(self) -> tuple[HostReport, ...]:
        return tuple(h for h in self.hosts if not h.idle)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "inbox": self.inbox.to_json(),
            "outbox": self.outbox.to_json(),
            "max_hosts": self.max_hosts,
            "event": self.event.to_json(),
            "summary": {
                "hosts_scanned": self.scanned,
                "hosts_shown": len(self.hosts),
                "hosts_busy": len(self.busy),
                "invalid_blocks": sum(1 for h in self.hosts if h.checksum and not h.checksum.valid),
                "states": self.counts(),
            },
            "hosts": [h.to_json() for h in self.hosts],
        }


def host_report(host: int, inbox_block: bytes | None, outbox_block: bytes | None) -> HostReport:
    """Pair the slots of one host's blocks; a None block is missing."""
    checksum = None
    if inbox_block is not None:
        checksum = Checksum(codec.stored_checksum(inbox_block), codec.checksum(inbox_block))
    valid = checksum is None or checksum.valid
    slots = []
    for i in range(codec.MESSAGES_PER_BLOCK):
        raw_in = _slot(inbox_block, i)
        raw_out = _slot(outbox_block, i)
        if raw_in in (None, codec.EMPTY_MESSAGE) and raw_out in (None, codec.EMPTY_MESSAGE):
            continue
        inbox, outbox = read_slot(raw_in), read_slot(raw_out)
        slots.append(SlotReport(i, MessageView(inbox), MessageView(outbox), pair(inbox, outbox, valid)))
    return HostReport(
        host=host,
        inbox_present=inbox_block is not None,
        outbox_present=outbox_block is not None,
        checksum=checksum,
        slots=tuple(slots),
        inbox_reserved=_reserved(inbox_block, codec.MESSAGE_SIZE - 4),
        outbox_reserved=_reserved(outbox_block, codec.MESSAGE_SIZE),
    )


def _slot(block: bytes | None, index: int) -> bytes | None:
    return None if block is None else codec.slot(block, index)


def _reserved(block: bytes | None, length: int) -> bytes | None:
    """Non-zero bytes of the reserved slot 63 (checksum excluded), if any."""
    if block is None:
        return None
    start = codec.MESSAGES_PER_BLOCK * codec.MESSAGE_SIZE
    reserved = block[start : start + length]
    return reserved if any(reserved) else None


# host id -> (inbox block, outbox block, report), from the previous scan.
Known = dict[int, tuple[bytes | None, bytes | None, HostReport]]


def build_report(
    inbox: Area, outbox: Area, max_hosts: int, hosts: list[int] | None = None, known: Known | None = None
) -> Report:
    """Report ``hosts`` (all of them), or every non-zero host of 1..max_hosts.

    With ``known``, hosts whose blocks did not change since the previous
    call reuse its report, and ``known`` is updated.
    """
    selected = hosts if hosts else range(1, max_hosts + 1)
    reports = []
    for host in selected:
        ib, ob = inbox.block(host), outbox.block(host)
        if not hosts and ib in (None, codec.EMPTY_BLOCK) and ob in (None, codec.EMPTY_BLOCK):
            if known is not None:
                known.pop(host, None)
            continue
        previous = known.get(host) if known is not None else None
        if previous is not None and previous[0] == ib and previous[1] == ob:
            report = previous[2]
        else:
            report = host_report(host, ib, ob)
            if known is not None:
                known[host] = (ib, ob, report)
        reports.append(report)
    return Report(inbox, outbox, max_hosts, len(selected), read_event(inbox.block(0)), tuple(reports))


class Scanner:
    """Reads both areas (one I/O each) at every scan and builds the report.

    Between two scans of a live mailbox almost every block is unchanged;
    their host reports are reused, so a watch of a full 2000-host mailbox
    stays cheap after its first scan.
    """

    def __init__(self, inbox: AreaReader, outbox: AreaReader, max_hosts: int | None, hosts: list[int] | None):
        self.inbox = inbox
        self.outbox = outbox
        self.max_hosts = max_hosts
        self.hosts = hosts
        self._known: Known = {}

    def scan(self) -> Report:
        max_hosts = self.max_hosts
        if max_hosts is None:
            max_hosts = default_max_hosts(self.inbox.size, self.outbox.size)
        blocks = max([max_hosts, *(self.hosts or [])]) + 1
        inbox, outbox = self.inbox.read(blocks), self.outbox.read(blocks)
        return build_report(inbox, outbox, max_hosts, self.hosts, self._known)
