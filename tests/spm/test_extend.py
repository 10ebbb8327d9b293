"""The extend service in-process against real LVM (no sanlock, no mailbox).

The lease is a small fake here: these tests drive fence() failures and
per-volume ordering precisely; test_daemon.py covers the real lease.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import pytest
from xtnd import lvm, storage
from xtnd.mailbox import codec
from xtnd.mailbox.spm import NoReply, Request
from xtnd.spm.domains import DomainRegistry
from xtnd.spm.extend import ExtendService, Refused
from xtnd.spm.lease import LeaseLost
from xtnd.tools.rig.spmd import EXTENT, MiB, Pool


class FakeLease:
    def __init__(self) -> None:
        self.fences = 0
        self.lost: str | None = None

    def fence(self) -> None:
        self.fences += 1
        if self.lost:
            raise LeaseLost(self.lost)


def make_service(
    pool: Pool, lease: FakeLease, fenced: list[str], extra: dict[uuid.UUID, storage.Domain] | None = None
) -> ExtendService:
    domains: dict[uuid.UUID, storage.Domain] = {pool.uuid: pool.domain, **(extra or {})}
    registry = DomainRegistry(domains.__getitem__, list(domains), ttl=60)
    return ExtendService(registry, lease.fence, fenced.append)


def request(domain: uuid.UUID, volume: uuid.UUID, size: int, slot: int = 0) -> Request:
    msg = codec.Extend(domain, volume, size // MiB)
    return Request(1, slot, msg, codec.encode(msg), time.monotonic())


def lvextends(pool: Pool) -> int:
    return sum(1 for r in pool.domain.runner.history.records() if "lvextend" in r.argv)


@pytest.fixture
def lease() -> FakeLease:
    return FakeLease()


@pytest.fixture(autouse=True, params=["shell", "process"])
def lvm_mode(request: pytest.FixtureRequest, pool: Pool) -> Iterator[str]:
    """The SPM's LVM commands through an LVM shell ([lvm] shell = true) or processes."""
    shell = lvm.LvmShell("test-spm-lvm") if request.param == "shell" else None
    pool.domain.runner.shell = shell
    try:
        yield request.param
    finally:
        pool.domain.runner.shell = None
        if shell is not None:
            shell.close()


def test_extend_and_noop(pool: Pool, lease: FakeLease) -> None:
    vol = pool.create_volume()
    service = make_service(pool, lease, [])
    assert service.handle(request(pool.uuid, vol, 17 * MiB)) == 20
    assert pool.lv_size(vol) == 20 * MiB
    assert lease.fences == 1
    # Served from the volume cache: no LVM command at all.
    before = len(pool.domain.runner.history.records())
    assert service.handle(request(pool.uuid, vol, 12 * MiB)) == 20
    assert len(pool.domain.runner.history.records()) == before
    assert lease.fences == 1
    snap = service.metrics.snapshot()
    assert snap["results"]["extended"] == 1 and snap["results"]["noop"] == 1
    assert snap["lvextend"]["count"] == 1


def test_lease_lost_no_lvm(pool: Pool, lease: FakeLease) -> None:
    vol = pool.create_volume()
    fenced: list[str] = []
    service = make_service(pool, lease, fenced)
    lease.lost = "storage gone"
    before = lvextends(pool)
    with pytest.raises(LeaseLost):
        service.handle(request(pool.uuid, vol, 40 * MiB))
    assert fenced == ["storage gone"]
    assert lvextends(pool) == before
    assert pool.lv_size(vol) == 8 * MiB
    assert service.metrics.snapshot()["results"]["fenced"] == 1


