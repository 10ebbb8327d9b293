"""Interoperability with vdsm's mailbox behaviour, emulated from its protocol.

vdsm's peers differ from ours in ways the wire format allows: its HSM of
older versions writes no event block, so the SPM only finds its requests
by the periodic full scan; its SPM writes the clean echo on every scan
that sees a clean message (not only when it is new), answers with a
regenerated message rather than an echo of the bytes, and scans on a
timer. The emulations below follow that behaviour, written from mailbox/PROTOCOL.md §2.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import pytest
from testlib.mailboxes import MAX_HOSTS, Areas
from xtnd.mailbox import codec, directio
from xtnd.mailbox.hsm import HSMConfig, HSMMailbox
from xtnd.mailbox.spm import Request, SPMConfig, SPMMailbox
from xtnd.tools.rig.wait import wait_for

DOMAIN = uuid.uuid4()


class VdsmLikeSPM:
    """Timer-driven SPM: full inbox read per interval, vdsm's reply rules."""

    def __init__(self, inbox: directio.Storage, outbox: directio.Storage, interval: float = 0.05):
        self.inbox = inbox
        self.outbox = outbox
        self.interval = interval
        self.length = (MAX_HOSTS + 1) * codec.BLOCK_SIZE
        self.out = bytearray(self.length)
        self.seen = bytes(self.length)
        self.served: list[codec.Extend] = []
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self.run, name="vdsm-like-spm", daemon=True)
        outbox.write(0, bytes(self.length))

    def run(self) -> None:
        while not self.stop_event.wait(self.interval):
            data = self.inbox.read(0, self.length)
            touched = set()
            for host in range(1, MAX_HOSTS + 1):
                start = host * codec.BLOCK_SIZE
                block = data[start : start + codec.BLOCK_SIZE]
                if block == codec.EMPTY_BLOCK or not codec.checksum_valid(block):
                    continue
                for i in range(codec.MESSAGES_PER_BLOCK):
                    off = start + i * codec.MESSAGE_SIZE
                    raw = data[off : off + codec.MESSAGE_SIZE]
                    if codec.is_empty(raw):
                        continue
                    if raw == codec.CLEAN_MESSAGE:  # echoed on every scan
                        self.out[off : off + codec.MESSAGE_SIZE] = raw
                        touched.add(host)
                        continue
                    if raw == self.seen[off : off + codec.MESSAGE_SIZE]:
                        continue
                    msg = codec.decode(raw)
                    assert isinstance(msg, codec.Extend)
                    self.served.append(msg)
                    # A regenerated message with the new size, not a byte echo.
                    self.out[off : off + codec.MESSAGE_SIZE] = codec.encode(
                        codec.Extend(msg.domain, msg.volume, msg.size_mb)
                    )
                    touched.add(host)
            self.seen = data
            for host in touched:
                start = host * codec.BLOCK_SIZE
                self.outbox.write(start, bytes(self.out[start : start + codec.BLOCK_SIZE]))

    def __enter__(self) -> VdsmLikeSPM:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.thread.join(5)


class VdsmLikeHSM:
    """Writes its block without an event; first free slot; vdsm's ack rules."""

    def __init__(self, inbox: directio.Storage, outbox: directio.Storage, host_id: int):
        self.inbox = inbox
        self.outbox = outbox
        self.offset = host_id * codec.BLOCK_SIZE
        self.block = bytearray(codec.BLOCK_SIZE)
        self.last = outbox.read(self.offset, codec.BLOCK_SIZE)

    def send(self, msg: codec.Extend) -> int:
        codec.put_slot(self.block, 0, codec.encode(msg))
        self._write()
        return 0

    def _write(self) -> None:
        codec.seal(self.block)
        self.inbox.write(self.offset, bytes(self.block))

    def poll(self, slot: int) -> codec.Message | None:
        """One vdsm-style check: a changed non-empty outbox slot is news."""
        data = self.outbox.read(self.offset, codec.BLOCK_SIZE)
        new = codec.slot(data, slot)
        old = codec.slot(self.last, slot)
        self.last = data
        if codec.is_empty(new) or new == old:
            return None
        msg = codec.decode(new)
        if isinstance(msg, codec.Clean):
            codec.put_slot(self.block, slot, codec.EMPTY_MESSAGE)
        else:
            codec.put_slot(self.block, slot, codec.CLEAN_MESSAGE)
        self._write()
        return msg


@pytest.fixture
def pair(file_areas: Areas) -> Iterator[Areas]:
    yield file_areas


def test_our_hsm_with_vdsm_like_spm(pair: Areas) -> None:
    with VdsmLikeSPM(*pair.open()) as spm:
        hsm = HSMMailbox(*pair.open(), host_id=3, config=HSMConfig(poll_max=0.01))
        hsm.start()
        try:
            volumes = [uuid.uuid4() for _ in range(5)]
            futures = [hsm.submit(DOMAIN, v, (n + 1) * codec.MiB) for n, v in enumerate(volumes)]
            assert [f.result(30) for f in futures] == [(n + 1) * codec.MiB for n in range(5)]
            assert hsm.wait_idle(30)
            assert {m.volume for m in spm.served} == set(volumes)
        finally:
            hsm.stop()
    assert pair.read_block("inbox", 3) == codec.EMPTY_BLOCK


def test_vdsm_like_hsm_with_our_spm(pair: Areas) -> None:
    inbox, outbox = pair.open()
    spm = SPMMailbox(inbox, outbox, MAX_HOSTS, SPMConfig(scan_interval=0.1, workers=2))
    granted: list[Request] = []

    def handler(req: Request) -> int:
        granted.append(req)
        return req.message.size_mb + 1

    spm.register(codec.EXTEND_OPCODE, handler)
    spm.start()
    try:
        hsm = VdsmLikeHSM(*pair.open(), host_id=9)
        request = codec.Extend(DOMAIN, uuid.uuid4(), 2560)
        slot = hsm.send(request)  # no event: found by the periodic scan
        reply = wait_for(lambda: hsm.poll(slot), what="reply")
        assert reply == request.reply(2561)
        echo = wait_for(lambda: hsm.poll(slot), what="clean echo")
        assert echo == codec.CLEAN
        assert len(granted) == 1
        assert codec.slot(pair.read_block("inbox", 9), slot) == codec.EMPTY_MESSAGE
    finally:
        spm.stop()
