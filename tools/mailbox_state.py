"""Where one mailbox slot stands in the extend handshake.

Pure logic for the inspection tool: no I/O. A slot index of a host is a
conversation between the host's inbox slot (written by the HSM) and the
outbox slot of the same index (written by the SPM). mailbox/PROTOCOL.md §2 walks it
through six steps; looking at both slots at one instant tells which step
the conversation has reached:

    inbox     outbox                 state          waiting for
    empty     empty                  free           nothing
    empty     clean                  done           nothing (echo left behind)
    empty     extend                 orphan-reply   nothing will consume it
    extend    empty/clean/other vol  pending        the SPM to reply
    extend    extend, same volume    replied        the HSM to take the reply
    extend    extend, same, size 0   failed         the HSM to take the failure
    clean     empty/extend           acking         the SPM to echo clean
    clean     clean                  acked          the HSM to zero the slot

Malformed data never raises here; it becomes a state of its own
(invalid-block, invalid-request, unknown-request, invalid-reply), and a
slot whose block lies beyond the end of a short copy is incomplete.
"""

from __future__ import annotations

import dataclasses
import enum
import functools

from xtnd.mailbox import codec


class Kind(enum.StrEnum):
    """What one 64-byte slot holds."""

    EMPTY = "empty"
    CLEAN = "clean"
    EXTEND = "extend"
    UNKNOWN = "unknown"  # well-formed v1 head, opcode we do not speak
    INVALID = "invalid"  # cannot be decoded
    MISSING = "missing"  # the block is beyond the end of the area


class State(enum.StrEnum):
    """Handshake state of one slot index; the values are the JSON names."""

    FREE = "free"
    DONE = "done"
    PENDING = "pending"
    REPLIED = "replied"
    FAILED = "failed"
    ACKING = "acking"
    ACKED = "acked"
    ORPHAN_REPLY = "orphan-reply"
    UNKNOWN_REQUEST = "unknown-request"
    INVALID_REQUEST = "invalid-request"
    INVALID_REPLY = "invalid-reply"
    INVALID_BLOCK = "invalid-block"
    INCOMPLETE = "incomplete"


# States in which nobody is waiting for anything.
IDLE_STATES = frozenset({State.FREE, State.DONE})


@dataclasses.dataclass(frozen=True)
class Slot:
    """One decoded slot; ``message`` is None when invalid or missing."""

    kind: Kind
    raw: bytes
    message: codec.Message | None = None
    reason: str = ""


MISSING_SLOT = Slot(Kind.MISSING, b"", reason="block beyond the end of the area")


# Decoding is ~30us a slot; a full 2000-host mailbox holds 252,000 slots,
# and between two watch scans almost none of them change.
@functools.lru_cache(maxsize=8192)
def read_slot(raw: bytes | None) -> Slot:
    """Decode raw slot bytes (None: the block is missing); never raises."""
    if raw is None:
        return MISSING_SLOT
    try:
        msg = codec.decode(raw)
    except codec.MessageError as e:
        # Compiled construct errors can come without text: no dangling ": ".
        return Slot(Kind.INVALID, bytes(raw), reason=e.reason.rstrip(": "))
    if isinstance(msg, codec.Empty):
        kind = Kind.EMPTY
    elif isinstance(msg, codec.Clean):
        kind = Kind.CLEAN
    elif isinstance(msg, codec.Extend):
        kind = Kind.EXTEND
    else:
        kind = Kind.UNKNOWN
    return Slot(kind, bytes(raw), msg)


def printable(raw: bytes) -> str:
    """Bytes as text for people: ASCII kept, the rest as \\xNN escapes."""
    return "".join(chr(b) if 0x20 <= b < 0x7F and b != 0x5C else f"\\x{b:02x}" for b in raw)


@dataclasses.dataclass(frozen=True)
class Verdict:
    state: State
    detail: str = ""


def pair(inbox: Slot, outbox: Slot, block_valid: bool = True) -> Verdict:
    """The handshake state of a slot index from its inbox and outbox slots.

    ``block_valid`` is the inbox block checksum: the SPM ignores every slot
    of a block whose checksum is bad, so such a block is stuck as a whole.
    """
    if all(s.kind in (Kind.EMPTY, Kind.MISSING) for s in (inbox, outbox)):
        return Verdict(State.FREE)
    if not block_valid:
        return Verdict(State.INVALID_BLOCK, "bad inbox block checksum: the SPM ignores the whole block")
    if inbox.kind is Kind.MISSING or outbox.kind is Kind.MISSING:
        side = "inbox" if inbox.kind is Kind.MISSING else "outbox"
        return Verdict(State.INCOMPLETE, f"{side} block is beyond the end of its area")
    if inbox.kind is Kind.INVALID:
        return Verdict(State.INVALID_REQUEST, inbox.reason)
    if isinstance(inbox.message, codec.Unknown):
        return Verdict(State.UNKNOWN_REQUEST, f"opcode {printable(inbox.message.opcode)!r} in request")
    if outbox.kind is Kind.INVALID:
        return Verdict(State.INVALID_REPLY, outbox.reason)
    if isinstance(outbox.message, codec.Unknown):
        return Verdict(State.INVALID_REPLY, f"opcode {printable(outbox.message.opcode)!r} in reply")
    if inbox.kind is Kind.EMPTY:
        if outbox.kind is Kind.CLEAN:
            return Verdict(State.DONE)
        return Verdict(State.ORPHAN_REPLY, "inbox slot is free but the outbox still holds a reply")
    if inbox.kind is Kind.CLEAN:
        if outbox.kind is Kind.CLEAN:
            return Verdict(State.ACKED, "waiting for the HSM to free the slot")
        if outbox.kind is Kind.EMPTY:
            return Verdict(State.ACKING, "outbox slot empty (SPM restarted?); waiting for the SPM to echo clean")
        return Verdict(State.ACKING, "waiting for the SPM to echo clean")
    return _request(inbox, outbox)


def _request(inbox: Slot, outbox: Slot) -> Verdict:
    request = inbox.message
    reply = outbox.message
    assert isinstance(request, codec.Extend)
    if isinstance(reply, codec.Extend):
        if not reply.same_volume(request):
            return Verdict(State.PENDING, "outbox holds a stale reply for another volume")
        if reply.size_mb == 0:
            return Verdict(State.FAILED, "the SPM refused the extend (size 0)")
        return Verdict(State.REPLIED, f"granted {reply.size_mb} MiB")
    if isinstance(reply, codec.Clean):
        return Verdict(State.PENDING, "outbox holds the clean echo of an earlier request")
    return Verdict(State.PENDING, "waiting for the SPM")
