"""SPM scan logic driven step by step: no threads, an injected clock."""

from __future__ import annotations

import logging
import uuid

import pytest
from xtnd.mailbox import codec, directio
from xtnd.mailbox.spm import Request, SPMConfig, SPMMailbox

DOMAIN = uuid.uuid4()
AREA = 64 * 1024
MAX_HOSTS = 10


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Rig:
    def __init__(self) -> None:
        self.inbox = directio.MemoryStorage(AREA, "inbox")
        self.outbox = directio.MemoryStorage(AREA, "outbox")
        self.clock = Clock()
        self.calls: list[Request] = []
        self.spm = SPMMailbox(self.inbox, self.outbox, MAX_HOSTS, SPMConfig(workers=0, scan_interval=2.0), self.clock)
        self.spm.register(codec.EXTEND_OPCODE, self.handle)
        self.spm.reset()

    def handle(self, req: Request) -> int:
        self.calls.append(req)
        return req.message.size_mb

    def write_host(self, host: int, slots: list[bytes], event: bool = True, block: bytes | None = None) -> None:
        self.inbox.write(host * 4096, block if block is not None else codec.build_block(slots))
        if event:
            self.inbox.write(0, codec.encode_event())

    def reply(self, host: int, i: int) -> bytes:
        return codec.slot(self.outbox.read(host * 4096, 4096), i)


@pytest.fixture
def rig() -> Rig:
    return Rig()


def request(size_mb: int = 100, volume: uuid.UUID | None = None) -> bytes:
    return codec.encode(codec.Extend(DOMAIN, volume or uuid.uuid4(), size_mb))


def test_event_triggers_scan(rig: Rig) -> None:
    rig.spm.step()  # initial full scan
    req = request()
    rig.write_host(3, [req])
    rig.spm.step()
    assert len(rig.calls) == 1
    assert rig.reply(3, 0) == req  # echoed with the granted size (same here)


def test_no_event_waits_for_periodic_scan(rig: Rig) -> None:
    """An HSM that writes no event (older vdsm) is served by the full scan."""
    rig.spm.step()
    rig.write_host(2, [request()], event=False)
    rig.spm.step()
    assert rig.calls == []
    rig.clock.now += 2.0
    rig.spm.step()
    assert len(rig.calls) == 1


def test_unchanged_slot_is_not_new(rig: Rig) -> None:
    req = request()
    rig.write_host(1, [req])
    rig.spm.step()
    rig.write_host(1, [req])  # identical rewrite: invisible
    rig.spm.step()
    rig.clock.now += 5
    rig.spm.step()
    assert len(rig.calls) == 1


def test_clean_is_echoed(rig: Rig) -> None:
    req = request()
    rig.write_host(1, [req])
    rig.spm.step()
    rig.write_host(1, [codec.CLEAN_MESSAGE])
    rig.spm.step()
    assert rig.reply(1, 0) == codec.CLEAN_MESSAGE
    assert len(rig.calls) == 1


def test_bad_checksum_block_ignored_until_valid(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    req = request()
    bad = bytearray(codec.build_block([req]))
    bad[4092] ^= 0x01
    rig.write_host(4, [], block=bytes(bad))
    with caplog.at_level(logging.WARNING):
        rig.spm.step()
    assert rig.calls == []
    assert "bad checksum" in caplog.text
    rig.write_host(4, [req])
    rig.spm.step()
    assert len(rig.calls) == 1


def test_torn_block(rig: Rig) -> None:
    """Half of a new block over half of the old one fails the checksum."""
    a, b = request(), request()
    old = codec.build_block([a])
    new = codec.build_block([a, b])
    rig.write_host(5, [a])
    rig.spm.step()
    torn = new[:2048] + old[2048:]
    rig.write_host(5, [], block=torn)
    rig.spm.step()
    assert [c.raw for c in rig.calls] == [a]
    rig.write_host(5, [a, b])
    rig.spm.step()
    # The block was forgotten while torn, so both are reconsidered; a is
    # served again, which is safe: extends name absolute sizes.
    assert [c.raw for c in rig.calls] == [a, a, b]


def test_unknown_and_malformed(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    unknown = b"1abcd" + bytes(59)
    volume = uuid.uuid4()
    malformed = request(volume=volume)[:37] + b"zz" * 8 + b"0" * 11
    good = request()
    rig.write_host(6, [unknown, malformed, good])
    with caplog.at_level(logging.WARNING):
        rig.spm.step()
    assert [c.raw for c in rig.calls] == [good]
    assert rig.reply(6, 0) == codec.EMPTY_MESSAGE  # no reply to an unknown opcode
    assert codec.decode(rig.reply(6, 1)) == codec.Extend(DOMAIN, volume, 0)  # failure reply
    assert rig.reply(6, 2) == good
    assert "unknown opcode" in caplog.text
    assert "malformed" in caplog.text


def test_repeated_errors_are_rate_limited(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        for n in range(5):
            rig.write_host(7, [b"1abcd" + bytes(58) + bytes([n + 1])])
            rig.spm.step()
    assert caplog.text.count("unknown opcode") == 1


def test_reset_serves_pending_again(rig: Rig) -> None:
    req = request()
    rig.write_host(8, [req])
    rig.spm.step()
    rig.spm.reset()
    assert rig.outbox.read(0, AREA) == bytes(AREA)
    rig.spm.step()
    assert len(rig.calls) == 2
    assert rig.reply(8, 0) == req


def test_storage_error_does_not_kill(rig: Rig) -> None:
    def fail(op: str, offset: int, length: int) -> None:
        raise directio.StorageError(5, "injected")

    rig.inbox.fault = fail
    with pytest.raises(directio.StorageError):
        rig.spm.step()
    rig.inbox.fault = None
    rig.write_host(1, [request()])
    rig.spm.step()
    assert len(rig.calls) == 1


def test_scan_overtaken_by_quiesce_hands_in_nothing() -> None:
    """Requests a scan found after quiesce() are left for the next SPM."""
    inbox, outbox = directio.MemoryStorage(AREA, "inbox"), directio.MemoryStorage(AREA, "outbox")
    spm = SPMMailbox(inbox, outbox, MAX_HOSTS, SPMConfig(workers=1))
    spm.register(codec.EXTEND_OPCODE, lambda req: req.message.size_mb)
    spm.reset()
    inbox.write(4096, codec.build_block([request()]))
    inbox.write(0, codec.encode_event())
    scan = spm._view.scan()
    found = next(scan)  # the scan is under way...
    assert len(found) == 1
    assert spm.quiesce() == 0  # ...when the daemon stops taking requests
    for host, i, raw in found:
        spm._dispatch(host, i, raw, 0.0)
    spm._dispatch_batch()
    assert spm._work.empty()
    assert spm._active == 0
    assert spm.flush(timeout=1.0)  # nothing in flight: a clean stop waits for nothing
