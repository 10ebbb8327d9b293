"""Live storage migration when the HSM restarts, and the destination's
own threshold, with real guests.

The rig of test_move_guest: a TCG guest writing at full speed, the real
SPM daemon (sanlock lease, lvextend), real LVM on loop devices, libvirt's
blockCopy driven by the real ``xtnd volume move``.

- The HSM is the real ``xtnd hsm`` daemon, SIGKILLed (or SIGTERMed) in the
  middle of the copy and started again: the move goes on meanwhile, the
  new HSM finds the copy in libvirt (the mirror in the live XML) by itself
  and keeps both sides extended, destination first; the copy ends in a
  pivot, the guest never pauses and reads its data back (soak).
- The copy-following loop of the HSM's replicator is stopped (its
  interval, in-process HSM) once the destination's threshold is armed on
  the mirror's index ``vda[N]``: every later destination extend must come
  from that threshold's event (soak: a whole move; default: the short
  form, a copy the HSM finds already running, as after a restart).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

import libvirt
import pytest
from testlib import cli
from testlib.hsmrun import Pauses
from xtnd.common import history
from xtnd.hsm import control, links, replicate, sizing
from xtnd.hsm.libvirtconn import EventLoop
from xtnd.tools import move_cli
from xtnd.tools.rig import guest, hsmrig
from xtnd.tools.rig.sanlockd import SanlockDaemon
from xtnd.tools.rig.wait import wait_for

from . import test_move_guest as mg
from .test_move_guest import CAPACITY, Setup, extends_in_order, gone, image_end, written_mb

# The fixtures of the move tests (a shared conftest will hold them).
domains, hist, setup, spm_env = mg.domains, mg.hist, mg.setup, mg.spm_env

MiB = 1024**2

log = logging.getLogger("test")

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]


class HsmDaemon:
    """`xtnd hsm` on the SPM's simulated host (same host id, its sanlock
    daemon), recording into the test's history; killable and restartable."""

    def __init__(self, s: Setup, chunk_mb: int):
        pool = s.domains.pool
        self.workdir = s.workdir
        self.host: SanlockDaemon = s.spm_host
        self.conf = os.path.join(pool.workdir, "hsm.conf")
        pool.write_config(pool.config(chunk_mb=chunk_mb, stats_interval=0.5), self.conf)
        self.socket = os.path.join(pool.workdir, "hsm.sock")
        self.hist = s.hist
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.logs: list[str] = []

    def start(self) -> None:
        self.starts += 1
        path = os.path.join(self.workdir, f"hsm.{self.starts}.log")
        env = {**os.environ, history.ENV: self.hist, history.ENV_NAME: f"hsm.{self.starts}"}
        with open(path, "wb") as out:
            self.proc = self.host.popen(
                [sys.executable, "-m", "xtnd.tools.cli", "hsm", "--config", self.conf],
                env=env, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.logs.append(path)
        wait_for(self._answers, timeout=60, what="the HSM answers on its control socket")

    def _answers(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, self.log()
        try:
            control.ControlClient(self.socket, timeout=5).call("ping")
        except OSError:
            return False
        return True

    def status(self) -> dict[str, Any]:
        return control.ControlClient(self.socket, timeout=10).call("status")  # type: ignore[no-any-return]

    def kill(self, sig: int = signal.SIGKILL) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log(self, n: int = -1) -> str:
        with open(self.logs[n]) as f:
            return f.read()


class Move:
    """`xtnd volume move` as a process; its output lines as they come."""

    def __init__(self, g: guest.Guest, to: uuid.UUID, conf: str, bandwidth: int):
        argv = ["volume", "move", "--vm", g.name, "--disk", "vda", "--to-domain", str(to), "--hsm-config", conf,
                "--bandwidth", str(bandwidth)]  # fmt: skip
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "xtnd.tools.cli", *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, preexec_fn=cli.ctrl_c_default,
        )  # fmt: skip
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, name="test-move-output", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def text(self) -> str:
        with self._cond:
            return "".join(self.lines)

    def copied_mb(self) -> int:
        marks = re.findall(r"copying: (\d+)/\d+ MiB", self.text())
        return int(marks[-1]) if marks else 0

    def wait_copied(self, mb: int, timeout: float = 120) -> None:
        wait_for(lambda: self.copied_mb() >= mb or self.proc.poll() is not None, timeout=timeout,
                 what=f"the copy passes {mb} MiB")  # fmt: skip
        assert self.copied_mb() >= mb, self.text()

    def wait_line(self, text: str, timeout: float = 60) -> None:
        wait_for(lambda: text in self.text() or self.proc.poll() is not None, timeout=timeout, what=repr(text))
        assert text in self.text(), self.text()

    def wait(self, timeout: float = 180) -> int:
        rc = self.proc.wait(timeout)
        self._reader.join(10)
        return rc


@pytest.mark.soak
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill", "term"])
def test_move_survives_hsm_restart(setup: Setup, sig: int) -> None:
    """block -> block; the HSM daemon is SIGKILLed (or stopped) once the
    copy passed 16 MiB, the guest writes on while it is down, then it
    starts again and keeps both sides extended to the end of the copy."""
    s, d, pool = setup, setup.domains, setup.domains.pool
    src_link = pool.volume(CAPACITY)
    src = links.parse(src_link, pool.run_dir)
    assert src is not None
    chunk_mb, write_mb = 16, 96
    pauses = Pauses(s.conn)
    hsm = HsmDaemon(s, chunk_mb)
    try:
        with hsmrig.spm_daemon(pool, s.spm_host, **mg.ALL_DOMAINS):
            hsm.start()
            with guest.guest(s.conn, s.rig, src_link, guest.Workload(write_mb=write_mb, hold=True), s.workdir) as g:
                g.start()
                g.wait_console("XTND-PROGRESS mb=2", timeout=120)
                vm_id, name = g.dom.UUIDString(), g.name
                move = Move(g, d.block2.uuid, hsm.conf, bandwidth=8)
                move.wait_copied(16)
                assert "<mirror" in g.dom.XMLDesc(0)
                hsm.kill(sig)
                log.info("hsm stopped by signal %d at copy %d MiB", sig, move.copied_mb())
                killed_at = written_mb(g.console())
                # The move goes on: the guest writes on (mirrored to both
                # sides) while no HSM answers.
                move.wait_line("the HSM does not answer")
                wait_for(lambda: written_mb(g.console()) >= killed_at + 4, timeout=60, what="the guest writes on")
                assert move.proc.poll() is None, move.text()
                assert "<mirror" in g.dom.XMLDesc(0), "the copy ended while the HSM was down"
                # The move is held while the HSM starts: the new HSM must
                # find the copy in libvirt by itself, not be told.
                move.proc.send_signal(signal.SIGSTOP)
                try:
                    hsm.start()
                    log.info("hsm started again")
                    copies = wait_for(lambda: hsm.status()["replications"], timeout=30, what="the HSM finds the copy")
                    assert [(c["vm_uuid"], c["drive"]) for c in copies] == [(vm_id, "vda")], copies
                    assert "replication found vm=" in hsm.log(), hsm.log()
                finally:
                    move.proc.send_signal(signal.SIGCONT)
                rc = move.wait()
                text = move.text()
                log.info("move output:\n%s", text)
                assert rc == 0, text
                assert "telling it again" not in text and "the HSM answers again" in text, text
                assert "warning" not in text, text
                console = g.wait_console("XTND-HOLD", timeout=180)
                assert f"XTND-WRITE-DONE mb={write_mb}" in console and "XTND-VERIFY-OK" in console
                path = links.link_path(d.block2.uuid, _moved_to(text), pool.run_dir)
                assert path in g.dom.XMLDesc(0)
                g.dom.destroy()
        hsm.stop()
    finally:
        hsm.stop()
        pauses.close()
    assert pauses.count(name) == 0
    src_ext, dst_ext, bad = extends_in_order(s.hist, vm_id)
    assert bad == [], bad
    # The restarted HSM did extend during the copy (destination first).
    again = [e for e in history.read(s.hist) if e["ev"] == "replica_extend" and e.get("name") == "hsm.2"]
    log.info("extends by the restarted HSM during the copy: %s", again)
    assert again, "the restarted HSM extended nothing during the copy"
    assert gone(pool.open(pool.uuid), src[1])
    dst = pool.open(d.block2.uuid).volume_info(_moved_to(text))
    end = image_end(path)
    config = sizing.SizingConfig(chunk_mb=chunk_mb)
    slack = config.chunk(sizing.REPLICATING) + config.watermark(sizing.REPLICATING)
    assert end <= dst.size <= end + slack or dst.size >= sizing.max_size(CAPACITY)


def _moved_to(text: str) -> uuid.UUID:
    m = re.search(r"creating volume ([0-9a-f-]{36})", text)
    assert m, text
    return uuid.UUID(m.group(1))


@pytest.mark.soak
def test_destination_threshold_fires(setup: Setup) -> None:
    """file -> block with the copy-following loop slowed to a stop once the
    destination's threshold is armed (its interval, an attribute of the
    in-process HSM's replicator): only the threshold on the mirror's index
    (vda[N]) can wake it. The guest writes on into the destination's last
    chunk; every destination extend is the threshold's, and the VM never
    pauses."""
    s, d, pool = setup, setup.domains, setup.domains.pool
    src_link = pool.volume(CAPACITY, sd=d.file.uuid)
    # A 32 MiB replicating chunk leaves 25.6 MiB above the threshold: more
    # than QEMU's mirror puts in flight at once (16 MiB), so the write that
    # crosses it cannot also run past the destination's end.
    chunk_mb, write_mb = 16, 96
    pauses = Pauses(s.conn)
    with hsmrig.spm_daemon(pool, s.spm_host, **mg.ALL_DOMAINS), mg.running_hsm(pool, s.events, chunk_mb) as running:
        replicator = running.hsm.replicator
        conf = os.path.join(pool.workdir, "hsm.conf")
        with guest.guest(s.conn, s.rig, src_link, guest.Workload(write_mb=write_mb, hold=True), s.workdir) as g:
            g.start()
            g.wait_console("XTND-PROGRESS mb=2", timeout=120)
            vm_id, name = g.dom.UUIDString(), g.name
            move = Move(g, d.block2.uuid, conf, bandwidth=8)

            def armed() -> bool:
                r = replicator.get(vm_id, "vda")
                return r is not None and r.dst_threshold is not None

            wait_for(lambda: armed() or move.proc.poll() is not None, timeout=60, what="the threshold armed")
            assert armed(), move.text()
            replicator.interval = 3600.0
            stopped_at = time.monotonic()
            armed_at = written_mb(g.console())
            replica = replicator.get(vm_id, "vda")
            assert replica is not None
            log.info("follow loop stopped at guest %d MiB, destination %d MiB, threshold %s on %s",
                     armed_at, replica.dst_physical // MiB, replica.dst_threshold, replica.dst_target)  # fmt: skip
            rc = move.wait()
            text = move.text()
            log.info("move output:\n%s", text)
            assert rc == 0, text
            console = g.wait_console("XTND-HOLD", timeout=180)
            assert f"XTND-WRITE-DONE mb={write_mb}" in console and "XTND-VERIFY-OK" in console
            g.dom.destroy()
    pauses.close()
    assert pauses.count(name) == 0
    events = [e for e in history.read(s.hist) if e["ev"] == "replica_extend" and e.get("vm") == vm_id]
    log.info("destination extends: %s", events)
    # Once stopped (after the round it may have been in), the loop
    # extended the destination only when the threshold woke it.
    whys = [e["why"] for e in events if e["side"] == "dst" and float(e["t"]) > stopped_at]
    assert "threshold" in whys and whys[whys.index("threshold") :].count("copy") == 0, whys


def test_hsm_finds_copy_and_threshold_fires(
    domains: mg.Domains, conn: Any, rig: guest.Rig, libvirt_events: EventLoop, workdir: str, hist: str
) -> None:
    """The short form of both (default run). A copy from a file volume to
    a block volume is running when the HSM starts (as after a restart):
    the HSM finds it in libvirt by itself. Its copy-following loop is then
    stopped, so the destination, filled by the writing guest through the
    mirror, is extended only on the threshold armed on the mirror's index.

    The guest is suspended from the copy's start until the HSM armed the
    threshold: no writes may fill the destination before anyone watches it."""
    d, pool = domains, domains.pool
    src_link = pool.volume(CAPACITY, sd=d.file.uuid)
    dst_link = pool.volume(CAPACITY, initial=12 * MiB, sd=d.block2.uuid)
    dst = links.parse(dst_link, pool.run_dir)
    assert dst is not None
    write_mb = 16
    pauses = Pauses(conn)
    with hsmrig.spm(pool), guest.guest(conn, rig, src_link, guest.Workload(write_mb=write_mb, hold=True), workdir) as g:
        g.start()
        g.wait_console("XTND-PROGRESS mb=2", timeout=120)
        vm_id, name = g.dom.UUIDString(), g.name
        flags = libvirt.VIR_DOMAIN_BLOCK_COPY_REUSE_EXT | libvirt.VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB
        g.dom.suspend()
        g.dom.blockCopy("vda", move_cli.dest_xml(True, dst_link, "qcow2"), None, flags)
        with mg.running_hsm(pool, libvirt_events, chunk_mb=4) as running:
            replicator = running.hsm.replicator

            def armed() -> replicate.Replica | None:
                r = replicator.get(vm_id, "vda")
                return r if r is not None and r.dst_threshold is not None else None

            r = wait_for(armed, timeout=30, what="the HSM finds the copy and arms its threshold")
            assert r.adopted and r.dst_target == f"vda[{replicate.mirror_index(g.dom.XMLDesc(0), 'vda')}]"
            assert (r.src_block, r.dst_domain, r.dst_volume, r.dst_block) == (False, str(dst[0]), str(dst[1]), True)
            replicator.interval = 3600.0
            stopped_at = time.monotonic()
            suspended = pauses.count(name)
            g.dom.resume()
            wait_for(lambda: any(e["why"] == "threshold" for e in _dst_extends(hist, vm_id, stopped_at)),
                     timeout=60, what="a destination extend on its threshold")  # fmt: skip
            g.wait_console("XTND-WRITE-DONE", timeout=120)
            # The copy outlived every write of the guest (a full destination fails it).
            assert "<mirror" in g.dom.XMLDesc(0), "the copy failed"
            # The job ends (here: cancelled); the HSM forgets the copy by itself.
            g.dom.blockJobAbort("vda", 0)
            wait_for(lambda: replicator.get(vm_id, "vda") is None, timeout=30, what="the HSM sees the copy end")
            g.wait_console("XTND-VERIFY-OK", timeout=120)
    pauses.close()
    assert pauses.count(name) == suspended == 1  # the test's own suspend only
    whys = [e["why"] for e in _dst_extends(hist, vm_id, stopped_at)]
    log.info("destination extends after the loop stopped: %s", whys)
    assert whys and whys[whys.index("threshold") :].count("copy") == 0, whys


def _dst_extends(path: str, vm_id: str, since: float) -> list[dict[str, Any]]:
    return [
        e
        for e in history.read(path)
        if e["ev"] == "replica_extend" and e.get("vm") == vm_id and e["side"] == "dst" and float(e["t"]) > since
    ]
