"""Live storage migration (``xtnd volume move``) of real guests' disks.

A TCG guest of the rig (xtnd.tools.rig.guest) writes its pattern to vda as
fast as it can while the disk moves between domains: block -> block,
block -> file, file -> block. The real SPM daemon (its own sanlock daemon
and lease) creates and removes the volumes and serves the extends; the
HSM runs in this process with its control socket, which the command
uses. At the end the guest reads everything back (XTND-VERIFY-OK), it
never paused, the source volume is gone and the destination's size is
within a chunk of its allocation.

The destination-first rule: with a tiny chunk, every extend of the source
is preceded by an extend of the destination to at least the same size
(read from the history of extends, xtnd.common.history); with the rule
off the order check fails.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import libvirt
import pytest
from testlib import cli
from testlib.hsmrun import Pauses, Running, running
from xtnd import storage
from xtnd.common import history
from xtnd.hsm import control, links, sizing
from xtnd.hsm.libvirtconn import EventLoop
from xtnd.tools.rig import guest, hsmrig, loops, spmd
from xtnd.tools.rig.sanlockd import SanlockDaemon

MiB = 1024**2
GiB = 1024**3

log = logging.getLogger("test")

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]


# The SPM daemon manages every domain of the storage config, not only the master.
ALL_DOMAINS = {"spm.domains": "*"}


@dataclasses.dataclass
class Domains:
    pool: hsmrig.Pool
    block2: storage.BlockDomain
    file: storage.FileDomain


@pytest.fixture
def domains(workdir: str, pool: hsmrig.Pool) -> Iterator[Domains]:
    """The pool's master block domain, a second block domain and a file domain."""
    d2dir = os.path.join(workdir, "d2")
    os.makedirs(d2dir)
    with loops.loop_pvs(d2dir, count=1, size=512 * MiB) as pvs, hsmrig.block_domain(pvs, pool.run_dir) as block2:
        sd3 = uuid.uuid4()
        file = storage.create_file_domain(
            sd3, os.path.join(workdir, "files"), max_hosts=hsmrig.MAX_HOSTS, io_timeout=spmd.IO_TIMEOUT
        )
        host = storage.HostConfig.load(pool.storage_config)
        host.add_block(block2.uuid, pvs)
        host.add_file(sd3, os.path.join(workdir, "files"))
        host.save()
        yield Domains(pool, block2, file)


@contextlib.contextmanager
def running_hsm(pool: hsmrig.Pool, events: EventLoop, chunk_mb: int, dest_first: bool = True) -> Iterator[Running]:
    """The in-process HSM with its control socket, and an hsm.conf for the CLI."""
    config = pool.config(chunk_mb=chunk_mb)
    pool.write_config(config, os.path.join(pool.workdir, "hsm.conf"))
    with running(config, events, dest_first) as r:
        server = control.ControlServer(config.host.control_socket, control.ops(r.hsm), name="test-hsm-control")
        server.start()
        try:
            yield r
        finally:
            server.stop()


@pytest.fixture
def spm_env(monkeypatch: pytest.MonkeyPatch, domains: Domains) -> str:
    """Volume commands of the CLI go to the test SPM daemon's socket."""
    path = os.path.join(domains.pool.workdir, f"spm{hsmrig.HOST_ID}.sock")
    monkeypatch.setenv("XTND_SPM_SOCKET", path)
    return path


@pytest.fixture
def hist(workdir: str) -> Iterator[str]:
    path = os.path.join(workdir, "history.jsonl")
    history.enable(path, "test")
    yield path
    history.disable()


def move_argv(g: guest.Guest, to: uuid.UUID, pool: hsmrig.Pool, bandwidth: int = 0) -> list[str]:
    return ["volume", "move", "--vm", g.name, "--disk", "vda", "--to-domain", str(to), "--json",
            "--hsm-config", os.path.join(pool.workdir, "hsm.conf"), "--bandwidth", str(bandwidth)]  # fmt: skip


def gone(d: storage.Domain, volume: uuid.UUID) -> bool:
    try:
        d.volume_info(volume)
    except storage.VolumeNotFound:
        return True
    return False


