"""Monitor logic with fakes (testlib/hsmfakes.py): triggers, resume rules, retries.

Jobs run inline (workers=0) and time comes from a fake clock, so each test
steps the monitor through one situation deterministically. The real
thing, with libvirtd, QEMU and LVM, is tested in test_hsm_guest.py.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import libvirt
import pytest
from testlib.hsmfakes import RUN, FakeConn, FakeConnection, FakeDisk, FakeDomain, FakeSPM, GiB, MiB, disk_xml
from xtnd.common import history
from xtnd.hsm import links, sizing
from xtnd.hsm.drive import DisabledReason, State
from xtnd.hsm.metrics import parse_line
from xtnd.hsm.monitor import Monitor, MonitorConfig
from xtnd.tools.inject.checker import check

# Fixed: these tests count extends of a known chunk (adaptive has its own).
CHUNK = sizing.SizingConfig(chunk_mb=16, utilization_percent=20, policy="fixed")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


class Rig:
    def __init__(self, clock: Clock, *domains: FakeDomain, sizing_config: sizing.SizingConfig = CHUNK):
        self.conn = FakeConn(*domains)
        self.connection = FakeConnection(self.conn)
        self.spm = FakeSPM(self.conn)
        config = MonitorConfig(sizing=sizing_config, run_dir=RUN, workers=0, backoff_initial=1.0, backoff_max=4.0)
        self.monitor = Monitor(self.connection, self.spm, self.spm, config, clock=clock)
        self.monitor.start(stats_thread=False)

    def drive(self, dom: FakeDomain, name: str = "vda") -> State:
        return self.monitor.snapshot()[dom.UUIDString()][name].state


@pytest.fixture
def make(clock: Clock) -> Iterator[object]:
    rigs: list[Rig] = []

    def factory(*domains: FakeDomain) -> Rig:
        rig = Rig(clock, *domains)
        rigs.append(rig)
        rig.monitor.connected(rig.conn)
        return rig

    yield factory
    for rig in rigs:
        rig.monitor.stop()


def test_connect_arms_threshold(make: object) -> None:
    dom = FakeDomain("vm", FakeDisk("vda", physical=16 * MiB))
    rig = make(dom)  # type: ignore[operator]
    # watermark = 16 MiB * 80% = 12.8 MiB
    assert dom.thresholds == [("vda[1]", 16 * MiB - 16 * MiB * 80 // 100)]
    assert rig.drive(dom) is State.ARMED
    assert rig.spm.requests == []


def test_only_linked_qcow2_disks_are_watched(make: object) -> None:
    other = disk_xml("vdb", 2, "/var/lib/images/vm.qcow2") + disk_xml("vdc", 3, RUN + "/not-a-uuid/x")
    raw = FakeDisk("vdd")
    dom = FakeDomain("vm", FakeDisk("vda"), extra_xml=other + disk_xml("vdd", 4, raw.path, fmt="raw"))
    rig = make(dom)  # type: ignore[operator]
    assert set(rig.monitor.snapshot()[dom.UUIDString()]) == {"vda"}


def test_threshold_event_extends_and_rearms(make: object, caplog: pytest.LogCaptureFixture) -> None:
    disk = FakeDisk("vda", physical=16 * MiB, allocation=1 * MiB)
    dom = FakeDomain("vm", disk)
    rig = make(dom)  # type: ignore[operator]
    disk.allocation, disk.threshold = 5 * MiB, None  # crossed: libvirt dropped it
    caplog.set_level("INFO", "xtnd.hsm")
    calls = rig.conn.list_calls
    armed = dom.thresholds[-1][1]
    rig.monitor.block_threshold(dom, "vda[1]", disk.path, armed, 5 * MiB - armed)
    assert rig.spm.requests == [(disk.volume, 32 * MiB)]
    # The event's numbers sized the extend: fresh stats only for the recheck after it.
    assert rig.monitor.counters["checks_from_event"] == 1
    assert rig.conn.list_calls == calls + 1
    assert disk.physical == 32 * MiB
    assert dom.thresholds[-1] == ("vda[1]", 32 * MiB - 16 * MiB * 80 // 100)
    # Set for the size storage has while the device still grew (overlapped).
    assert dom.armed_at_physical[-1] == 16 * MiB
    assert rig.drive(dom) is State.ARMED
    assert dom.resumes == 0
    (line,) = [r.message for r in caplog.records if r.message.startswith("extend-complete")]
    fields = parse_line(line)
    assert fields["vm"] == "vm" and fields["drive"] == "vda" and fields["trigger"] == "threshold"
    assert (fields["old_mb"], fields["new_mb"], fields["resumed"]) == ("16", "32", "no")
    assert {"wait_ms", "extend_ms", "refresh_ms", "resume_ms", "total_ms"} <= set(fields)


def test_enospc_pause_extends_and_resumes(make: object) -> None:
    disk = FakeDisk("vda", physical=16 * MiB, allocation=1 * MiB)
    dom = FakeDomain("vm", disk)
    rig = make(dom)  # type: ignore[operator]
    disk.allocation = 16 * MiB
    dom.pause_enospc("vda")
    rig.monitor.io_error(dom, disk.path, "virtio-disk0", libvirt.VIR_DOMAIN_EVENT_IO_ERROR_PAUSE, "enospc")
    assert rig.spm.requests[0] == (disk.volume, 32 * MiB)
    assert dom.resumes == 1
    assert rig.monitor.records[0].trigger == "enospc" and rig.monitor.records[0].resumed


def test_user_paused_vm_is_not_resumed(make: object) -> None:
    disk = FakeDisk("vda", physical=16 * MiB, allocation=1 * MiB)
    dom = FakeDomain("vm", disk)
    rig = make(dom)  # type: ignore[operator]
    dom.suspend()
    disk.allocation, disk.threshold = 5 * MiB, None
    rig.monitor.block_threshold(dom, "vda[1]", disk.path, 3 * MiB, 2 * MiB)
    assert disk.physical == 32 * MiB
    assert dom.resumes == 0
    assert dom.state() == [libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_USER]


def test_pause_for_another_reason_is_not_resumed(make: object) -> None:
    a, b = FakeDisk("vda"), FakeDisk("vdb")
    dom = FakeDomain("vm", a, b)
    rig = make(dom)  # type: ignore[operator]
    a.allocation = 16 * MiB
    dom.pause_enospc("vda")
    dom.errors["vdb"] = libvirt.VIR_DOMAIN_DISK_ERROR_UNSPEC  # an EIO: not ours to fix
    rig.monitor.tick()
    assert a.physical == 32 * MiB
    assert dom.resumes == 0


def test_failures_retry_with_capped_backoff_then_resume(make: object, clock: Clock) -> None:
    disk = FakeDisk("vda", physical=16 * MiB, allocation=1 * MiB)
    dom = FakeDomain("vm", disk)
    rig = make(dom)  # type: ignore[operator]
    disk.allocation = 16 * MiB
    rig.spm.fail = True
    dom.pause_enospc("vda")
    rig.monitor.tick()
    delays = []
    for _ in range(5):
        (t,) = rig.monitor._vms[dom.UUIDString()].drives.values()
        assert t.retry_at is not None
        delays.append(t.retry_at - clock.now)
        rig.monitor.tick()  # not due yet: nothing sent
        sent = len(rig.spm.requests)
        clock.now = t.retry_at
        rig.monitor.tick()
        assert len(rig.spm.requests) == sent + 1
    assert delays == [1.0, 2.0, 4.0, 4.0, 4.0]
    assert dom.resumes == 0
    rig.spm.fail = False  # space was added
    (t,) = rig.monitor._vms[dom.UUIDString()].drives.values()
    clock.now = t.retry_at or clock.now
    rig.monitor.tick()
    assert dom.resumes == 1
    assert rig.monitor.records[-1].trigger == "retry"
    assert rig.drive(dom) is State.ARMED


def test_improbable_allocation_pauses_and_refuses(make: object) -> None:
    disk = FakeDisk("vda", physical=16 * MiB, allocation=1 * MiB)
    dom = FakeDomain("vm", disk)
    rig = make(dom)  # type: ignore[operator]
    disk.allocation, disk.threshold = 100 * MiB, None  # beyond physical + chunk
    rig.monitor.block_threshold(dom, "vda[1]", disk.path, 3 * MiB, 97 * MiB)
    assert rig.spm.requests == []
    assert dom.suspends == 1
    drive = rig.monitor.snapshot()[dom.UUIDString()]["vda"]
    assert drive.state is State.DISABLED
    assert drive.disabled_reason is DisabledReason.IMPROBABLE_ALLOCATION


def test_at_max_size_is_disabled(make: object) -> None:
    capacity = 64 * MiB
    disk = FakeDisk("vda", capacity=capacity, physical=sizing.max_size(capacity), allocation=70 * MiB)
    dom = FakeDomain("vm", disk)
    rig = make(dom)  # type: ignore[operator]
    assert rig.spm.requests == []
    drive = rig.monitor.snapshot()[dom.UUIDString()]["vda"]
    assert drive.disabled_reason is DisabledReason.AT_MAX_SIZE


def test_stats_pass_catches_missed_threshold(make: object) -> None:
    disk = FakeDisk("vda", physical=16 * MiB, allocation=1 * MiB)
    dom = FakeDomain("vm", disk)
    rig = make(dom)  # type: ignore[operator]
    disk.allocation, disk.threshold = 6 * MiB, None  # the event was lost
    rig.monitor.tick()
    assert rig.spm.requests == [(disk.volume, 32 * MiB)]
    assert rig.monitor.records[0].trigger == "stats"
    assert rig.conn.bulk_calls == 1


def test_check_of_a_vm_that_just_stopped(make: object, caplog: pytest.LogCaptureFixture) -> None:
    """A check scheduled before the VM stopped: libvirt lists no stats for a
    stopped domain, and the check ends quietly (found by xtnd inject: a
    guest powering off right after a threshold)."""
    disk = FakeDisk("vda", physical=16 * MiB, allocation=1 * MiB)
    dom = FakeDomain("vm", disk)
    rig = make(dom)  # type: ignore[operator]
    dom.active = False
    caplog.set_level("DEBUG", "xtnd.hsm")
    armed = dom.thresholds[-1][1]
    rig.monitor.block_threshold(dom, "vda[1]", disk.path, armed, 1 * MiB)  # sized from the event
    rig.monitor.block_threshold(dom, "vda[1]", disk.path, 3 * MiB, 2 * MiB)  # from stats: not the armed one
    assert rig.spm.requests == []
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "WARNING")]
    assert any("vm gone before its check" in r.message for r in caplog.records)


def test_threshold_event_not_ours_reads_stats(make: object) -> None:
    """An event for another threshold or image than the one armed (late, or
    from before a snapshot) is no measure of the drive: fresh stats decide."""
    disk = FakeDisk("vda", physical=16 * MiB, allocation=1 * MiB)
    dom = FakeDomain("vm", disk)
    rig = make(dom)  # type: ignore[operator]
    armed = dom.thresholds[-1][1]
    calls = rig.conn.list_calls
    rig.monitor.block_threshold(dom, "vda[1]", disk.path, armed + 1, 1 * MiB)
    rig.monitor.block_threshold(dom, "vda[2]", disk.path, armed, 1 * MiB)
    rig.monitor.block_threshold(dom, "vda[1]", "/elsewhere", armed, 1 * MiB)
    assert rig.conn.list_calls >= calls + 3
    assert rig.monitor.counters["checks_from_event"] == 0


def test_reconnect_rearms(make: object) -> None:
    disk = FakeDisk("vda")
    dom = FakeDomain("vm", disk)
    rig = make(dom)  # type: ignore[operator]
    armed = len(dom.thresholds)
    rig.monitor.disconnected()
    rig.monitor.connected(rig.conn)
    assert len(dom.thresholds) == armed + 1
    assert rig.drive(dom) is State.ARMED


def test_vm_started_and_stopped(make: object) -> None:
    rig = make()  # type: ignore[operator]
    dom = FakeDomain("late", FakeDisk("vda", capacity=2 * GiB))
    rig.conn.domains[dom.UUIDString()] = dom
    rig.monitor.lifecycle(dom, libvirt.VIR_DOMAIN_EVENT_STARTED, libvirt.VIR_DOMAIN_EVENT_STARTED_MIGRATED)
    assert rig.drive(dom) is State.ARMED
    rig.monitor.lifecycle(dom, libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN)
    assert rig.monitor.snapshot() == {}


def test_snapshot_moves_watch_to_new_top(make: object) -> None:
    """A new top image (snapshot, or a pivot) gets its own drive, armed on its index."""
    disk = FakeDisk("vda")
    dom = FakeDomain("vm", disk)
    rig = make(dom)  # type: ignore[operator]
    rig.monitor.tick()
    assert rig.monitor.counters["reloads"] == 0
    old_volume = disk.volume
    disk.volume = uuid.uuid4()
    disk.path = links.link_path(disk.domain, disk.volume, RUN)
    disk.index = 3
    disk.threshold = None
    rig.monitor.tick()
    assert rig.monitor.counters["reloads"] == 1
    drive = rig.monitor.snapshot()[dom.UUIDString()]["vda"]
    assert (drive.index, drive.volume_id) == (3, str(disk.volume))
    assert drive.volume_id != str(old_volume)
    assert dom.thresholds[-1][0] == "vda[3]"
    assert drive.state is State.ARMED
    # Settled: further passes read nothing again.
    rig.monitor.tick()
    rig.monitor.tick()
    assert rig.monitor.counters["reloads"] == 1


def test_hotplug_and_unplug(make: object) -> None:
    dom = FakeDomain("vm", FakeDisk("vda"))
    rig = make(dom)  # type: ignore[operator]
    rig.monitor.tick()
    vdb = FakeDisk("vdb")
    dom.disks["vdb"] = vdb
    rig.monitor.tick()
    assert set(rig.monitor.snapshot()[dom.UUIDString()]) == {"vda", "vdb"}
    assert dom.thresholds[-1][0] == "vdb[1]"
    del dom.disks["vdb"]
    rig.monitor.tick()
    assert set(rig.monitor.snapshot()[dom.UUIDString()]) == {"vda"}
    assert rig.monitor.counters["reloads"] == 2


def test_unwatched_disk_does_not_reload_every_pass(make: object) -> None:
    """A linked raw disk is not watched; its presence alone triggers nothing."""
    raw = FakeDisk("vdc")
    dom = FakeDomain("vm", FakeDisk("vda"), extra_xml=disk_xml("vdc", 1, raw.path, fmt="raw"))
    plain_stats = dom.stats

    def stats_with_raw() -> dict[str, object]:
        s = plain_stats()
        p = f"block.{s['block.count']}."
        s["block.count"] += 1
        s.update({p + "name": "vdc", p + "path": raw.path, p + "backingIndex": 1, p + "capacity": 1 * GiB})
        return s

    dom.stats = stats_with_raw  # type: ignore[method-assign]
    rig = make(dom)  # type: ignore[operator]
    for _ in range(3):
        rig.monitor.tick()
    assert "vdc" in {b for _, raw_stats in rig.conn.getAllDomainStats(0, 0) for b in [raw_stats["block.1.name"]]}
    assert rig.monitor.counters["reloads"] == 0
    assert set(rig.monitor.snapshot()[dom.UUIDString()]) == {"vda"}


def test_pause_on_new_top_extends_the_new_volume(make: object) -> None:
    """ENOSPC on a top image the HSM has not seen yet: the old volume is
    left alone, the VM is read again and the new volume extended."""
    disk = FakeDisk("vda")
    dom = FakeDomain("vm", disk)
    rig = make(dom)  # type: ignore[operator]
    old_volume = disk.volume
    disk.volume = uuid.uuid4()
    disk.path = links.link_path(disk.domain, disk.volume, RUN)
    disk.index, disk.threshold = 2, None
    disk.allocation = disk.physical
    dom.pause_enospc("vda")
    rig.monitor.io_error(dom, disk.path, "virtio-disk0", 1, "enospc")
    assert [vol for vol, _ in rig.spm.requests] == [disk.volume]
    assert old_volume not in [vol for vol, _ in rig.spm.requests]
    assert dom.resumes == 1


def test_pause_and_resume_are_recorded_in_the_history(make: object, tmp_path: object) -> None:
    """The inject checker's VM rule reads these events (xtnd.common.history)."""
    path = os.path.join(str(tmp_path), "h.jsonl")
    disk = FakeDisk("vda", physical=16 * MiB, allocation=1 * MiB)
    dom = FakeDomain("vm", disk)
    rig = make(dom)  # type: ignore[operator]
    disk.allocation = 16 * MiB
    history.enable(path, "hsm")
    try:
        dom.pause_enospc("vda")
        rig.monitor.io_error(dom, disk.path, "virtio-disk0", libvirt.VIR_DOMAIN_EVENT_IO_ERROR_PAUSE, "enospc")
    finally:
        history.disable()
    events = history.read(path)
    assert [(e["ev"], e["vm"], e.get("reason")) for e in events if e["ev"] in ("paused", "resumed")] == [
        ("paused", dom.UUIDString(), "enospc"),
        ("resumed", dom.UUIDString(), None),
    ]
    assert check(events).ok
    # Without the resume the checker fails the trial.
    assert not check([e for e in events if e["ev"] != "resumed"]).ok


