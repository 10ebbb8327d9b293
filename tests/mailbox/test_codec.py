"""Wire format: mailbox/PROTOCOL.md §2 vectors, round trips, and fuzzing of every decoder."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from xtnd.mailbox import codec

DOMAIN = uuid.UUID("8adbc85e-e554-4ae0-b318-8a5465fe5fe1")
VOLUME = uuid.UUID("d772f1c6-3ebb-43c3-a42e-73fcd8255a5f")
VECTOR = bytes.fromhex(
    "3178746e64e15ffe65548a18b3e04a54e55ec8db8a5f5a25d8fc732ea4c343bb"
    "3ec6f172d7303030303030303030303030306130303030303030303030303030"
)

uuids = st.uuids()
sizes = st.integers(min_value=0, max_value=codec.MAX_SIZE_MB)


def test_spec_vector_encode() -> None:
    assert codec.encode(codec.Extend(DOMAIN, VOLUME, 2560)) == VECTOR


def test_spec_vector_decode() -> None:
    assert codec.decode(VECTOR) == codec.Extend(DOMAIN, VOLUME, 2560)


def test_spec_vector_checksum() -> None:
    block = codec.build_block([VECTOR])
    assert block[4092:] == bytes.fromhex("60190000")
    assert codec.checksum(block) == 6496
    assert codec.checksum_valid(block)


@given(st.binary(min_size=0, max_size=codec.BLOCK_SIZE))
def test_fast_checksum_is_the_byte_sum(raw: bytes) -> None:
    assert codec.checksum(raw) == sum(raw[: codec.CHECKSUM_OFFSET])


@given(st.binary(max_size=codec.BLOCK_SIZE), st.integers(0, 255))
def test_fast_checksum_of_whole_blocks(head: bytes, fill: int) -> None:
    block = head + bytes([fill]) * (codec.BLOCK_SIZE - len(head))
    assert codec.checksum(block) == sum(block[: codec.CHECKSUM_OFFSET]) == codec.checksum(bytearray(block))


@pytest.mark.parametrize("fill", [0x00, 0x01, 0x0F, 0xF0, 0xFF])
def test_checksum_extremes(fill: int) -> None:
    block = bytes([fill]) * codec.BLOCK_SIZE
    assert codec.checksum(block) == fill * codec.CHECKSUM_OFFSET
    assert codec.checksum(bytearray(block)) == codec.checksum(memoryview(block)) == fill * codec.CHECKSUM_OFFSET


def test_checksum_at_adler_modulus_edges() -> None:
    """Sums next to multiples of 65521 (Adler-32's modulus) stay exact."""
    for target in (65520, 65521, 65522, 2 * 65521 - 1, 2 * 65521, 15 * 65521 + 7):
        full, rest = divmod(target, 255)
        block = b"\xff" * full + bytes([rest]) + bytes(codec.BLOCK_SIZE - full - 1)
        assert codec.checksum(block) == target
        # The same sum with the checksum field full of 0xff.
        block = block[: codec.CHECKSUM_OFFSET] + b"\xff" * 4
        assert codec.checksum(block) == target


def test_empty_block_checksum_is_zero() -> None:
    assert codec.checksum(codec.EMPTY_BLOCK) == 0
    assert codec.checksum_valid(codec.EMPTY_BLOCK)


def test_size_rounded_up_to_mib() -> None:
    assert codec.Extend.for_bytes(DOMAIN, VOLUME, 1).size_mb == 1
    assert codec.Extend.for_bytes(DOMAIN, VOLUME, codec.MiB).size_mb == 1
    assert codec.Extend.for_bytes(DOMAIN, VOLUME, codec.MiB + 1).size_mb == 2
    with pytest.raises(ValueError):
        codec.Extend.for_bytes(DOMAIN, VOLUME, -1)


def test_size_is_lowercase_hex() -> None:
    raw = codec.encode(codec.Extend(DOMAIN, VOLUME, 0xABCDEF))
    assert raw[37:53] == b"0000000000abcdef"


def test_special_messages() -> None:
    assert codec.decode(codec.CLEAN_MESSAGE) == codec.CLEAN
    assert codec.decode(codec.EMPTY_MESSAGE) == codec.EMPTY
    assert codec.encode(codec.CLEAN) == b"\x01" * 64
    assert codec.encode(codec.EMPTY) == bytes(64)


def test_ascii_zero_first_byte_is_empty_like_vdsm() -> None:
    assert codec.decode(b"0" * 64) == codec.EMPTY


def test_unknown_opcode() -> None:
    raw = b"1abcd" + bytes(59)
    msg = codec.decode(raw)
    assert msg == codec.Unknown(b"abcd", raw)
    assert codec.encode(msg) == raw


@pytest.mark.parametrize(
    "raw,reason",
    [
        (b"2xtnd" + bytes(59), "version"),
        (VECTOR[:37] + b"zzzzzzzzzzzzzzzz" + VECTOR[53:], "hex"),
        (VECTOR[:53] + b"x" * 11, "padding"),
        (VECTOR[:63], "64 bytes"),
    ],
)
def test_malformed_message(raw: bytes, reason: str) -> None:
    with pytest.raises(codec.MessageError) as e:
        codec.decode(raw)
    assert reason in str(e.value)
    assert e.value.raw == raw


def test_decode_head_of_broken_size() -> None:
    raw = VECTOR[:37] + b"z" * 16 + VECTOR[53:]
    assert codec.decode_head(raw) == (DOMAIN, VOLUME)
    assert codec.decode_head(codec.CLEAN_MESSAGE) is None


def test_reply_keeps_address() -> None:
    req = codec.Extend(DOMAIN, VOLUME, 100)
    assert req.reply(0) == codec.Extend(DOMAIN, VOLUME, 0)
    assert req.reply(0).same_volume(req)


def test_event_block() -> None:
    event_id = uuid.uuid4()
    raw = codec.encode_event(event_id)
    assert len(raw) == 4096
    assert raw[:4] == b"\0evt"
    assert raw[4:20] == event_id.bytes
    assert raw[20:] == bytes(4076)
    assert codec.decode_event(raw) == event_id
    assert codec.decode_event(codec.EMPTY_BLOCK) is None


def test_bad_event_block() -> None:
    with pytest.raises(codec.BlockError):
        codec.decode_event(b"junk" + bytes(4092))
    with pytest.raises(codec.BlockError):
        codec.decode_event(bytes(100))


def test_parse_block() -> None:
    block = codec.build_block([VECTOR, codec.CLEAN_MESSAGE])
    parsed = codec.parse_block(block)
    assert parsed.slots[0] == VECTOR
    assert parsed.slots[1] == codec.CLEAN_MESSAGE
    assert parsed.slots[2] == codec.EMPTY_MESSAGE
    assert parsed.checksum_valid
    torn = bytearray(block)
    torn[100] ^= 0xFF
    assert not codec.parse_block(bytes(torn)).checksum_valid


def test_outbox_block_has_no_checksum() -> None:
    block = codec.build_block([VECTOR], with_checksum=False)
    assert block[4092:] == bytes(4)


def test_build_block_validates() -> None:
    with pytest.raises(ValueError):
        codec.build_block([VECTOR] * 64)
    with pytest.raises(ValueError):
        codec.build_block([b"short"])


def test_put_slot_bounds() -> None:
    buf = bytearray(4096)
    with pytest.raises(IndexError):
        codec.put_slot(buf, 63, VECTOR)
    codec.put_slot(buf, 62, VECTOR)
    assert codec.slot(buf, 62) == VECTOR


@given(uuids, uuids, sizes)
def test_extend_round_trip(domain: uuid.UUID, volume: uuid.UUID, size_mb: int) -> None:
    msg = codec.Extend(domain, volume, size_mb)
    raw = codec.encode(msg)
    assert len(raw) == 64
    assert codec.decode(raw) == msg


@given(st.binary(min_size=0, max_size=80))
def test_decode_raises_only_message_error(raw: bytes) -> None:
    try:
        codec.decode(raw)
    except codec.MessageError as e:
        assert e.raw == raw


@given(st.binary(min_size=64, max_size=64))
def test_decode_any_64_bytes(raw: bytes) -> None:
    try:
        msg = codec.decode(raw)
    except codec.MessageError:
        return
    if isinstance(msg, codec.Extend):
        assert codec.encode(msg) == raw


@given(st.sampled_from([b"1xtnd", b"1", b"", b"\x01" * 5]), st.binary(min_size=59, max_size=59))
def test_decode_near_valid(head: bytes, tail: bytes) -> None:
    raw = (head + tail)[:64].ljust(64, b"0")
    try:
        codec.decode(raw)
    except codec.MessageError:
        pass
    codec.decode_head(raw)


@given(st.binary(min_size=0, max_size=5000))
def test_decode_event_raises_only_block_error(raw: bytes) -> None:
    try:
        codec.decode_event(raw)
    except codec.BlockError as e:
        assert e.raw == raw


@settings(suppress_health_check=[HealthCheck.large_base_example])
@given(st.binary(min_size=4096, max_size=4096))
def test_parse_any_block(raw: bytes) -> None:
    parsed = codec.parse_block(raw)
    assert parsed.checksum_valid == codec.checksum_valid(raw)


@given(st.binary(min_size=0, max_size=5000))
def test_parse_block_raises_only_block_error(raw: bytes) -> None:
    try:
        codec.parse_block(raw)
    except codec.BlockError:
        assert len(raw) != 4096


@given(uuids, uuids, sizes)
def test_fast_decode_matches_construct(domain: uuid.UUID, volume: uuid.UUID, size_mb: int) -> None:
    raw = codec.encode(codec.Extend(domain, volume, size_mb))
    assert codec.decode(raw) == codec.parse_extend(raw)


@given(st.binary(min_size=59, max_size=59))
def test_fast_decode_agrees_on_garbage(tail: bytes) -> None:
    raw = b"1xtnd" + tail
    try:
        fast: codec.Message | None = codec.decode(raw)
    except codec.MessageError:
        fast = None
    try:
        slow: codec.Message | None = codec.parse_extend(raw)
    except codec.MessageError:
        slow = None
    assert fast == slow


@given(uuids, uuids, sizes, sizes)
def test_encode_reply_matches_encode(domain: uuid.UUID, volume: uuid.UUID, asked: int, granted: int) -> None:
    req = codec.Extend(domain, volume, asked)
    assert codec.encode_reply(codec.encode(req), granted) == codec.encode(req.reply(granted))


def test_encode_reply_validates() -> None:
    with pytest.raises(ValueError):
        codec.encode_reply(VECTOR, -1)
    with pytest.raises(codec.MessageError):
        codec.encode_reply(codec.CLEAN_MESSAGE, 1)


def test_resize_notice_roundtrip() -> None:
    n = codec.ResizeNotice(uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), 10 * 1024**3)
    raw = codec.encode_notice(n)
    assert len(raw) == codec.BLOCK_SIZE
    assert raw[:4] == b"\0rsz" and raw[60:] == bytes(codec.BLOCK_SIZE - 60)
    # Volume addresses use the extend message's encoding.
    assert raw[20:36] == n.domain.int.to_bytes(16, "little")
    assert codec.decode_notice(raw) == n
    assert codec.decode_notice(bytes(codec.BLOCK_SIZE)) is None
    with pytest.raises(codec.BlockError, match="not a resize notice"):
        codec.decode_notice(codec.encode_event())
    with pytest.raises(codec.BlockError):
        codec.decode_notice(raw[:100])
