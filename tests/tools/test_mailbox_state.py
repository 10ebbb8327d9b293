from __future__ import annotations

import uuid

import pytest
from xtnd.mailbox import codec
from xtnd.tools.mailbox_state import IDLE_STATES, Kind, State, pair, printable, read_slot

DOMAIN = uuid.UUID("8adbc85e-e554-4ae0-b318-8a5465fe5fe1")
VOLUME = uuid.UUID("d772f1c6-3ebb-43c3-a42e-73fcd8255a5f")
OTHER = uuid.UUID("00000000-0000-0000-0000-000000000001")

REQUEST = codec.encode(codec.Extend(DOMAIN, VOLUME, 2560))
REPLY = codec.encode(codec.Extend(DOMAIN, VOLUME, 5120))
FAILURE = codec.encode(codec.Extend(DOMAIN, VOLUME, 0))
OTHER_VOLUME = codec.encode(codec.Extend(DOMAIN, OTHER, 2560))
OTHER_DOMAIN = codec.encode(codec.Extend(OTHER, VOLUME, 2560))
EMPTY = codec.EMPTY_MESSAGE
CLEAN = codec.CLEAN_MESSAGE
UNKNOWN = b"1abcd" + bytes(59)
BAD_VERSION = b"2xtnd" + bytes(59)
BAD_SIZE = REQUEST[:37] + b"zz" + REQUEST[39:]


@pytest.mark.parametrize(
    "inbox,outbox,state",
    [
        (EMPTY, EMPTY, State.FREE),
        (EMPTY, CLEAN, State.DONE),
        (EMPTY, REPLY, State.ORPHAN_REPLY),
        (REQUEST, EMPTY, State.PENDING),
        (REQUEST, CLEAN, State.PENDING),
        (REQUEST, OTHER_VOLUME, State.PENDING),
        (REQUEST, OTHER_DOMAIN, State.PENDING),
        (REQUEST, REPLY, State.REPLIED),
        (REQUEST, REQUEST, State.REPLIED),
        (REQUEST, FAILURE, State.FAILED),
        (CLEAN, REPLY, State.ACKING),
        (CLEAN, EMPTY, State.ACKING),
        (CLEAN, CLEAN, State.ACKED),
        (UNKNOWN, EMPTY, State.UNKNOWN_REQUEST),
        (BAD_VERSION, REPLY, State.INVALID_REQUEST),
        (BAD_SIZE, EMPTY, State.INVALID_REQUEST),
        (REQUEST, BAD_SIZE, State.INVALID_REPLY),
        (CLEAN, UNKNOWN, State.INVALID_REPLY),
        (EMPTY, BAD_VERSION, State.INVALID_REPLY),
    ],
)
def test_pair(inbox: bytes, outbox: bytes, state: State) -> None:
    assert pair(read_slot(inbox), read_slot(outbox)).state is state


def test_replied_detail_names_granted_size() -> None:
    assert pair(read_slot(REQUEST), read_slot(REPLY)).detail == "granted 5120 MiB"


@pytest.mark.parametrize("inbox,outbox", [(REQUEST, EMPTY), (EMPTY, CLEAN), (CLEAN, REPLY), (BAD_SIZE, EMPTY)])
def test_bad_checksum_sticks_the_whole_block(inbox: bytes, outbox: bytes) -> None:
    assert pair(read_slot(inbox), read_slot(outbox), block_valid=False).state is State.INVALID_BLOCK


def test_bad_checksum_over_free_slot_is_free() -> None:
    assert pair(read_slot(EMPTY), read_slot(EMPTY), block_valid=False).state is State.FREE


@pytest.mark.parametrize(
    "inbox,outbox,state",
    [
        (None, EMPTY, State.FREE),
        (EMPTY, None, State.FREE),
        (None, None, State.FREE),
        (REQUEST, None, State.INCOMPLETE),
        (None, REPLY, State.INCOMPLETE),
    ],
)
def test_missing_block(inbox: bytes | None, outbox: bytes | None, state: State) -> None:
    assert pair(read_slot(inbox), read_slot(outbox)).state is state


def test_read_slot_kinds() -> None:
    assert read_slot(EMPTY).kind is Kind.EMPTY
    # vdsm also treats a first byte of ASCII "0" as an empty slot.
    assert read_slot(b"0" + bytes(63)).kind is Kind.EMPTY
    assert read_slot(CLEAN).kind is Kind.CLEAN
    assert read_slot(REQUEST).message == codec.Extend(DOMAIN, VOLUME, 2560)
    assert read_slot(UNKNOWN).kind is Kind.UNKNOWN
    assert read_slot(None).kind is Kind.MISSING


def test_read_slot_never_raises() -> None:
    for raw in (BAD_VERSION, BAD_SIZE, b"1xtnd" + b"z" * 59, b"short"):
        slot = read_slot(raw)
        assert slot.kind is Kind.INVALID
        assert slot.raw == raw
        assert slot.reason and not slot.reason.endswith(":")


def test_idle_states() -> None:
    assert IDLE_STATES == {State.FREE, State.DONE}


def test_printable() -> None:
    assert printable(b"ab\x00\\\xff") == "ab\\x00\\x5c\\xff"


def test_bad_checksum_wins_over_missing_outbox() -> None:
    """The inbox alone shows the block is stuck; the short copy matters less."""
    assert pair(read_slot(REQUEST), read_slot(None), block_valid=False).state is State.INVALID_BLOCK
