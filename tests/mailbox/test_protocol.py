"""The HSM/SPM handshake over real storage (and the memory twin).

SPMs here run their real threads; tests that need exact control drive an
SPM step by step (workers=0, no threads) with an injected clock.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import pytest
from testlib.mailboxes import MAX_HOSTS, Areas
from xtnd.mailbox import codec
from xtnd.mailbox.hsm import ExtendFailed, HSMConfig, HSMMailbox, MailboxStopped
from xtnd.mailbox.spm import Request, SPMConfig, SPMMailbox
from xtnd.tools.rig.wait import wait_for

GiB = 1024**3
DOMAIN = uuid.UUID("8adbc85e-e554-4ae0-b318-8a5465fe5fe1")
FAST_SPM = SPMConfig(event_interval=0.002, idle_event_interval=0.01, scan_interval=0.5, workers=4)


class Recorder:
    """An extend handler that records requests and can be held."""

    def __init__(self) -> None:
        self.calls: list[Request] = []
        self.lock = threading.Lock()
        self.release = threading.Event()
        self.release.set()
        self.fail = False

    def __call__(self, req: Request) -> int:
        with self.lock:
            self.calls.append(req)
        if not self.release.wait(60):
            raise TimeoutError("handler held too long")
        if self.fail:
            raise RuntimeError("injected failure")
        return req.message.size_mb

    def count(self) -> int:
        with self.lock:
            return len(self.calls)


class Cluster:
    def __init__(self, areas: Areas):
        self.areas = areas
        self.handler = Recorder()
        self.spms: list[SPMMailbox] = []
        self.hsms: list[HSMMailbox] = []

    def spm(self, config: SPMConfig = FAST_SPM) -> SPMMailbox:
        inbox, outbox = self.areas.open()
        spm = SPMMailbox(inbox, outbox, MAX_HOSTS, config)
        spm.register(codec.EXTEND_OPCODE, self.handler)
        spm.start()
        self.spms.append(spm)
        return spm

    def hsm(self, host_id: int = 1, config: HSMConfig | None = None) -> HSMMailbox:
        inbox, outbox = self.areas.open()
        hsm = HSMMailbox(inbox, outbox, host_id, config)
        hsm.start()
        self.hsms.append(hsm)
        return hsm

    def stop(self) -> None:
        self.handler.release.set()
        for m in [*self.hsms, *self.spms]:
            m.stop()


@pytest.fixture
def cluster(areas: Areas) -> Iterator[Cluster]:
    c = Cluster(areas)
    yield c
    c.stop()


@pytest.fixture
def file_cluster(file_areas: Areas) -> Iterator[Cluster]:
    c = Cluster(file_areas)
    yield c
    c.stop()


def test_roundtrip(cluster: Cluster) -> None:
    cluster.spm()
    hsm = cluster.hsm(host_id=7)
    volume = uuid.uuid4()
    assert hsm.submit(DOMAIN, volume, 3 * GiB + 1).result(30) == 3 * GiB + codec.MiB
    assert hsm.wait_idle(30)
    (req,) = cluster.handler.calls
    assert (req.host_id, req.message.volume, req.message.size_mb) == (7, volume, 3 * 1024 + 1)
    # Handshake finished: the clean echo is in the outbox, the request slot free.
    assert codec.slot(cluster.areas.read_block("outbox", 7), req.slot) == codec.CLEAN_MESSAGE
    assert wait_for(lambda: cluster.areas.read_block("inbox", 7) == codec.build_block([]), what="slot zeroed")


def test_failure_reply(cluster: Cluster) -> None:
    cluster.handler.fail = True
    cluster.spm()
    hsm = cluster.hsm()
    with pytest.raises(ExtendFailed):
        hsm.submit(DOMAIN, uuid.uuid4(), GiB).result(30)
    assert hsm.wait_idle(30)


def test_identical_request_joins(file_cluster: Cluster) -> None:
    file_cluster.handler.release.clear()
    file_cluster.spm()
    hsm = file_cluster.hsm()
    volume = uuid.uuid4()
    first = hsm.submit(DOMAIN, volume, GiB)
    second = hsm.submit(DOMAIN, volume, GiB)
    assert first is second
    wait_for(lambda: file_cluster.handler.count() == 1, what="request seen")
    file_cluster.handler.release.set()
    assert first.result(30) == GiB
    assert file_cluster.handler.count() == 1
    assert hsm.stats["joined"] == 1


def test_all_slots_full_then_queue(cluster: Cluster) -> None:
    cluster.handler.release.clear()
    spm = cluster.spm()
    hsm = cluster.hsm()
    futures = [hsm.submit(DOMAIN, uuid.uuid4(), GiB) for _ in range(100)]
    wait_for(lambda: spm.stats["requests"] == codec.MESSAGES_PER_BLOCK, what="63 slots in flight")
    # Handlers are held: nothing beyond the 63 slots can reach the SPM.
    assert not any(f.done() for f in futures)
    assert spm.stats["requests"] == codec.MESSAGES_PER_BLOCK
    cluster.handler.release.set()
    assert [f.result(60) for f in futures] == [GiB] * 100
    assert hsm.wait_idle(30)
    assert cluster.handler.count() == 100


def test_many_hosts(file_cluster: Cluster) -> None:
    file_cluster.spm()
    hsms = [file_cluster.hsm(host_id) for host_id in range(1, MAX_HOSTS + 1)]
    futures = [h.submit(DOMAIN, uuid.uuid4(), GiB) for h in hsms for _ in range(2)]
    assert all(f.result(120) == GiB for f in futures)
    assert {r.host_id for r in file_cluster.handler.calls} == set(range(1, MAX_HOSTS + 1))


def test_spm_restart_serves_pending(cluster: Cluster) -> None:
    cluster.handler.release.clear()
    first = cluster.spm()
    hsm = cluster.hsm()
    fut = hsm.submit(DOMAIN, uuid.uuid4(), GiB)
    wait_for(lambda: cluster.handler.count() == 1, what="request seen by first SPM")
    first.stop(timeout=0.5)  # its held handler's reply is dropped
    cluster.handler.release.set()
    cluster.spm()
    assert fut.result(30) == GiB
    assert cluster.handler.count() == 2


def test_flush_then_stop_loses_no_reply(file_cluster: Cluster) -> None:
    """A clean stop: quiesce(), flush(), stop(): the replies of the running
    handlers are on storage, so the HSM gets them with no SPM running."""
    cluster = file_cluster
    cluster.handler.release.clear()
    spm = cluster.spm()
    assert spm.flush(5)  # nothing pending: at once
    hsm = cluster.hsm()
    futures = [hsm.submit(DOMAIN, uuid.uuid4(), GiB) for _ in range(3)]
    wait_for(lambda: cluster.handler.count() == 3, what="requests seen by the SPM")
    spm.quiesce()
    later = hsm.submit(DOMAIN, uuid.uuid4(), 2 * GiB)  # not taken any more
    assert not spm.flush(0.05)  # three handlers still held
    cluster.handler.release.set()
    assert spm.flush(5)
    spm.stop()
    assert [f.result(30) for f in futures] == [GiB] * 3
    assert cluster.handler.count() == 3
    # The request that came after quiesce() is served by the next SPM.
    cluster.spm()
    assert later.result(30) == 2 * GiB


def test_flush_in_step_mode(areas: Areas) -> None:
    inbox, outbox = areas.open()
    spm = SPMMailbox(inbox, outbox, MAX_HOSTS, SPMConfig(workers=0))
    spm.register(codec.EXTEND_OPCODE, lambda req: req.message.size_mb)
    spm.reset()
    assert spm.flush(0)
    hsm_in, hsm_out = areas.open()
    hsm = HSMMailbox(hsm_in, hsm_out, 1, HSMConfig())
    hsm.start()
    try:
        fut = hsm.submit(DOMAIN, uuid.uuid4(), GiB)

        def scanned() -> bool:
            spm.scan()
            return spm.stats["requests"] == 1

        wait_for(scanned, what="the request in the inbox")
        assert not spm.flush(0)  # handled, not yet written
        spm.step()
        assert spm.flush(0)
        assert fut.result(30) == GiB
    finally:
        hsm.stop()


def test_hsm_restart_ignores_stale_replies(cluster: Cluster) -> None:
    volume = uuid.uuid4()
    # A previous run left replies in the outbox and a request in the inbox.
    stale = codec.encode(codec.Extend(DOMAIN, volume, 999))
    cluster.areas.write_block("outbox", 1, codec.build_block([stale] * 5, with_checksum=False))
    cluster.areas.write_block("inbox", 1, codec.build_block([stale]))
    hsm = cluster.hsm()
    assert cluster.areas.read_block("inbox", 1) == codec.EMPTY_BLOCK  # cleared on start
    cluster.spm()
    assert hsm.submit(DOMAIN, volume, 10 * codec.MiB).result(30) == 10 * codec.MiB
    assert hsm.wait_idle(30)
    hsm.stop()
    assert cluster.areas.read_block("inbox", 1) == codec.EMPTY_BLOCK  # cleared on stop


def test_resend_after_timeout(cluster: Cluster) -> None:
    """A request the SPM never answers is re-offered in another slot."""
    handler = cluster.handler
    stuck = threading.Event()

    def lose_first(req: Request) -> int:
        if handler.count() == 0:
            handler.calls.append(req)
            stuck.wait(60)  # this SPM worker never answers in time
            return req.message.size_mb
        return handler(req)

    spm = cluster.spm()
    spm.register(codec.EXTEND_OPCODE, lose_first)
    hsm = cluster.hsm(config=HSMConfig(reoffer_timeout=0.3))
    assert hsm.submit(DOMAIN, uuid.uuid4(), GiB).result(30) == GiB
    assert hsm.stats["reoffers"] == 1
    first, second = handler.calls
    assert first.slot != second.slot
    stuck.set()  # the late answer to the withdrawn slot must not be written
    wait_for(lambda: spm.stats["dropped"] == 1, what="stale reply dropped")


def test_stop_fails_pending_promptly(file_cluster: Cluster) -> None:
    hsm = file_cluster.hsm()  # no SPM: nothing will answer
    fut = hsm.submit(DOMAIN, uuid.uuid4(), GiB)
    start = time.monotonic()
    hsm.stop()
    assert time.monotonic() - start < 2
    with pytest.raises(MailboxStopped):
        fut.result(0)
    with pytest.raises(MailboxStopped):
        hsm.submit(DOMAIN, uuid.uuid4(), GiB)


def test_idle_hsm_does_no_io(file_cluster: Cluster) -> None:
    file_cluster.spm()
    hsm = file_cluster.hsm()
    hsm.submit(DOMAIN, uuid.uuid4(), GiB).result(30)
    assert hsm.wait_idle(30)
    before = (hsm._inbox.counters.snapshot(), hsm._outbox.counters.snapshot())
    threading.Event().wait(0.3)  # an observation window, not a wait for a condition
    assert (hsm._inbox.counters.snapshot(), hsm._outbox.counters.snapshot()) == before


def test_host_id_checks(file_areas: Areas) -> None:
    inbox, outbox = file_areas.open()
    with pytest.raises(ValueError):
        HSMMailbox(inbox, outbox, 0)
    with pytest.raises(ValueError):
        HSMMailbox(inbox, outbox, 1000)  # beyond the 1 MiB areas


def test_halt_never_writes_the_block_again(cluster: Cluster) -> None:
    """A host that lost its host id stops writing its block at once, not
    even to clear it (another host may own it now); pending requests fail."""
    hsm = cluster.hsm(host_id=3)
    cluster.handler.release.clear()  # no SPM reply: the request stays pending
    cluster.spm()
    pending = hsm.submit(DOMAIN, uuid.uuid4(), GiB)
    wait_for(lambda: cluster.handler.count() == 1, timeout=10)
    inbox, _ = cluster.areas.open()
    block = inbox.read(3 * codec.BLOCK_SIZE, codec.BLOCK_SIZE)
    assert block != codec.EMPTY_BLOCK
    hsm.halt()
    with pytest.raises(MailboxStopped):
        pending.result(timeout=10)
    with pytest.raises(MailboxStopped):
        hsm.submit(DOMAIN, uuid.uuid4(), GiB)
    hsm.stop()
    assert not hsm.alive
    assert inbox.read(3 * codec.BLOCK_SIZE, codec.BLOCK_SIZE) == block, "halted mailbox wrote its block"