def extends_in_order(path: str, vm_id: str) -> tuple[int, int, list[str]]:
    """(source extends, destination extends, violations of destination-first)."""
    events = history.read(path)
    # The destination's size when the copy started.
    dst_size = max(
        (int(e["dst_size"]) for e in events if e["ev"] == "replicate" and e.get("vm") == vm_id and "dst_size" in e),
        default=0,
    )
    events = [e for e in events if e["ev"] == "replica_extend" and e.get("vm") == vm_id]
    bad = []
    src = dst = 0
    for e in events:
        if e["side"] == "dst":
            dst += 1
            dst_size = max(dst_size, int(e["size"]))
        else:
            src += 1
            if dst_size < int(e["size"]):
                bad.append(f"source to {int(e['size']) // MiB} MiB while the destination was {dst_size // MiB} MiB")
    return src, dst, bad


def image_end(path: str) -> int:
    """Where the qcow2 image ends (its allocation), the guest shut off."""
    out = subprocess.run(["qemu-img", "check", "--output=json", path], capture_output=True, text=True).stdout
    return int(json.loads(out)["image-end-offset"])


@dataclasses.dataclass
class Setup:
    domains: Domains
    spm_host: SanlockDaemon
    conn: libvirt.virConnect
    rig: guest.Rig
    events: EventLoop
    workdir: str
    hist: str


@pytest.fixture
def setup(
    domains: Domains, spm_host: SanlockDaemon, spm_env: str, conn: libvirt.virConnect, rig: guest.Rig,
    libvirt_events: EventLoop, workdir: str, hist: str,
) -> Setup:  # fmt: skip
    return Setup(domains, spm_host, conn, rig, libvirt_events, workdir, hist)


CAPACITY = 128 * MiB
# Copy at 32 MiB/s: the copy of 128 MiB of virtual disk (plus what the
# guest dirties meanwhile) takes ~6 s, while the guest writes its 96 MiB as
# fast as TCG lets it (3-8 MiB/s, by the machine's load): the guest writes
# through the whole move, extends of both sides happen during the copy.
BANDWIDTH = 32
WRITE_MB = 96


def written_mb(console: str) -> int:
    """How far the guest's writing got (its last progress marker)."""
    marks = re.findall(r"XTND-PROGRESS mb=(\d+)", console)
    return int(marks[-1]) if marks else 0


