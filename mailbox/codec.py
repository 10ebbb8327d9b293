"""Wire format of the storage mailbox (v1, byte-compatible with vdsm).

This module is the only place that knows where fields sit inside mailbox
bytes; everything else works with the decoded objects below.

Areas
    The inbox (written by HSMs, read by the SPM) and the outbox (written by
    the SPM, read by HSMs) are arrays of 4096-byte blocks, one per host id.
    Block 0 of the inbox is the event block; host ids start at 1.

Block (4096 bytes) = 64 slots of 64 bytes
    slots 0..62   messages; a slot whose first byte is 0x00 is empty (vdsm
                  also skips a first byte of ASCII "0", so do we)
    slot 63       reserved; in inbox blocks bytes 4092..4095 hold the
                  checksum: sum of bytes 0..4091, little-endian signed int32.
                  Outbox blocks carry no checksum.

Extend message (64 bytes)
    0   1   version      b"1"
    1   4   opcode       b"xtnd"
    5   16  domain UUID  int(uuid) as 16 little-endian bytes
    21  16  volume UUID  same encoding
    37  16  size         lowercase hex, zero padded, MiB
    53  11  padding      b"0" * 11

    A reply is the request with the size set to the granted size, 0 meaning
    failure. The clean message is 64 bytes of 0x01.

Event block (inbox block 0)
    b"\\0evt" + 16 bytes of a random UUID (RFC byte order) + zeros. A changed
    UUID tells the SPM to scan now.

Resize notice block (outbox block 0, no host's: host ids start at 1)
    0   4   magic        b"\\0rsz"
    4   16  notice id    a random UUID (RFC byte order), new for every notice
    20  16  domain UUID  as in an extend message
    36  16  volume UUID  same encoding
    52  8   capacity     bytes, unsigned little-endian
    60  ..  zeros
    Written by the lease holder after it recorded a larger capacity; xtnd
    HSMs poll it while they run VMs (a changed id: check your disks). vdsm
    never reads or writes outbox block 0.

    An event block is this layout with only magic and id set: one struct
    (_record_format) encodes and decodes both block-0 records.

Decoding raises only MessageError / BlockError, both carrying the raw bytes.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import struct
import uuid
import zlib

import construct as c

BLOCK_SIZE = 4096
MESSAGE_SIZE = 64
SLOTS_PER_BLOCK = BLOCK_SIZE // MESSAGE_SIZE
MESSAGES_PER_BLOCK = SLOTS_PER_BLOCK - 1
CHECKSUM_OFFSET = BLOCK_SIZE - 4

VERSION = b"1"
EXTEND_OPCODE = b"xtnd"
SIZE_CHARS = 16
MAX_SIZE_MB = 16**SIZE_CHARS - 1

EMPTY_MESSAGE = bytes(MESSAGE_SIZE)
CLEAN_MESSAGE = b"\x01" * MESSAGE_SIZE
EMPTY_BLOCK = bytes(BLOCK_SIZE)
EVENT_MAGIC = b"\0evt"

# First bytes vdsm treats as "no message in this slot".
_EMPTY_MARKERS = (0x00, 0x30)

MiB = 1024**2


class CodecError(ValueError):
    """Malformed mailbox bytes; ``raw`` holds what was read."""

    def __init__(self, reason: str, raw: bytes):
        self.reason = reason
        self.raw = bytes(raw)
        super().__init__(f"{reason} (raw={self.raw.hex()})")


class MessageError(CodecError):
    """A 64-byte slot that cannot be decoded."""


class BlockError(CodecError):
    """A 4096-byte block that cannot be decoded (size, checksum, magic)."""


# The common head of every v1 message: version, opcode, and for xtnd the
# volume address. vdsm compares these 37 bytes to match a reply to a request.
MESSAGE_HEAD_SIZE = 1 + 4 + 16 + 16

# Compiled formats parse ~7x faster than interpreted ones; field values are
# converted in Python below (compiled structs cannot hold custom adapters).
_extend_format = c.Struct(
    "version" / c.Const(VERSION),
    "opcode" / c.Const(EXTEND_OPCODE),
    "domain" / c.Bytes(16),
    "volume" / c.Bytes(16),
    "size" / c.Bytes(SIZE_CHARS),
    "padding" / c.Const(b"0" * 11),
).compile()

_host_block_format = c.Struct(
    "slots" / c.Array(MESSAGES_PER_BLOCK, c.Bytes(MESSAGE_SIZE)),
    "reserved" / c.Bytes(MESSAGE_SIZE - 4),
    "checksum" / c.Int32sl,
).compile()
_HEX_SIZE = re.compile(rb"[0-9a-fA-F]{16}")


def _field_offsets(fmt: c.Construct) -> dict[str, slice]:
    """Byte ranges of a fixed-size struct's fields, from its declaration."""
    offsets = {}
    pos = 0
    for sub in fmt.defersubcon.subcons if hasattr(fmt, "defersubcon") else fmt.subcons:
        size = sub.sizeof()
        offsets[sub.name] = slice(pos, pos + size)
        pos += size
    return offsets


