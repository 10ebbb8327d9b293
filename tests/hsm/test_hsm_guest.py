"""The HSM daemon against real guests, real libvirtd, real LVM and an SPM.

Each guest is the rig of xtnd.tools.rig.guest writing a known pattern to its
qcow2 disk, a thin LV of a block domain (4 MiB extents) exposed as a
volume link; it reads everything back at the end (XTND-VERIFY-OK). The
SPM is the real daemon (`xtnd spm`, with its own sanlock daemon and the
SPM lease) serving the domain's mailbox with real lvextend.
TCG guests write about 3.5 MiB/s, so sizes are MiB-scale.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import libvirt
import pytest
from testlib import prom
from testlib.hsmrun import Pauses, running
from testlib.sdnotify import NotifySocket
from xtnd.hsm.libvirtconn import EventLoop
from xtnd.hsm.metrics import parse_line
from xtnd.mailbox import codec
from xtnd.mailbox.directio import DirectFile
from xtnd.tools.rig import guest, hsmrig
from xtnd.tools.rig.sanlockd import SanlockDaemon
from xtnd.tools.rig.wait import wait_for

MiB = 1024**2
GiB = 1024**3

log = logging.getLogger("test")

pytestmark = [pytest.mark.root, pytest.mark.timeout(240)]


@contextlib.contextmanager
def started(
    conn: libvirt.virConnect, rig: guest.Rig, disk: str, workload: guest.Workload, workdir: str
) -> Iterator[guest.Guest]:
    with guest.guest(conn, rig, disk, workload, workdir) as g:
        g.start()
        yield g


def test_steady_writer_never_pauses(
    spm_host: SanlockDaemon,
    pool: hsmrig.Pool,
    conn: libvirt.virConnect,
    rig: guest.Rig,
    libvirt_events: EventLoop,
    workdir: str,
) -> None:
    """Chunk 16 MiB, 20% utilization: extend with 12.8 MiB free, ~3 s of
    writing at 4 MiB/s; each extend takes well under that."""
    disk = pool.thin_volume(initial=16 * MiB)
    pauses = Pauses(conn)
    with hsmrig.spm_daemon(pool, spm_host), running(pool.config(chunk_mb=16), libvirt_events) as r:
        with started(conn, rig, disk, guest.Workload(write_mb=48, rate=4), workdir) as g:
            text = g.wait_console("XTND-VERIFY-OK", timeout=180)
            assert "XTND-WRITE-DONE mb=48" in text
            g.wait_state(libvirt.VIR_DOMAIN_SHUTOFF, timeout=60)
            name = g.name
    pauses.close()
    records = r.records
    for rec in records:
        log.info("%s", rec.line())
    assert pauses.ioerror(name) == 0
    assert len(records) >= 3
    assert all(rec.trigger == "threshold" and not rec.resumed for rec in records[:3])
    sizes = [rec.new_size for rec in records]
    assert sizes == sorted(sizes)
    assert pool.volume_size(disk) == records[-1].new_size >= 48 * MiB


def test_snapshot_new_top_is_extended(
    spm_host: SanlockDaemon,
    pool: hsmrig.Pool,
    conn: libvirt.virConnect,
    rig: guest.Rig,
    libvirt_events: EventLoop,
    workdir: str,
) -> None:
    """An external disk-only snapshot mid-write moves the guest's writes to
    a new thin volume (a qcow2 overlay on the old one). The HSM sees the new
    top image in its stats pass, arms it on its own index and extends the
    new volume, never the old one again; the guest reads everything back
    through the chain."""
    base = pool.thin_volume(initial=16 * MiB)
    # Free extents right after the base LV: a loop device can map only a
    # one-segment LV (no device-mapper here), so each LV needs room to grow
    # in place. The top LV is the last one and grows into the rest.
    gap = uuid.uuid4()
    pool.domain.create_volume(gap, 1 * GiB, initial_size=64 * MiB)
    top = pool.thin_volume(initial=16 * MiB)
    pool.domain.remove_volume(gap)
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base, top, str(1 * GiB)],
        check=True,
        capture_output=True,
    )
    base_volume = str(hsmrig.volume_of(pool, base))
    top_volume = str(hsmrig.volume_of(pool, top))
    pauses = Pauses(conn)
    with hsmrig.spm_daemon(pool, spm_host), running(pool.config(chunk_mb=16), libvirt_events) as r:
        with started(conn, rig, base, guest.Workload(write_mb=40, rate=4), workdir) as g:
            g.wait_console("XTND-PROGRESS mb=4", timeout=120)
            snapshot = (
                "<domainsnapshot><disks><disk name='vda' snapshot='external' type='block'>"
                f"<driver type='qcow2'/><source dev='{top}'/></disk></disks></domainsnapshot>"
            )
            flags = (
                libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
                | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT
                | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
            )
            g.dom.snapshotCreateXML(snapshot, flags)
            snapped = len(r.records)
            log.info("snapshot taken after %d extends; top index %d", snapped, g.disk_index("vda"))
            text = g.wait_console("XTND-VERIFY-OK", timeout=180)
            assert "XTND-WRITE-DONE mb=40" in text
            name = g.name
    pauses.close()
    records = r.records
    for rec in records:
        log.info("%s", rec.line())
    assert pauses.ioerror(name) == 0
    after = records[snapped:]
    assert after, "the new top volume was never extended"
    assert {rec.volume for rec in after} == {top_volume}
    assert all(rec.volume == base_volume for rec in records[:snapped])
    assert pool.volume_size(top) == after[-1].new_size >= 32 * MiB


def test_tiny_chunk_pauses_and_resumes(
    spm_host: SanlockDaemon,
    pool: hsmrig.Pool,
    conn: libvirt.virConnect,
    rig: guest.Rig,
    libvirt_events: EventLoop,
    workdir: str,
) -> None:
    """Chunk 4 MiB with 100% utilization: no headroom at all, so every chunk
    ends in ENOSPC; each pause is extended and resumed by the HSM."""
    disk = pool.thin_volume(initial=4 * MiB)
    pauses = Pauses(conn)
    with (
        hsmrig.spm_daemon(pool, spm_host),
        running(pool.config(chunk_mb=4, utilization_percent=100), libvirt_events) as r,
    ):
        with started(conn, rig, disk, guest.Workload(write_mb=20), workdir) as g:
            text = g.wait_console("XTND-VERIFY-OK", timeout=180)
            assert "XTND-WRITE-DONE mb=20" in text
            g.wait_state(libvirt.VIR_DOMAIN_SHUTOFF, timeout=60)
            name = g.name
    pauses.close()
    for rec in r.records:
        log.info("%s", rec.line())
    resumed = [rec for rec in r.records if rec.resumed]
    assert pauses.ioerror(name) >= 2
    assert len(resumed) >= 2
    assert pool.volume_size(disk) >= 20 * MiB


def test_user_paused_vm_left_alone(
    spm_host: SanlockDaemon,
    pool: hsmrig.Pool,
    conn: libvirt.virConnect,
    rig: guest.Rig,
    libvirt_events: EventLoop,
    workdir: str,
) -> None:
    """The user pauses the VM while its extend request waits for the SPM
    (not running yet): the extend completes once the SPM serves it, and
    the VM stays paused until the user resumes it."""
    disk = pool.thin_volume(initial=16 * MiB)
    with running(pool.config(chunk_mb=16), libvirt_events) as r:
        with started(conn, rig, disk, guest.Workload(write_mb=24, rate=4), workdir) as g:
            wait_for(lambda: r.hsm.mailbox.in_flight > 0, timeout=120, what="an extend request")
            g.dom.suspend()
            with hsmrig.spm_daemon(pool, spm_host):
                (rec,) = r.wait_records(1)
                assert not rec.resumed
                passes = r.hsm.monitor.counters["stats_passes"]
                wait_for(lambda: r.hsm.monitor.counters["stats_passes"] >= passes + 2, timeout=30)
                assert g.state() == (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_USER)
                g.dom.resume()
                g.wait_console("XTND-VERIFY-OK", timeout=120)


@pytest.mark.parametrize("add_space", ["pvresize", "vgextend"])
def test_vg_full_resumes_when_space_added(
    add_space: str,
    spm_host: SanlockDaemon,
    workdir: str,
    need_root: None,
    conn: libvirt.virConnect,
    rig: guest.Rig,
    libvirt_events: EventLoop,
) -> None:
    """A 128 MiB PV with 1 MiB metadata areas (the 128 MiB production ones
    would not fit) holds the special LVs (56 MiB) and at most ~66 MiB of
    volume: the guest writing 80 MiB pauses, the SPM refuses every extend,
    the HSM keeps retrying with backoff; once space is added the next retry
    succeeds and the VM resumes with no other action."""
    with hsmrig.pool(workdir, pv_size=128 * MiB, metadata_size=1 * MiB) as pool:
        if add_space == "vgextend" and pool.domain.runner.driverloaded is False:
            pytest.skip(
                "without device-mapper LVs are mapped by loop devices, which cannot map the two-segment LV "
                "that lvextend makes on a new PV (tests/README.md, LVM without device-mapper); "
                "pvresize of a grown LUN covers this host"
            )
        disk = pool.thin_volume(initial=16 * MiB)
        with hsmrig.spm_daemon(pool, spm_host), running(pool.config(chunk_mb=16), libvirt_events) as r:
            with started(conn, rig, disk, guest.Workload(write_mb=80), workdir) as g:
                g.wait_state(libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_IOERROR, timeout=120)
                monitor = r.hsm.monitor
                wait_for(lambda: monitor.counters["failures"] >= 3, timeout=30, what="three refused extends")
                assert g.state() == (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_IOERROR)
                full = pool.volume_size(disk)
                if add_space == "pvresize":
                    pool.grow_pv(0, 256 * MiB)
                else:
                    pool.add_pv(256 * MiB)
                g.wait_console("XTND-VERIFY-OK", timeout=120)
        for rec in r.records:
            log.info("%s", rec.line())
        assert any(rec.trigger == "retry" and rec.resumed for rec in r.records)
        assert pool.volume_size(disk) > full


def _read_host_block(pool: hsmrig.Pool) -> bytes:
    with DirectFile(pool.domain.mailbox().inbox, readonly=True) as f:
        return f.read(hsmrig.HOST_ID * codec.BLOCK_SIZE, codec.BLOCK_SIZE)


def test_hsm_restarted_while_vm_paused(
    spm_host: SanlockDaemon,
    pool: hsmrig.Pool,
    conn: libvirt.virConnect,
    rig: guest.Rig,
    workdir: str,
    notify: NotifySocket,
) -> None:
    """`xtnd hsm` as a process: no SPM yet, so the guest pauses on ENOSPC
    with a request pending; SIGTERM stops the daemon at once and clears its
    mailbox block; the SPM comes up, the daemon starts again and resumes
    the VM it finds paused. Its metrics and `xtnd status` show the pending
    extend, then the completed one."""
    disk = pool.thin_volume(initial=16 * MiB)
    config = pool.config(chunk_mb=16)
    config.metrics.listen = "127.0.0.1:0"  # a free port, logged by the daemon
    config.api.udev = True
    conf = pool.write_config(config, os.path.join(workdir, "hsm.conf"))
    spm_conf = os.path.join(pool.workdir, f"spm{hsmrig.HOST_ID}.conf")  # written by spm_daemon()

    def status() -> tuple[int, dict[str, Any]]:
        cmd = [sys.executable, "-m", "xtnd.tools.cli", "status", "--json", "--hsm-config", conf, "--spm-config"]
        done = subprocess.run([*cmd, spm_conf], capture_output=True, text=True)
        log.info("xtnd status rc=%d\n%s", done.returncode, done.stdout)
        return done.returncode, json.loads(done.stdout)

    cmd = [sys.executable, "-m", "xtnd.tools.cli", "hsm", "--config", conf]

    # systemd's side of Type=notify with WatchdogSec=1 for the first run.
    watched = notify.env(watchdog_usec=1_000_000)

    def start(n: int) -> tuple[subprocess.Popen[bytes], str]:
        # On the SPM's simulated host: both hold the same host id through
        # that host's sanlock daemon.
        path = os.path.join(workdir, f"hsm.{n}.log")
        env = {**os.environ, **(watched if n == 1 else {})}
        with open(path, "wb") as out:
            return spm_host.popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT), path

    def read(path: str) -> str:
        with open(path) as f:
            return f.read()

    proc, first = start(1)
    try:
        with started(conn, rig, disk, guest.Workload(write_mb=24), workdir) as g:
            g.wait_state(libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_IOERROR, timeout=120)
            wait_for(lambda: "extend requested" in read(first), timeout=30)
            states = notify.until_ready()  # pinged while connecting, too
            assert set(states) <= {"READY=1", "WATCHDOG=1"}, states
            assert [notify.recv() for _ in range(3)] == ["WATCHDOG=1"] * 3
            assert _read_host_block(pool) != bytes(codec.BLOCK_SIZE), "the request is in the inbox"
            port = prom.port_in(read(first))
            assert port, read(first)
            pending = prom.scrape(port)
            assert prom.value(pending, "xtnd_hsm_extends_in_flight") == 1
            assert prom.value(pending, "xtnd_hsm_drives", state="extending") == 1
            assert prom.value(pending, "xtnd_hsm_vm_pauses_total") >= 1
            assert prom.value(pending, "xtnd_hsm_extend_requests_total", result="extended") == 0
            assert prom.value(pending, "xtnd_hsm_inbox_writes_total") >= 1
            rc, report = status()  # no SPM config yet: only the HSM is expected here
            assert rc == 0 and report["spm"] is None
            [drive] = report["hsm"]["drives"]
            assert drive["state"] == "extending" and drive["last_extend"] is None
            assert report["hsm"]["in_flight"] == 1
            # The daemon serves the host API ([api] socket) and watches udev ([api] udev).
            volume = hsmrig.volume_of(pool, disk)
            answer = _api_get(config.api.socket, f"/v1/servers/{g.dom.UUIDString()}/volumes/{volume}")
            assert answer == {"volume_blockdev": {"id": str(volume), "bytes": pool.volume_size(disk)}}
            assert "watching udev for block devices that grow" in read(first)
            stopping = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0, read(first)
            log.info("hsm stopped in %.2f s", time.monotonic() - stopping)
            assert _read_host_block(pool) == bytes(codec.BLOCK_SIZE), "host block cleared on stop"
            assert g.state() == (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_IOERROR)

            with hsmrig.spm_daemon(pool, spm_host):
                proc, second = start(2)
                g.wait_console("XTND-VERIFY-OK", timeout=120)
                lines = [ln for ln in read(second).splitlines() if "extend-complete" in ln]
                assert lines, read(second)
                first_done = parse_line(lines[0])
                assert first_done["resumed"] == "yes"
                assert first_done["trigger"] in ("enospc", "load")
                port = wait_for(lambda: prom.port_in(read(second)), timeout=30)
                done = prom.scrape(port)
                assert prom.value(done, "xtnd_hsm_extend_requests_total", result="extended") >= 1
                assert prom.value(done, "xtnd_hsm_extend_phase_seconds_count", phase="total") >= 1
                assert prom.value(done, "xtnd_hsm_extend_phase_seconds_sum", phase="extend") > 0
                assert prom.value(done, "xtnd_hsm_vm_resumes_total") >= 1
                rc, report = wait_for(lambda: (r := status()) and r[0] == 0 and r, timeout=30, what="healthy")
                assert report["spm"]["role"] == "serving" and report["spm"]["lease_holder"] == hsmrig.HOST_ID
                [drive] = report["hsm"]["drives"]
                assert drive["last_extend"] is not None and drive["last_extend_ms"] > 0
                # The running daemon's log level changes without a restart.
                level = [sys.executable, "-m", "xtnd.tools.cli", "hsm", "--config", conf, "log-level", "xtnd.hsm"]
                out = subprocess.run([*level, "DEBUG"], capture_output=True, text=True, check=True).stdout
                assert out == "xtnd.hsm: INFO -> DEBUG\n"
                assert "log level changed logger=xtnd.hsm level=DEBUG previous=INFO" in read(second)
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _api_get(path: str, url: str) -> Any:
    """GET url from the host API at unix socket path; its JSON (200 only)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(path)
        s.sendall(f"GET {url} HTTP/1.1\r\nHost: hsm\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), data
    return json.loads(body)


def _progress(g: guest.Guest) -> int:
    """MiB the guest says it wrote so far."""
    lines = [ln for ln in g.console().splitlines() if ln.startswith("XTND-PROGRESS mb=")]
    return int(lines[-1].split("=")[1]) if lines else 0


def test_libvirtd_restart_during_monitoring(
    spm_host: SanlockDaemon, pool: hsmrig.Pool, rig: guest.Rig, libvirt_events: EventLoop, workdir: str
) -> None:
    """libvirtd is killed while the guest writes; thresholds crossed while
    it is down are never reported, so the HSM re-reads everything when it
    reconnects and keeps extending; the guest never pauses.

    A private libvirtd (rig.hsmrig.NamespacedLibvirtd): killing the
    machine's libvirtd would cut everyone else's connections and tests."""
    nsd = hsmrig.NamespacedLibvirtd(workdir)
    try:
        nsd.start()
        disk = pool.thin_volume(initial=16 * MiB)
        config = pool.config(chunk_mb=16)
        config.libvirt.uri = nsd.uri()
        config.libvirt.reconnect_max = 0.5
        c1 = libvirt.open(nsd.uri())
        with hsmrig.spm_daemon(pool, spm_host), running(config, libvirt_events) as r:
            g = guest.Guest.define(c1, rig, disk, guest.Workload(write_mb=48, rate=4), workdir)
            try:
                g.start()
                (first,) = r.wait_records(1)
                generation = r.hsm.connection.generation
                nsd.kill()
                with contextlib.suppress(libvirt.libvirtError):
                    c1.close()
                # Let the guest cross the next threshold (physical 32 MiB -
                # watermark 12.8 MiB) while nobody listens: that event is lost.
                crossed = (first.new_size - config.sizing().watermark()) // MiB + 2
                wait_for(lambda: _progress(g) >= crossed, timeout=60, what=f"guest past {crossed} MiB")
                nsd.start()
                assert r.hsm.connection.wait_connected(30, after_generation=generation)
                c2 = libvirt.open(nsd.uri())
                g.conn, g.dom = c2, c2.lookupByName(g.name)
                text = g.wait_console("XTND-VERIFY-OK", timeout=180)
                assert "XTND-WRITE-DONE mb=48" in text
            finally:
                g.remove()
        for rec in r.records:
            log.info("%s", rec.line())
        assert len(r.records) >= 3
        assert r.records[1].trigger == "load", "the missed threshold was found by re-reading"
        assert not any(rec.resumed for rec in r.records), "the guest never paused"
        assert pool.volume_size(disk) >= 48 * MiB
    finally:
        nsd.close()
