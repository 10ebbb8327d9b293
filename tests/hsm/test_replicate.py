"""Unit tests of the replication rules (xtnd.hsm.replicate) and of the pure
helpers of ``xtnd volume move``; the real path runs in test_move_guest.py."""

from __future__ import annotations

import concurrent.futures
import threading
import uuid
from typing import Any

import libvirt
import pytest
from xtnd.hsm import replicate, sizing
from xtnd.hsm.drive import Drive
from xtnd.tools import move_cli

MiB = 1024**2
GiB = 1024**3
CONFIG = sizing.SizingConfig(chunk_mb=16, utilization_percent=20)

XML = """<domain><devices>
<disk type='block' device='disk'><driver name='qemu' type='qcow2'/>
<source dev='/run/xtnd/a/b' index='1'/>
<mirror type='file' job='copy' ready='yes'><format type='qcow2'/><source file='/run/xtnd/c/d' index='3'/></mirror>
<target dev='vda' bus='virtio'/></disk>
<disk type='block' device='disk'><driver name='qemu' type='raw'/><source dev='/dev/x' index='2'/>
<target dev='vdb' bus='virtio'/></disk>
</devices></domain>"""


class FakeMailbox:
    def __init__(self, log: list[tuple[str, int]]):
        self.log = log

    def submit(self, domain: uuid.UUID, volume: uuid.UUID, size: int) -> concurrent.futures.Future[int]:
        self.log.append((str(volume), size))
        f: concurrent.futures.Future[int] = concurrent.futures.Future()
        f.set_result(size // MiB)
        return f


class FakeVolumes:
    def __init__(self, mailbox: FakeMailbox):
        self.mailbox = mailbox

    def refresh(self, domain: uuid.UUID, volume: uuid.UUID) -> int:
        return max(size for vol, size in self.mailbox.log if vol == str(volume))


class FakeMonitor:
    def __init__(self) -> None:
        self.replicating: dict[tuple[str, str], bool] = {}

    def set_replicating(self, vm_id: str, drive: str, on: bool) -> None:
        self.replicating[(vm_id, drive)] = on


class FakeDom:
    def __init__(self, vm_id: str):
        self.vm_id = vm_id

    def UUIDString(self) -> str:
        return self.vm_id

    def name(self) -> str:
        return "vm"


def replicator(dst_block: bool = True, dest_first: bool = True) -> tuple[replicate.Replicator, list[Any], FakeMonitor]:
    log: list[tuple[str, int]] = []
    mailbox = FakeMailbox(log)
    monitor = FakeMonitor()
    r = replicate.Replicator(None, mailbox, FakeVolumes(mailbox), monitor, CONFIG, dest_first=dest_first)  # type: ignore[arg-type]
    return r, log, monitor


def test_mirror_index() -> None:
    assert replicate.mirror_index(XML, "vda") == 3
    assert replicate.mirror_index(XML, "vdb") is None
    assert replicate.mirror_index(XML, "vdc") is None


def test_dest_needs() -> None:
    watermark = CONFIG.watermark(sizing.REPLICATING)  # 80% of 32 MiB
    assert replicate.dest_needs(64 * MiB, 64 * MiB - watermark, GiB, CONFIG) is None
    assert replicate.dest_needs(64 * MiB, 64 * MiB - watermark + 1, GiB, CONFIG) == 96 * MiB
    # Data beyond the destination (a copy far ahead): one chunk past the data.
    assert replicate.dest_needs(32 * MiB, 50 * MiB, GiB, CONFIG) == 82 * MiB
    # At max size nothing more.
    assert replicate.dest_needs(sizing.max_size(GiB), sizing.max_size(GiB), GiB, CONFIG) is None


def test_destination_extended_first() -> None:
    r, log, monitor = replicator()
    dst = str(uuid.uuid4())
    r.begin("vm1", "vda", True, str(uuid.uuid4()), dst, True, 32 * MiB)
    assert monitor.replicating[("vm1", "vda")] is True
    drive = Drive("vm1", "vda", 1, "/p", str(uuid.uuid4()), str(uuid.uuid4()))
    r.before_source_extend(drive, 64 * MiB)
    assert log == [(dst, 64 * MiB)]
    # Already large enough: no second request.
    r.before_source_extend(drive, 48 * MiB)
    assert log == [(dst, 64 * MiB)]
    replica = r.end("vm1", "vda", replicate.PIVOTED)
    assert (replica.extends_src, replica.extends_dst) == (2, 1)
    assert monitor.replicating[("vm1", "vda")] is False
    # Not replicating any more: the source extends alone.
    r.before_source_extend(drive, 96 * MiB)
    assert len(log) == 1


def test_history_never_shows_the_source_ahead(monkeypatch: pytest.MonkeyPatch) -> None:
    """A source extend that finds the destination already grown by another
    thread's extend is recorded after that extend, never before it."""
    r, _, _ = replicator()
    dst = str(uuid.uuid4())
    r.begin("vm1", "vda", True, str(uuid.uuid4()), dst, True, 16 * MiB)
    replica = r.get("vm1", "vda")
    assert replica is not None
    drive = Drive("vm1", "vda", 1, "/p", str(uuid.uuid4()), str(uuid.uuid4()))
    records: list[tuple[str, int]] = []
    source_done = threading.Event()

    def source_extend() -> None:
        r.before_source_extend(drive, 24 * MiB)
        source_done.set()

    def record(ev: str, **fields: Any) -> None:
        if ev != "replica_extend":
            return
        if fields["side"] == "dst":
            # The copy loop's extend is done; a source extend starts now
            # and gets every chance to record before this one does.
            threading.Thread(target=source_extend).start()
            source_done.wait(0.3)
        records.append((fields["side"], fields["size"]))

    monkeypatch.setattr(replicate.history, "record", record)
    r._extend_dst(replica, 32 * MiB, "copy")
    assert source_done.wait(5)
    assert records == [("dst", 32 * MiB), ("src", 24 * MiB)]


def test_file_destination_not_extended() -> None:
    r, log, _ = replicator()
    r.begin("vm1", "vda", True, str(uuid.uuid4()), str(uuid.uuid4()), False, 0)
    r.before_source_extend(Drive("vm1", "vda", 1, "/p", "d", "v"), 64 * MiB)
    assert log == []


def test_rule_off_only_for_tests() -> None:
    r, log, _ = replicator(dest_first=False)
    r.begin("vm1", "vda", True, str(uuid.uuid4()), str(uuid.uuid4()), True, 32 * MiB)
    r.before_source_extend(Drive("vm1", "vda", 1, "/p", "d", "v"), 64 * MiB)
    assert log == []


def test_end_unknown() -> None:
    r, _, _ = replicator()
    with pytest.raises(replicate.NotReplicating):
        r.end("vm1", "vda", replicate.ABORTED)


def test_threshold_and_job_events() -> None:
    r, _, _ = replicator()
    replica = r.begin("vm1", "vda", False, str(uuid.uuid4()), str(uuid.uuid4()), True, 32 * MiB)
    dom = FakeDom("vm1")
    # No mirror index known yet: the event is the source's.
    assert not r.block_threshold(dom, "vda[3]")
    replica.dst_index = 3
    assert not r.block_threshold(dom, "vda[1]")
    assert not r.block_threshold(FakeDom("vm2"), "vda[3]")
    assert r.block_threshold(dom, "vda[3]")
    assert replica.dst_crossed
    r.block_job(dom, "vda", libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COPY, libvirt.VIR_DOMAIN_BLOCK_JOB_READY)
    assert replica.phase == replicate.READY
    r.block_job(dom, "vda", libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COPY, libvirt.VIR_DOMAIN_BLOCK_JOB_COMPLETED)
    assert replica.phase == replicate.PIVOTED


def test_move_helpers() -> None:
    disk = move_cli.find_disk(XML, "vda")
    assert (disk.type, disk.path, disk.format) == ("block", "/run/xtnd/a/b", "qcow2")
    with pytest.raises(move_cli.MoveError):
        move_cli.find_disk(XML, "vdz")
    assert move_cli.has_mirror(XML, "vda") == (True, True)
    assert move_cli.has_mirror(XML, "vdb") == (False, False)
    moved = move_cli.retarget(XML, "vda", False, "/run/xtnd/c/d")
    assert move_cli.find_disk(moved, "vda") == move_cli.Disk("vda", "file", "/run/xtnd/c/d", "qcow2")
    assert move_cli.find_disk(moved, "vdb").path == "/dev/x"
    assert 'type="block"' in move_cli.dest_xml(True, "/p", "qcow2")
    chunk = CONFIG.chunk(sizing.REPLICATING)
    # Allocation plus a chunk; never below a block source; at most the max size.
    assert move_cli.initial_size(GiB, 10 * MiB, 16 * MiB, True, chunk) == 42 * MiB
    assert move_cli.initial_size(GiB, 10 * MiB, 96 * MiB, True, chunk) == 96 * MiB
    assert move_cli.initial_size(GiB, 10 * MiB, 96 * MiB, False, chunk) == 42 * MiB
    assert move_cli.initial_size(64 * MiB, 60 * MiB, 64 * MiB, True, chunk) == sizing.max_size(64 * MiB)


class FakeHsm:
    """The HSM's control socket as the move sees it; forgets the copy once (a restart)."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.known = False

    def call(self, op: str, **args: Any) -> Any:
        self.calls.append(op)
        if op == "replicate_start":
            self.known = True
        if op in ("replicate_start", "replicate_status"):
            return {"extends_src": 1, "extends_dst": 2} if self.known else None
        raise AssertionError(op)


class CopyDom:
    def blockJobInfo(self, disk: str, flags: int) -> dict[str, int]:
        return {"cur": 10 * MiB, "end": 10 * MiB}

    def XMLDesc(self, flags: int) -> str:
        return XML


def bare_mover(tmp_path: Any, hsm: Any, out: list[str] | None = None) -> move_cli.Mover:
    mover = move_cli.Mover.__new__(move_cli.Mover)
    mover.out = (out if out is not None else []).append
    mover.cancel = threading.Event()
    mover.progress = move_cli.Progress()
    mover.hsm = hsm
    link = tmp_path / "dst"
    link.write_bytes(b"\0" * 4096)
    mover._link = str(link)
    mover._replica = {"vm_uuid": "vm1", "drive": "vda"}
    mover._hsm_away = False
    return mover


def test_move_tells_a_restarted_hsm_again(tmp_path: Any) -> None:
    """The HSM forgot the copy (restarted): the move registers it again, or
    nothing would extend the destination ahead of the copy."""
    mover = bare_mover(tmp_path, FakeHsm())
    mover._wait_ready(CopyDom(), "vm1", "vda")
    assert mover.hsm.calls == ["replicate_status", "replicate_start"]  # type: ignore[attr-defined]
    assert (mover.progress.extends_src, mover.progress.extends_dst, mover.progress.phase) == (1, 2, "ready")


class AwayHsm:
    """An HSM that does not answer (killed, restarting) for `away` calls, then knows the copy."""

    def __init__(self, away: int, error: Exception):
        self.away = away
        self.error = error
        self.calls = 0

    def call(self, op: str, **args: Any) -> Any:
        assert op == "replicate_status", op
        self.calls += 1
        if self.calls <= self.away:
            raise self.error
        return {"extends_src": 3, "extends_dst": 4}


class SlowCopyDom(CopyDom):
    """Ready only on the 4th look, so the move polls the HSM several times."""

    def __init__(self) -> None:
        self.looks = 0

    def XMLDesc(self, flags: int) -> str:
        self.looks += 1
        return XML if self.looks >= 4 else XML.replace(" ready='yes'", "")


@pytest.mark.parametrize(
    "error", [ConnectionRefusedError(111, "refused"), move_cli.hsm_control.ControlError("Disconnected", "gone")]
)
def test_move_waits_for_an_hsm_that_does_not_answer(tmp_path: Any, error: Exception) -> None:
    """The HSM restarts during the copy: the move goes on (it used to abort
    the copy), says so once, and takes the HSM's figures when it is back."""
    out: list[str] = []
    mover = bare_mover(tmp_path, AwayHsm(2, error), out)
    move_cli.POLL, saved = 0.0, move_cli.POLL
    try:
        mover._wait_ready(SlowCopyDom(), "vm1", "vda")
    finally:
        move_cli.POLL = saved
    assert [line for line in out if "HSM" in line] == [
        f"the HSM does not answer ({error}): the copy goes on, waiting for it",
        "the HSM answers again",
    ]
    assert (mover.progress.extends_src, mover.progress.extends_dst, mover.progress.phase) == (3, 4, "ready")


def test_move_stops_on_an_hsm_refusal(tmp_path: Any) -> None:
    """An HSM that answers with an error is not 'away': the move fails (and aborts)."""
    mover = bare_mover(tmp_path, AwayHsm(1, move_cli.hsm_control.ControlError("NotReplicating", "no")))
    with pytest.raises(move_cli.hsm_control.ControlError):
        mover._wait_ready(CopyDom(), "vm1", "vda")


ADOPT_XML = """<domain><devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/f/src' index='1'/>
<mirror type='block' job='copy'><format type='qcow2'/><source dev='{run}/{sd}/{vol}' index='4'/></mirror>
<target dev='vda' bus='virtio'/></disk>
<disk type='block' device='disk'><driver name='qemu' type='qcow2'/><source dev='/dev/y' index='2'/>
<mirror type='block' job='copy' ready='yes'><format type='qcow2'/><source dev='/elsewhere/x' index='5'/></mirror>
<target dev='vdb' bus='virtio'/></disk>
</devices></domain>"""


class AdoptDom(FakeDom):
    def __init__(self, vm_id: str, xml: str):
        super().__init__(vm_id)
        self.xml = xml

    def XMLDesc(self, flags: int) -> str:
        return self.xml


class AdoptConn:
    def __init__(self, doms: list[AdoptDom]):
        self.doms = doms

    def listAllDomains(self, flags: int) -> list[AdoptDom]:
        return self.doms


def test_adopt_copies_found_in_libvirt(tmp_path: Any) -> None:
    """A restarted HSM registers the copies libvirt runs to volume links of
    its run dir (not others), once; an adopted copy ends with its job."""
    sd, vol = uuid.uuid4(), uuid.uuid4()
    run = tmp_path / "run"
    (run / str(sd)).mkdir(parents=True)
    (run / str(sd) / str(vol)).write_bytes(b"\0" * (3 * MiB))
    conn = AdoptConn([AdoptDom("vm1", ADOPT_XML.format(run=run, sd=sd, vol=vol))])
    r, _, monitor = replicator()
    [replica] = r.adopt(conn, str(run))
    assert (replica.vm_id, replica.drive, replica.src_block, replica.dst_block) == ("vm1", "vda", False, True)
    assert (replica.dst_domain, replica.dst_volume, replica.dst_physical) == (str(sd), str(vol), 3 * MiB)
    assert replica.adopted and replica.phase == replicate.COPYING
    assert monitor.replicating == {("vm1", "vda"): True}
    assert r.adopt(conn, str(run)) == []  # known now
    r.block_job(FakeDom("vm1"), "vda", 0, libvirt.VIR_DOMAIN_BLOCK_JOB_CANCELED)
    assert r.get("vm1", "vda") is None and monitor.replicating == {("vm1", "vda"): False}