def interrupt_move(g: guest.Guest, argv: list[str], at_mb: int = 24) -> str:
    """Run `xtnd volume move` as an operator does, Ctrl-C it once the copy
    passed at_mb MiB; its output. The VM is back on its source."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "xtnd.tools.cli", *[a for a in argv if a != "--json"]],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=cli.ctrl_c_default,
    )  # fmt: skip
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        m = re.match(r"copying: (\d+)/(\d+) MiB", line)
        if m and int(m.group(1)) >= at_mb:
            break
    assert "<mirror" in g.dom.XMLDesc(0), f"not interrupted during the copy: {''.join(lines)}"
    # The HSM's status shows the copy (what `xtnd status` prints).
    hsm_sock = argv[argv.index("--hsm-config") + 1].replace("hsm.conf", "hsm.sock")
    copies = control.ControlClient(hsm_sock).call("status")["replications"]
    assert [(c["vm_uuid"], c["drive"], c["phase"]) for c in copies] == [(g.dom.UUIDString(), "vda", "copying")]
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    text = "".join(lines) + out
    log.info("interrupted move:\n%s\n%s", text, err)
    assert proc.returncode == 130, err
    assert "aborted" in text
    xml = g.dom.XMLDesc(0)
    assert "<mirror" not in xml
    return text


def source_extends(path: str, vm_id: str) -> int:
    return sum(1 for e in history.read(path)
               if e["ev"] == "replica_extend" and e.get("vm") == vm_id and e["side"] == "src")  # fmt: skip


@contextlib.contextmanager
def copy_held(g: guest.Guest, hist: str, bandwidth: int, timeout: float = 180) -> Iterator[None]:
    """While the body runs a move started at 1 MiB/s: once the HSM has
    extended the source during the copy (or after timeout), set the copy's
    speed to bandwidth MiB/s."""
    vm_id = g.dom.UUIDString()
    before = source_extends(hist, vm_id)
    done = threading.Event()

    def release() -> None:
        deadline = time.monotonic() + timeout
        while not done.is_set() and time.monotonic() < deadline:
            if source_extends(hist, vm_id) > before:
                break
            done.wait(0.2)
        with contextlib.suppress(libvirt.libvirtError):  # the job may be gone (a failed move)
            if g.dom.blockJobInfo("vda", 0):
                g.dom.blockJobSetSpeed("vda", bandwidth, 0)
                log.info("copy speed set to %d MiB/s", bandwidth)

    thread = threading.Thread(target=release, name="copy-held")
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def run_move(
    s: Setup,
    src_sd: uuid.UUID,
    dst_sd: uuid.UUID,
    capsys: pytest.CaptureFixture[str],
    write_mb: int = WRITE_MB,
    chunk_mb: int = 16,
    dest_first: bool = True,
    abort_first: bool = False,
    bandwidth: int = BANDWIDTH,
    hold_copy: bool = False,
) -> dict[str, Any]:
    """Move the disk of a writing guest from src_sd to dst_sd (after an
    interrupted attempt with abort_first); check everything; the figures.

    hold_copy: the copy runs at 1 MiB/s until the HSM extended the source
    during it, then at ``bandwidth``; how far a guest writes during a copy
    at full speed depends on the machine's load (TCG).
    """
    pool = s.domains.pool
    src_link = pool.volume(CAPACITY, sd=src_sd)
    src = links.parse(src_link, pool.run_dir)
    assert src is not None
    pauses = Pauses(s.conn)
    t0 = time.monotonic()
    workload = guest.Workload(write_mb=write_mb, hold=True)
    with hsmrig.spm_daemon(pool, s.spm_host, **ALL_DOMAINS), running_hsm(pool, s.events, chunk_mb, dest_first):
        with guest.guest(s.conn, s.rig, src_link, workload, s.workdir) as g:
            g.start()
            g.wait_console("XTND-PROGRESS mb=2", timeout=120)
            argv = move_argv(g, dst_sd, pool, bandwidth)
            if abort_first:
                interrupt_move(g, argv)
                assert src_link in g.dom.XMLDesc(0)
                assert [v.uuid for v in pool.open(dst_sd).list_volumes()] == []
            capsys.readouterr()
            t_move = time.monotonic()
            mb_before = written_mb(g.console())
            with copy_held(g, s.hist, bandwidth) if hold_copy else contextlib.nullcontext():
                rc = cli.xtnd(*(move_argv(g, dst_sd, pool, 1) if hold_copy else argv))
            captured = capsys.readouterr()
            assert rc == 0, captured.err
            result = json.loads(captured.out)
            result["move_seconds"] = round(time.monotonic() - t_move, 1)
            # The guest wrote during the move (and, unless it was quick, on
            # through the destination after the pivot).
            console = g.console()
            result["guest_mb_during_move"] = written_mb(console) - mb_before
            result["guest_wrote_after_pivot"] = "XTND-WRITE-DONE" not in console
            assert result["guest_mb_during_move"] >= 8, result
            assert result["path"] in g.dom.XMLDesc(0)
            # The persistent definition follows: the VM starts from the destination next time.
            assert result["path"] in g.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
            assert src_link not in g.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
            text = g.wait_console("XTND-HOLD", timeout=180)
            assert f"XTND-WRITE-DONE mb={write_mb}" in text and "XTND-VERIFY-OK" in text
            name, vm_id = g.name, g.dom.UUIDString()
            g.dom.destroy()
    pauses.close()
    src_ext, dst_ext, bad = extends_in_order(s.hist, vm_id)
    dst = pool.open(dst_sd).volume_info(uuid.UUID(result["to_volume"]))
    end = image_end(result["path"])
    result.update(
        pauses=pauses.count(name), elapsed=round(time.monotonic() - t0, 1), hist_src=src_ext, hist_dst=dst_ext,
        bad=bad, dst_size=dst.size, dst_allocation=end,
    )  # fmt: skip
    log.info("move result %s", result)
    print(f"\nMOVE {json.dumps(result)}")
    assert result["pauses"] == 0, result
    assert gone(pool.open(src_sd), src[1])
    assert not os.path.lexists(src_link)
    # The destination's size is within a chunk of its allocation: an
    # extend leaves less than a watermark plus a chunk free (the doubled
    # chunk while replicating), or the volume is at its max size.
    config = sizing.SizingConfig(chunk_mb=chunk_mb)
    slack = config.chunk(sizing.REPLICATING) + config.watermark(sizing.REPLICATING)
    assert end <= dst.size <= end + slack or dst.size >= sizing.max_size(CAPACITY), result
    return result


def test_move_block_to_block_after_abort(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    """Ctrl-C in the middle of a first attempt leaves the VM on its source
    and removes the half-copied destination; the second attempt moves it,
    both sides extended while the guest writes, the destination always first."""
    result = run_move(
        setup, setup.domains.pool.uuid, setup.domains.block2.uuid, capsys, write_mb=96, abort_first=True,
        hold_copy=True,
    )  # fmt: skip
    assert result["bad"] == []
    assert result["extends_dst"] >= 1 and result["extends_src"] >= 1, result


@pytest.mark.soak
def test_move_block_to_block(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    result = run_move(setup, setup.domains.pool.uuid, setup.domains.block2.uuid, capsys)
    assert result["bad"] == []
    assert result["extends_dst"] >= 1 and result["extends_src"] >= 1, result


@pytest.mark.soak
def test_move_block_to_file(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    """A file destination grows by itself: only the source is extended."""
    result = run_move(setup, setup.domains.pool.uuid, setup.domains.file.uuid, capsys)
    assert result["extends_dst"] == 0 and result["hist_dst"] == 0, result


@pytest.mark.soak
def test_move_file_to_block(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    """The source needs nothing; the destination is extended ahead of the copy."""
    result = run_move(setup, setup.domains.file.uuid, setup.domains.block2.uuid, capsys)
    assert result["extends_src"] == 0 and result["hist_src"] == 0, result
    assert result["extends_dst"] >= 1, result


@pytest.mark.soak
@pytest.mark.parametrize("dest_first", [True, False])
def test_tiny_chunk_destination_first(setup: Setup, capsys: pytest.CaptureFixture[str], dest_first: bool) -> None:
    """A 4 MiB chunk (8 while replicating) and a copy of ~20 s: many
    extends during the copy. With the rule no source extend ever goes
    beyond the destination's size; without it the history shows the source
    ahead of the destination."""
    d = setup.domains
    result = run_move(
        setup, d.pool.uuid, d.block2.uuid, capsys, write_mb=100, chunk_mb=4, dest_first=dest_first, bandwidth=8
    )
    assert result["hist_src"] >= 3, result
    if dest_first:
        assert result["bad"] == [], result
    else:
        assert result["bad"], result


@pytest.mark.soak
def test_move_aborted_by_ctrl_c(setup: Setup) -> None:
    """Ctrl-C in the middle of the copy: the VM stays on its source and
    finishes its writes there, the half-copied destination is removed."""
    d, pool = setup.domains, setup.domains.pool
    src_link = pool.volume(CAPACITY)
    src = links.parse(src_link, pool.run_dir)
    assert src is not None
    pauses = Pauses(setup.conn)
    with hsmrig.spm_daemon(pool, setup.spm_host, **ALL_DOMAINS), running_hsm(pool, setup.events, 16):
        with guest.guest(setup.conn, setup.rig, src_link, guest.Workload(write_mb=40), setup.workdir) as g:
            g.start()
            g.wait_console("XTND-PROGRESS mb=2", timeout=120)
            interrupt_move(g, move_argv(g, d.block2.uuid, pool, 8))
            assert src_link in g.dom.XMLDesc(0)
            text = g.wait_console("XTND-VERIFY-OK", timeout=180)
            assert "XTND-WRITE-DONE mb=40" in text
            name = g.name
    pauses.close()
    assert pauses.count(name) == 0
    assert d.block2.list_volumes() == []
    link_dir = os.path.join(pool.run_dir, str(d.block2.uuid))
    assert not os.path.isdir(link_dir) or not os.listdir(link_dir)
    assert pool.open(pool.uuid).volume_info(src[1]).size >= 40 * MiB


def test_move_refusals(domains: Domains, spm_env: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Bad input: one line on stderr, exit 1, nothing created."""
    pool = domains.pool
    conf = pool.write_config(pool.config(chunk_mb=16), os.path.join(pool.workdir, "hsm.conf"))
    argv = ["volume", "move", "--vm", "xtnd-test-no-such-vm", "--disk", "vda", "--to-domain", str(domains.block2.uuid),
            "--hsm-config", conf]  # fmt: skip
    assert cli.xtnd(*argv) == 1
    err = capsys.readouterr().err
    assert "no vm xtnd-test-no-such-vm" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert domains.block2.list_volumes() == []