def _fast_writer(clock: Clock, policy: str, caplog: pytest.LogCaptureFixture) -> tuple[Rig, FakeDisk, list[str]]:
    """A guest writing 13 MiB/s against extends that take 0.5 s each."""
    config = sizing.SizingConfig(chunk_mb=4, utilization_percent=20, policy=policy, max_chunk_mb=64)
    disk = FakeDisk("vda", physical=16 * MiB, allocation=1 * MiB)
    dom = FakeDomain("vm", disk)
    rig = Rig(clock, dom, sizing_config=config)
    refresh = rig.spm.refresh

    def slow_refresh(domain: Any, volume: Any, verified: Any = None) -> int:
        clock.now += 0.5
        return refresh(domain, volume, verified)

    rig.spm.refresh = slow_refresh  # type: ignore[method-assign]
    caplog.set_level("INFO", "xtnd.hsm")
    try:
        rig.monitor.connected(rig.conn)
        clock.now += 1.0
        disk.allocation, disk.threshold = 14 * MiB, None
        rig.monitor.block_threshold(dom, "vda[1]", disk.path, 12 * MiB, 1 * MiB)
    finally:
        rig.monitor.stop()
    lines = [r.message for r in caplog.records if r.message.startswith("extend-complete")]
    return rig, disk, lines