def test_same_volume_serialized_then_idempotent(pool: Pool, lease: FakeLease) -> None:
    """Concurrent requests for one volume: one lvextend, the others see the result."""
    vol = pool.create_volume()
    service = make_service(pool, lease, [])
    results: list[int] = []
    threads = [
        threading.Thread(target=lambda: results.append(service.handle(request(pool.uuid, vol, 40 * MiB))))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [40] * 4
    assert lvextends(pool) == 1
    assert pool.lv_size(vol) == 40 * MiB


def test_volumes_in_parallel(pool: Pool, lease: FakeLease) -> None:
    """Different volumes do not wait for each other's lock."""
    vols = [pool.create_volume() for _ in range(3)]
    service = make_service(pool, lease, [])
    gate = threading.Event()
    entered: list[str] = []
    real_fence = lease.fence

    def slow_fence() -> None:
        # The first extend holds its volume's lock until the others got theirs.
        entered.append(threading.current_thread().name)
        if len(entered) == 1:
            assert gate.wait(60)
        elif len(entered) == len(vols):
            gate.set()
        real_fence()

    service._fence = slow_fence
    threads = [
        threading.Thread(target=service.handle, args=(request(pool.uuid, v, 12 * MiB),), name=str(i))
        for i, v in enumerate(vols)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert gate.is_set()
    assert [pool.lv_size(v) for v in vols] == [12 * MiB] * 3


def test_refusals_before_lvm(pool: Pool, lease: FakeLease) -> None:
    vol = pool.create_volume(capacity=100 * MiB)
    special = uuid.uuid4()
    lvm.lvcreate(pool.domain.runner, pool.domain.vg, str(special), 8 * MiB, ("xtnd_special",))
    service = make_service(pool, lease, [])
    cases: list[tuple[Request, str]] = [
        (request(uuid.uuid4(), vol, 20 * MiB), "not managed by this SPM"),
        (request(pool.uuid, uuid.uuid4(), 20 * MiB), "unknown volume"),
        (request(pool.uuid, special, 20 * MiB), "special LV"),
        (request(pool.uuid, vol, 111 * MiB), "above max size"),
    ]
    for req, reason in cases:
        with pytest.raises(Refused, match=reason):
            service.handle(req)
    assert lease.fences == 0
    assert lvextends(pool) == 0
    assert service.metrics.snapshot()["results"]["refused"] == len(cases)


def test_new_volume_found_after_cache_load(pool: Pool, lease: FakeLease) -> None:
    service = make_service(pool, lease, [])
    first = pool.create_volume()
    assert service.handle(request(pool.uuid, first, 12 * MiB)) == 12
    # Created behind the SPM's back after the cache was loaded: one reload finds it.
    second = pool.create_volume()
    assert service.handle(request(pool.uuid, second, 12 * MiB)) == 12


def test_stale_cache_is_harmless(pool: Pool, lease: FakeLease) -> None:
    """Someone else grew the LV: lvextend says "not larger", the real size is answered."""
    vol = pool.create_volume()
    service = make_service(pool, lease, [])
    assert service.handle(request(pool.uuid, vol, 12 * MiB)) == 12
    lvm.extend(pool.domain.runner, pool.domain.vg, str(vol), 40 * MiB)
    assert service.handle(request(pool.uuid, vol, 20 * MiB)) == 40


def test_no_free_extents(pool: Pool, lease: FakeLease) -> None:
    vol = pool.create_volume(capacity=4000 * MiB)
    lvm.lvcreate(pool.domain.runner, pool.domain.vg, "filler", pool.free_extents() * EXTENT)
    service = make_service(pool, lease, [])
    with pytest.raises(Exception, match="needed=3 free=0"):
        service.handle(request(pool.uuid, vol, 20 * MiB))
    assert pool.lv_size(vol) == 8 * MiB
    assert service.metrics.snapshot()["results"]["failed"] == 1


def test_file_domain(pool: Pool, lease: FakeLease, workdir: str) -> None:
    fd = storage.create_file_domain(uuid.uuid4(), workdir)
    vol = uuid.uuid4()
    fd.create_volume(vol, 100 * MiB, "raw")
    service = make_service(pool, lease, [], {fd.uuid: fd})
    assert service.handle(request(fd.uuid, vol, 50 * MiB)) == 50
    with pytest.raises(Refused, match="unknown volume"):
        service.handle(request(fd.uuid, uuid.uuid4(), 50 * MiB))
    with pytest.raises(Refused, match="above max size"):
        service.handle(request(fd.uuid, vol, 200 * MiB))
    assert lease.fences == 0


def test_drain_parks_new_requests(pool: Pool, lease: FakeLease) -> None:
    vol = pool.create_volume()
    service = make_service(pool, lease, [])
    assert service.drain(timeout=5)
    # Never answered, never extended: the next SPM serves it.
    with pytest.raises(NoReply):
        service.handle(request(pool.uuid, vol, 40 * MiB))
    assert service.parked == 1
    assert pool.lv_size(vol) == 8 * MiB
    assert lease.fences == 0
