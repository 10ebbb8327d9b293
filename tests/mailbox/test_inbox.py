"""The SPM's inbox scan: new messages only, across read chunks, with the
reads done by a reader thread."""

from __future__ import annotations

import logging
import random
import uuid

import pytest
from testlib.mailboxes import Areas
from xtnd.common.ratelimit import RateLimitedLog
from xtnd.mailbox import codec, directio, inbox
from xtnd.mailbox.inbox import InboxView, Reader

BLOCK = codec.BLOCK_SIZE
MAX_HOSTS = 10


def request() -> bytes:
    return codec.encode(codec.Extend(uuid.uuid4(), uuid.uuid4(), 64))


@pytest.fixture(params=[False, True], ids=["inline", "reader"])
def use_reader(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


@pytest.fixture(params=[True, False], ids=["numpy", "memcmp"])
def compare_numpy(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


def test_new_messages_across_chunks(areas: Areas, use_reader: bool, compare_numpy: bool) -> None:
    inbox, _ = areas.open()
    stats = {"event_reads": 0, "bad_blocks": 0}
    view = InboxView(inbox, MAX_HOSTS, 4, RateLimitedLog(logging.getLogger("test"), 60), stats)
    if not compare_numpy:
        view._words = None  # chunks compared block by block
    view.reader = Reader(inbox) if use_reader else None
    writer, _ = areas.open()
    reqs = {h: [request(), request()] for h in (1, 3, 4, 7, 8, 10)}  # chunks: 0-3, 4-7, 8-10
    for h, slots in reqs.items():
        writer.write(h * BLOCK, codec.build_block([codec.EMPTY_MESSAGE, *slots]))
    event = codec.encode_event()
    writer.write(0, event)
    assert view.event_changed()
    chunks = list(view.scan())
    assert len(chunks) == 3
    found = [m for chunk in chunks for m in chunk]
    assert found == [(h, i + 1, raw) for h, slots in reqs.items() for i, raw in enumerate(slots)]
    assert view.last_event == event and not view.event_changed()
    assert all(view.holds(h, 2, slots[1]) for h, slots in reqs.items())
    # Nothing changed: nothing new. One slot rewritten: only that one.
    assert [m for chunk in view.scan() for m in chunk] == []
    new = request()
    writer.write(8 * BLOCK, codec.build_block([new, *reqs[8]]))
    assert [m for chunk in view.scan() for m in chunk] == [(8, 0, new)]
    # A torn block is ignored until whole, then all of it is new again.
    torn = bytearray(codec.build_block([new, request(), reqs[8][1]]))
    torn[100] ^= 1
    writer.write(8 * BLOCK, bytes(torn))
    assert [m for chunk in view.scan() for m in chunk] == []
    assert stats["bad_blocks"] == 1
    writer.write(8 * BLOCK, codec.build_block([new, *reqs[8]]))
    assert [m[:2] for chunk in view.scan() for m in chunk] == [(8, 0), (8, 1), (8, 2)]
    if view.reader is not None:
        view.reader.close()


def test_reader_passes_errors_on(areas: Areas) -> None:
    inbox, _ = areas.open()
    reader = Reader(inbox)
    try:
        chunks = reader.read_all([(0, BLOCK), (1 << 40, BLOCK), (BLOCK, BLOCK)])
        assert next(chunks)[:] == bytes(BLOCK)
        with pytest.raises(directio.StorageError):
            next(chunks)
        # The reader thread lives on.
        assert [c[:] for c in reader.read_all([(BLOCK, BLOCK)])] == [bytes(BLOCK)]
    finally:
        reader.close()


def test_reader_reuses_its_buffers(areas: Areas) -> None:
    """Reads go into kept buffers, one per read of a scan, refilled by the
    next scan: what it yields is the storage's bytes at that moment."""
    inbox, _ = areas.open()
    writer, _ = areas.open()
    reader = Reader(inbox)
    try:
        reads = [(0, 2 * BLOCK), (2 * BLOCK, BLOCK)]
        first = [c[:] for c in reader.read_all(reads)]
        assert first == [bytes(2 * BLOCK), bytes(BLOCK)]
        block = codec.build_block([request()])
        writer.write(2 * BLOCK, block)
        writer.write(BLOCK, block)
        buffers = list(reader.read_all(reads))
        assert [b[:] for b in buffers] == [bytes(BLOCK) + block, block]
        assert [id(b) for b in reader.read_all(reads)] == [id(b) for b in buffers]
    finally:
        reader.close()


@pytest.mark.parametrize("numpy", [True, False], ids=["numpy", "pure"])
@pytest.mark.parametrize("seed", range(5))
def test_checksums_valid_matches_block_by_block(numpy: bool, seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    if numpy and not inbox._HAVE_NUMPY:
        pytest.skip("numpy not installed")
    monkeypatch.setattr(inbox, "_HAVE_NUMPY", numpy)
    rng = random.Random(seed)
    blocks = []
    for n in range(80):
        slots = [rng.randbytes(codec.MESSAGE_SIZE) for _ in range(rng.randint(0, 63))]
        block = bytearray(codec.build_block(slots))
        if n % 3 == 0:
            block[rng.randrange(codec.BLOCK_SIZE)] ^= 1 << rng.randrange(8)  # torn or corrupt
        if n % 7 == 0:
            block[codec.CHECKSUM_OFFSET :] = b"\xff\xff\xff\xff"  # negative stored checksum
        blocks.append(bytes(block))
    area = b"".join(blocks)
    offsets = sorted(rng.sample(range(80), 50))
    expected = [codec.checksum_valid(blocks[i]) for i in offsets]
    assert True in expected and False in expected
    assert inbox.checksums_valid(area, [i * codec.BLOCK_SIZE for i in offsets]) == expected
    few = offsets[:3]
    assert inbox.checksums_valid(area, [i * codec.BLOCK_SIZE for i in few]) == expected[:3]


@pytest.mark.parametrize("seed", range(3))
def test_numpy_scan_matches_block_by_block(seed: int) -> None:
    """The numpy pass over a chunk's changed blocks (taken when >=
    VECTOR_MIN_BLOCKS changed) finds exactly what the block-by-block scan
    finds, across waves of requests, cleans, rewritten slots, freed blocks
    and torn blocks (ignored, counted, then all new once whole)."""
    rng = random.Random(seed)
    hosts = 120
    storage = directio.MemoryStorage((hosts + 1) * BLOCK)
    views = []
    for vector in (True, False):
        stats = {"event_reads": 0, "bad_blocks": 0}
        view = InboxView(storage, hosts, 40, RateLimitedLog(logging.getLogger("test"), 60), stats)
        if not vector:
            view._words = None
        views.append((view, stats))
    blocks = {h: [codec.EMPTY_MESSAGE] * codec.MESSAGES_PER_BLOCK for h in range(1, hosts + 1)}
    for _ in range(12):
        for h in rng.sample(range(1, hosts + 1), rng.randrange(20, hosts)):
            slots = blocks[h]
            for i in rng.sample(range(codec.MESSAGES_PER_BLOCK), rng.randrange(1, 4)):
                slots[i] = rng.choice([request(), codec.CLEAN_MESSAGE, codec.EMPTY_MESSAGE, b"0" * 64, slots[i]])
            data = bytearray(codec.build_block(slots))
            if rng.random() < 0.05:
                data[rng.randrange(codec.CHECKSUM_OFFSET)] ^= 0x40  # torn
            storage.write(h * BLOCK, bytes(data))
        found = [[m for chunk in view.scan() for m in chunk] for view, _ in views]
        assert found[0] == found[1]
        assert views[0][1] == views[1][1]
        assert views[0][0]._area == views[1][0]._area
    assert views[0][1]["bad_blocks"] > 0