# The declaration above is the layout; encode() builds with it and
# parse_extend() is the reference decoder. The SPM's decode() reads the
# fields at the byte ranges the declaration defines instead, because
# construct's parse costs several times more per message and a scan may
# decode thousands (README, "The mailbox", has the measured figures; tests
# check both decoders agree).
_EXTEND_FIELDS = _field_offsets(_extend_format)
_DOMAIN = _EXTEND_FIELDS["domain"]
_VOLUME = _EXTEND_FIELDS["volume"]
_SIZE = _EXTEND_FIELDS["size"]
_PADDING = _EXTEND_FIELDS["padding"]
_PADDING_BYTES: bytes = b"0" * (_PADDING.stop - _PADDING.start)


def _uuid_to_wire(value: uuid.UUID) -> bytes:
    return value.int.to_bytes(16, "little")


def _uuid_from_wire(raw: bytes) -> uuid.UUID:
    return uuid.UUID(int=int.from_bytes(raw, "little"))


# A pool has a handful of domains: their UUIDs are built once.
_domain_from_wire = functools.lru_cache(maxsize=256)(_uuid_from_wire)

RESIZE_MAGIC = b"\0rsz"

# Block 0 of either area holds one record, not messages: the event block
# (inbox) and the resize notice (outbox) share this layout. An event fills
# only magic and id; the rest of its block is zeros.
_RECORD_HEAD_SIZE = 4 + 16 + 16 + 16 + 8
_record_format = c.Struct(
    "magic" / c.Bytes(4),
    "id" / c.Bytes(16),
    "domain" / c.Bytes(16),
    "volume" / c.Bytes(16),
    "capacity" / c.Int64ul,
    c.Padding(BLOCK_SIZE - _RECORD_HEAD_SIZE),  # zeros when built, not checked when parsed
).compile()
_NO_VOLUME = bytes(16)


@dataclasses.dataclass(frozen=True)
class ResizeNotice:
    """The last resize announced in outbox block 0."""

    id: uuid.UUID
    domain: uuid.UUID
    volume: uuid.UUID
    capacity: int


@dataclasses.dataclass(frozen=True)
class Empty:
    """A free slot."""


@dataclasses.dataclass(frozen=True)
class Clean:
    """The clean message: request withdrawn (inbox) or acknowledged (outbox)."""


