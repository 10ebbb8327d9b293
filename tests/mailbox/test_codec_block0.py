"""Block-0 records (inbox event, outbox resize notice): one shared layout.

Both encode and decode through codec._record_format; these round trips
cover every field of it, and that each decoder refuses the other record.
"""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st
from xtnd.mailbox import codec

capacities = st.integers(min_value=0, max_value=2**64 - 1)


@given(st.uuids(), st.uuids(), st.uuids(), capacities)
def test_notice_roundtrip(notice_id: uuid.UUID, domain: uuid.UUID, volume: uuid.UUID, capacity: int) -> None:
    notice = codec.ResizeNotice(notice_id, domain, volume, capacity)
    raw = codec.encode_notice(notice)
    assert len(raw) == codec.BLOCK_SIZE and raw[60:] == bytes(codec.BLOCK_SIZE - 60)
    assert codec.decode_notice(raw) == notice
    with pytest.raises(codec.BlockError, match="not an event block"):
        codec.decode_event(raw)


@given(st.uuids())
def test_event_roundtrip(event_id: uuid.UUID) -> None:
    raw = codec.encode_event(event_id)
    # An event sets magic and id only: the notice's fields stay zero.
    assert raw[20:] == bytes(codec.BLOCK_SIZE - 20)
    assert codec.decode_event(raw) == event_id
    with pytest.raises(codec.BlockError, match="not a resize notice block"):
        codec.decode_notice(raw)