def test_adaptive_chunk_grows_for_a_fast_writer(clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    rig, disk, lines = _fast_writer(clock, "adaptive", caplog)
    sizes = [size for _, size in rig.spm.requests]
    # No latency known yet: the first extend is the floor (16 + 4 MiB).
    assert sizes[0] == 20 * MiB
    # Then rate x latency says the headroom is too small: it extends again
    # at once, by more than the floor, never by more than the cap.
    assert len(sizes) >= 2 and sizes[1] - sizes[0] > 4 * MiB
    assert all(0 < b - a <= 64 * MiB for a, b in zip([16 * MiB, *sizes], sizes, strict=False))
    first, second = parse_line(lines[0]), parse_line(lines[1])
    assert first["chunk_mb"] == "4" and float(first["rate_mbs"]) == pytest.approx(13.0)
    assert int(second["chunk_mb"]) > 4 and float(second["rate_mbs"]) > 12.0
    assert rig.monitor.extend_latency() >= 0.5
    (drive,) = rig.monitor.drive_sizing()
    assert drive[:2] == ("vm", "vda") and drive[3] > 4 * MiB
    # The guest keeps at least rate x latency free now.
    assert disk.physical - disk.allocation >= 13 * MiB * 0.5


def test_fixed_chunk_ignores_the_rate(clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    rig, disk, lines = _fast_writer(clock, "fixed", caplog)
    assert rig.spm.requests == [(disk.volume, 20 * MiB)]
    assert parse_line(lines[0])["chunk_mb"] == "4"