@dataclasses.dataclass(frozen=True)
class Extend:
    """An extend request, or its reply when found in the outbox."""

    domain: uuid.UUID
    volume: uuid.UUID
    size_mb: int

    @classmethod
    def for_bytes(cls, domain: uuid.UUID, volume: uuid.UUID, size: int) -> Extend:
        """A request for ``size`` bytes, rounded up to a MiB as vdsm does."""
        if size < 0:
            raise ValueError(f"negative size: {size}")
        return cls(domain, volume, -(-size // MiB))

    @property
    def size(self) -> int:
        """Size in bytes."""
        return self.size_mb * MiB

    def reply(self, granted_mb: int) -> Extend:
        return dataclasses.replace(self, size_mb=granted_mb)

    def same_volume(self, other: Extend) -> bool:
        return self.domain == other.domain and self.volume == other.volume


@dataclasses.dataclass(frozen=True)
class Unknown:
    """A well-formed v1 head with an opcode this peer does not speak."""

    opcode: bytes
    raw: bytes


Message = Empty | Clean | Extend | Unknown

EMPTY = Empty()
CLEAN = Clean()


def encode(msg: Message) -> bytes:
    """Encode one message to its 64 bytes."""
    if isinstance(msg, Extend):
        if not 0 <= msg.size_mb <= MAX_SIZE_MB:
            raise ValueError(f"size out of range: {msg.size_mb} MiB")
        return bytes(
            _extend_format.build(
                {
                    "domain": _uuid_to_wire(msg.domain),
                    "volume": _uuid_to_wire(msg.volume),
                    "size": b"%016x" % msg.size_mb,
                }
            )
        )
    if isinstance(msg, Clean):
        return CLEAN_MESSAGE
    if isinstance(msg, Empty):
        return EMPTY_MESSAGE
    if isinstance(msg, Unknown):
        return msg.raw
    raise TypeError(f"not a mailbox message: {msg!r}")


def is_empty(raw: bytes | memoryview) -> bool:
    """True if a slot holds no message (cheap: looks at the first byte)."""
    return raw[0] in _EMPTY_MARKERS


def decode(raw: bytes | memoryview) -> Message:
    """Decode one 64-byte slot; raise MessageError on anything malformed."""
    raw = bytes(raw)
    if len(raw) != MESSAGE_SIZE:
        raise MessageError(f"message must be {MESSAGE_SIZE} bytes, got {len(raw)}", raw)
    if is_empty(raw):
        return EMPTY
    if raw == CLEAN_MESSAGE:
        return CLEAN
    if raw[:1] != VERSION:
        raise MessageError(f"unsupported message version {raw[0]:#04x}", raw)
    opcode = raw[1:5]
    if opcode != EXTEND_OPCODE:
        return Unknown(opcode, raw)
    if raw[_PADDING] != _PADDING_BYTES:
        raise MessageError("malformed extend message: padding is not ASCII '0'", raw)
    size = raw[_SIZE]
    if not _HEX_SIZE.fullmatch(size):
        raise MessageError(f"size field is not hex: {size!r}", raw)
    return Extend(_domain_from_wire(raw[_DOMAIN]), _uuid_from_wire(raw[_VOLUME]), int(size, 16))


def parse_extend(raw: bytes) -> Extend:
    """Decode an extend message with construct (reference for the fast path)."""
    try:
        parsed = _extend_format.parse(raw)
    except c.ConstructError as e:
        raise MessageError(f"malformed extend message: {e or type(e).__name__}", raw) from None
    if not _HEX_SIZE.fullmatch(parsed.size):
        raise MessageError(f"size field is not hex: {parsed.size!r}", raw)
    return Extend(_uuid_from_wire(parsed.domain), _uuid_from_wire(parsed.volume), int(parsed.size, 16))


def encode_reply(request: bytes, granted_mb: int) -> bytes:
    """The reply to a raw extend request: the request with the size replaced."""
    if not 0 <= granted_mb <= MAX_SIZE_MB:
        raise ValueError(f"size out of range: {granted_mb} MiB")
    if len(request) != MESSAGE_SIZE or request[:5] != VERSION + EXTEND_OPCODE:
        raise MessageError("not an extend request", request)
    return bytes(request[: _SIZE.start]) + b"%016x" % granted_mb + _PADDING_BYTES


def decode_head(raw: bytes | memoryview) -> tuple[uuid.UUID, uuid.UUID] | None:
    """Domain and volume of an xtnd message whose size field may be bad.

    Lets the SPM send a failure reply for a request it cannot parse fully,
    so the requester is not left waiting. None if the head is not xtnd.
    """
    raw = bytes(raw)
    if len(raw) != MESSAGE_SIZE or raw[:5] != VERSION + EXTEND_OPCODE:
        return None
    return _uuid_from_wire(raw[_DOMAIN]), _uuid_from_wire(raw[_VOLUME])


# The checksum is a plain byte sum, which Python's sum() computes at ~20 us
# a block: too slow for the SPM when 2000 hosts write at once. zlib's
# Adler-32 keeps the byte sum modulo 65521 in its low half, at C speed. The
# high nibbles of a block sum to H, so the byte sum S lies in
# [16 H, 16 H + 4092 * 15] (the low nibbles add at most 61380 < 65521): one
# value in that window has S's residue. Two Adler-32s and one translate
# give the exact sum ~4x faster than sum().
_HIGH_NIBBLES = bytes(b >> 4 for b in range(256))
_ADLER_MOD = 65521


def _adler_sum(data: bytes) -> int:
    """Sum of the bytes of ``data`` modulo 65521."""
    return ((zlib.adler32(data) & 0xFFFF) - 1) % _ADLER_MOD


def checksum(block: bytes | bytearray | memoryview) -> int:
    """vdsm's block checksum: sum of bytes 0..4091."""
    if type(block) is bytes and len(block) == BLOCK_SIZE:
        # A whole block, no copy: the window still holds (4096 * 15 < 65521);
        # the checksum field's own 4 bytes are taken off after.
        low_bound = 16 * _adler_sum(block.translate(_HIGH_NIBBLES))
        total = low_bound + (_adler_sum(block) - low_bound) % _ADLER_MOD
        return total - sum(block[CHECKSUM_OFFSET:])
    body = bytes(memoryview(block)[:CHECKSUM_OFFSET])
    low_bound = 16 * _adler_sum(body.translate(_HIGH_NIBBLES))
    return low_bound + (_adler_sum(body) - low_bound) % _ADLER_MOD


def stored_checksum(block: bytes | bytearray | memoryview) -> int:
    value: int = struct.unpack_from("<i", block, CHECKSUM_OFFSET)[0]
    return value


def checksum_valid(block: bytes | bytearray | memoryview) -> bool:
    return len(block) == BLOCK_SIZE and checksum(block) == stored_checksum(block)


@dataclasses.dataclass(frozen=True)
class HostBlock:
    """One host's inbox block: 63 raw slots plus the checksum."""

    slots: tuple[bytes, ...]
    checksum: int
    reserved: bytes = bytes(MESSAGE_SIZE - 4)

    @property
    def checksum_valid(self) -> bool:
        return self.checksum == sum(sum(s) for s in self.slots) + sum(self.reserved)


def build_block(slots: list[bytes] | tuple[bytes, ...], with_checksum: bool = True) -> bytes:
    """Build a 4096-byte block from up to 63 raw slots (missing ones empty).

    Inbox blocks carry a checksum; outbox blocks (``with_checksum=False``)
    leave the reserved slot zero.
    """
    if len(slots) > MESSAGES_PER_BLOCK:
        raise ValueError(f"a block holds {MESSAGES_PER_BLOCK} messages, got {len(slots)}")
    for s in slots:
        if len(s) != MESSAGE_SIZE:
            raise ValueError(f"slot must be {MESSAGE_SIZE} bytes, got {len(s)}")
    buf = bytearray(BLOCK_SIZE)
    buf[: len(slots) * MESSAGE_SIZE] = b"".join(slots)
    if with_checksum:
        seal(buf)
    return bytes(buf)


def seal(buf: bytearray | memoryview) -> None:
    """Write the checksum of a block being built into its last 4 bytes."""
    struct.pack_into("<i", buf, CHECKSUM_OFFSET, checksum(buf))


def parse_block(raw: bytes | memoryview) -> HostBlock:
    """Split a host block into slots; checksum validity is reported, not raised."""
    raw = bytes(raw)
    if len(raw) != BLOCK_SIZE:
        raise BlockError(f"block must be {BLOCK_SIZE} bytes, got {len(raw)}", raw)
    parsed = _host_block_format.parse(raw)
    return HostBlock(tuple(parsed.slots), parsed.checksum, parsed.reserved)


def slot(block: bytes | memoryview, index: int) -> bytes:
    """Raw bytes of slot ``index`` of a block."""
    if not 0 <= index < SLOTS_PER_BLOCK:
        raise IndexError(f"slot index out of range: {index}")
    start = index * MESSAGE_SIZE
    return bytes(block[start : start + MESSAGE_SIZE])


def put_slot(buf: bytearray, index: int, raw: bytes) -> None:
    """Store raw message bytes in slot ``index`` of a block buffer."""
    if not 0 <= index < MESSAGES_PER_BLOCK:
        raise IndexError(f"message slot index out of range: {index}")
    if len(raw) != MESSAGE_SIZE:
        raise ValueError(f"slot must be {MESSAGE_SIZE} bytes, got {len(raw)}")
    start = index * MESSAGE_SIZE
    buf[start : start + MESSAGE_SIZE] = raw


def _encode_record(
    magic: bytes, record_id: uuid.UUID, domain: bytes = _NO_VOLUME, volume: bytes = _NO_VOLUME, capacity: int = 0
) -> bytes:
    return bytes(
        _record_format.build(
            {
                "magic": magic,
                "id": record_id.bytes,
                "domain": domain,
                "volume": volume,
                "capacity": capacity,
            }
        )
    )


def _decode_record(raw: bytes | memoryview, magic: bytes, name: str) -> c.Container | None:
    """The fields of a block-0 record; None for an all-zero block."""
    raw = bytes(raw)
    if len(raw) != BLOCK_SIZE:
        raise BlockError(f"{name} block must be {BLOCK_SIZE} bytes, got {len(raw)}", raw)
    if raw == EMPTY_BLOCK:
        return None
    parsed = _record_format.parse(raw)
    if parsed.magic != magic:
        raise BlockError(f"not {name} block: magic {parsed.magic!r}, expected {magic!r}", raw)
    return parsed


def encode_event(event_id: uuid.UUID | None = None) -> bytes:
    """A fresh event block (random id unless given)."""
    return _encode_record(EVENT_MAGIC, event_id or uuid.uuid4())


def decode_event(raw: bytes | memoryview) -> uuid.UUID | None:
    """The event id of an event block; None for an all-zero (never written) block."""
    parsed = _decode_record(raw, EVENT_MAGIC, "an event")
    return None if parsed is None else uuid.UUID(bytes=parsed.id)


def encode_notice(notice: ResizeNotice) -> bytes:
    """The 4096-byte notice block (outbox block 0)."""
    return _encode_record(
        RESIZE_MAGIC, notice.id, _uuid_to_wire(notice.domain), _uuid_to_wire(notice.volume), notice.capacity
    )


def decode_notice(raw: bytes | memoryview) -> ResizeNotice | None:
    """The notice in outbox block 0; None for an all-zero block (none yet,
    or an SPM zeroed the outbox when it started)."""
    parsed = _decode_record(raw, RESIZE_MAGIC, "a resize notice")
    if parsed is None:
        return None
    return ResizeNotice(
        uuid.UUID(bytes=parsed.id),
        _uuid_from_wire(parsed.domain),
        _uuid_from_wire(parsed.volume),
        parsed.capacity,
    )
