"""Replies to many hosts go out in few writes, each block byte for byte as
one write per host would have put it."""

from __future__ import annotations

import random
import uuid

import pytest
from testlib.mailboxes import MAX_HOSTS, Areas
from xtnd.mailbox import codec, directio
from xtnd.mailbox.outbox import OutboxImage, runs
from xtnd.mailbox.spm import SPMConfig, SPMMailbox

DOMAIN = uuid.uuid4()
BLOCK = codec.BLOCK_SIZE


def request(size_mb: int = 100) -> bytes:
    return codec.encode(codec.Extend(DOMAIN, uuid.uuid4(), size_mb))


def test_runs_join_adjacent_and_small_gaps() -> None:
    assert runs([]) == []
    assert runs([5]) == [(5, 5)]
    assert runs([1, 2, 3, 7], max_gap=0) == [(1, 3), (7, 7)]
    assert runs([1, 2, 3, 7], max_gap=3) == [(1, 7)]
    assert runs([1, 2, 3, 7], max_gap=2) == [(1, 3), (7, 7)]
    assert runs(list(range(1, 2001))) == [(1, 2000)]


def test_flush_writes_runs_with_per_host_bytes() -> None:
    hosts = 300
    storage = directio.MemoryStorage((hosts + 1) * BLOCK)
    image = OutboxImage(hosts, max_gap=2)
    expected = bytearray((hosts + 1) * BLOCK)
    rng = random.Random(7)
    touched = sorted(rng.sample(range(1, hosts + 1), 120))
    for host in touched:
        slots = [request() for _ in range(rng.randint(1, 5))]
        for i, raw in enumerate(slots):
            image.put(host, i, raw)
        expected[host * BLOCK : (host + 1) * BLOCK] = codec.build_block(slots, with_checksum=False)
    writes = image.flush(storage)
    assert writes == len(runs(touched, 2)) == storage.counters.writes
    assert writes < len(touched)
    assert storage.data == expected
    assert not image.dirty
    assert image.flush(storage) == 0


def test_failed_write_is_retried() -> None:
    storage = directio.MemoryStorage(16 * BLOCK)
    image = OutboxImage(15)
    image.put(3, 0, codec.CLEAN_MESSAGE)
    image.put(4, 1, codec.CLEAN_MESSAGE)

    def fail(op: str, offset: int, length: int) -> None:
        raise directio.StorageError(5, "injected")

    storage.fault = fail
    with pytest.raises(directio.StorageError):
        image.flush(storage)
    assert image.dirty == {3, 4}
    storage.fault = None
    assert image.flush(storage) == 1
    assert codec.slot(storage.data[4 * BLOCK : 5 * BLOCK], 1) == codec.CLEAN_MESSAGE


def test_put_rejects_bad_slots() -> None:
    image = OutboxImage(2)
    with pytest.raises(IndexError):
        image.put(1, 63, codec.CLEAN_MESSAGE)
    with pytest.raises(ValueError):
        image.put(1, 0, b"short")


def test_wave_from_every_host_is_one_write(areas: Areas) -> None:
    """All hosts write at once: one inbox read serves them and one outbox
    write answers them all, on files and 512/4096-byte-sector devices."""
    inbox, outbox = areas.open()
    spm = SPMMailbox(inbox, outbox, MAX_HOSTS, SPMConfig(workers=0))
    spm.register(codec.EXTEND_OPCODE, lambda req: req.message.size_mb * 2)
    spm.reset()
    spm.step()
    requests = {h: [request(h), request(h + 1)] for h in range(1, MAX_HOSTS + 1)}
    writer, _ = areas.open()
    writer.write(BLOCK, b"".join(codec.build_block(requests[h]) for h in range(1, MAX_HOSTS + 1)))
    writer.write(0, codec.encode_event())
    writes = outbox.counters.writes
    spm.step()
    assert outbox.counters.writes - writes == 1
    assert spm.stats["requests"] == 2 * MAX_HOSTS
    data = outbox.read(0, (MAX_HOSTS + 1) * BLOCK)
    for h, reqs in requests.items():
        replies = [codec.encode_reply(r, 2 * codec.decode(r).size_mb) for r in reqs]  # type: ignore[union-attr]
        assert data[h * BLOCK : (h + 1) * BLOCK] == codec.build_block(replies, with_checksum=False)
    [wave] = list(spm.waves)
    seconds, reqs_in_wave, messages = wave[:3]
    assert (wave.scans, wave.outbox_writes) == (1, 1)
    assert wave.read_bytes >= MAX_HOSTS * BLOCK
    assert (reqs_in_wave, messages) == (2 * MAX_HOSTS, 2 * MAX_HOSTS)
    assert seconds > 0
    # Nothing new: no wave.
    spm.scan()
    spm.step()
    assert len(spm.waves) == 1


def test_warm_up_writes_host_blocks_not_block_0(areas: Areas) -> None:
    """The I/O thread's warm-up write (zeros, as reset() left them) covers
    the host blocks and never outbox block 0, where a resize notice may
    already be."""
    inbox, outbox = areas.open()
    spm = SPMMailbox(inbox, outbox, MAX_HOSTS, SPMConfig(workers=0))
    spm.reset()
    notice = codec.encode_notice(codec.ResizeNotice(uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), 5 * 1024**3))
    writer, out = areas.open()
    out.write(0, notice)
    out.write(BLOCK, b"\xff" * BLOCK)  # garbage the warm-up must overwrite
    writes = outbox.counters.writes
    spm._warm_up()
    assert outbox.counters.writes - writes == 1
    assert out.read(0, BLOCK) == notice
    assert out.read(BLOCK, MAX_HOSTS * BLOCK) == bytes(MAX_HOSTS * BLOCK)
