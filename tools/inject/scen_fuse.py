"""Scenarios 12 and 13: slow and failing mailbox storage, through a FUSE layer.

There is no device-mapper here (no dm-delay, dm-flakey), so the SPM's host
reaches the shared PV through a layer the harness controls
(xtnd.tools.inject.fusefile): a FUSE mount showing the PV file, mounted
with direct_io, and a loop device with direct I/O over it, given to that
host's SPM as its ``pvs``. The faults are set on the byte ranges of the
inbox and outbox LVs only; the SPM's lease (ids, leases) and LVM metadata
I/O pass through the same layer unharmed.

Each trial also proves the fault reached the daemon: the FUSE layer's
count of reads in the inbox range and writes in the outbox range must be
at least the mailbox reads (event reads plus scans) and outbox writes the
SPM counted itself in the same window. A page cache between the daemon's
O_DIRECT I/O and the layer would absorb some of them and fail that check.

Expected outcomes (also in README.md, "Fault injection"):

- slow-mailbox: every mailbox I/O of the SPM takes 200-500 ms. Every
  request is answered exactly once, only later; no mailbox error; the SPM
  stays up and keeps its lease (the standby never serves).
- failing-mailbox: some inbox reads and outbox writes of the SPM fail with
  EIO (a bounded number, chosen at random). The SPM logs each as one line
  "mailbox storage error: ..." (no traceback), counts it, retries, answers
  every request exactly once, stays up and keeps its lease.
"""

from __future__ import annotations

import os
import re
from typing import Any

from xtnd import lvm
from xtnd.common import history
from xtnd.spm.control import ControlClient
from xtnd.storage import constants as c
from xtnd.tools.inject.fusefile import FaultFile
from xtnd.tools.inject.harness import Trial
from xtnd.tools.rig import loops
from xtnd.tools.rig.wait import wait_for


class FuseStorage:
    """Host ``host``'s own PV device through a FUSE layer over the rig's PV file."""

    def __init__(self, t: Trial, host: int):
        self.t = t
        mountpoint = os.path.join(t.dir, f"fuse-host{host}")
        self.fs = FaultFile(os.path.join(t.rig.workdir, "pv0"), mountpoint, os.path.join(t.dir, f"fuse-host{host}.log"))
        try:
            self.device = loops.attach_loop(self.fs.disk)
        except BaseException:
            self.fs.close()
            raise
        # Torn down with the rig, before the mount: the LV mappings over the
        # device, the device, then the FUSE layer.
        t.rig.at_close(self.close)
        name = os.path.basename(self.device)
        with open(f"/sys/block/{name}/loop/dio") as f:
            t.expect(f.read().strip() == "1", f"{self.device} over the FUSE layer has no direct I/O")

    def ranges(self, *lvs: str) -> dict[str, tuple[int, int]]:
        """Byte range on the PV of each LV (its first segment)."""
        runner, vg = self.t.pool.domain.runner, self.t.pool.domain.vg
        pe_start = lvm.vg_info(runner, vg).pvs[0].pe_start
        found = {}
        for name in lvs:
            info = lvm.lv_info(runner, vg, name)
            start = pe_start + info.segments[0].first_pe * info.extent_size
            found[name] = (start, start + info.size)
        return found

    def close(self) -> None:
        self.t.rig.detach_over(self.device)
        self.fs.close()


def _spm_io(control: ControlClient) -> dict[str, int]:
    stats = control.call("stats")["mailbox"]
    return {k: int(stats[k]) for k in ("event_reads", "scans", "outbox_writes", "errors")}


def _rule_counts(fs: FaultFile) -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = fs.stats()["rules"]
    return rules


def _prove_reached(t: Trial, before: dict[str, int], after: dict[str, int],
                   inbox: dict[str, Any], outbox: dict[str, Any]) -> None:
    """The FUSE layer saw at least the mailbox I/Os the SPM issued."""
    issued_reads = after["event_reads"] - before["event_reads"] + after["scans"] - before["scans"]
    issued_writes = after["outbox_writes"] - before["outbox_writes"]
    history.record("inject", what="fuse counts", spm_reads=issued_reads, fuse_reads=inbox["reads"],
                   spm_writes=issued_writes, fuse_writes=outbox["writes"])
    t.phase(f"FUSE layer saw {inbox['reads']} inbox reads and {outbox['writes']} outbox writes; "
            f"the SPM issued {issued_reads} and {issued_writes}")
    t.expect(issued_reads > 0 and issued_writes > 0,
             f"the SPM issued no mailbox I/O under the fault (reads {issued_reads}, writes {issued_writes})")
    t.expect(inbox["reads"] >= issued_reads,
             f"the FUSE layer saw {inbox['reads']} inbox reads, the SPM issued {issued_reads}: "
             "a cache absorbed some")
    t.expect(outbox["writes"] >= issued_writes,
             f"the FUSE layer saw {outbox['writes']} outbox writes, the SPM issued {issued_writes}: "
             "a cache absorbed some")


def _setup(t: Trial) -> tuple[FuseStorage, ControlClient, dict[str, tuple[int, int]]]:
    storage = FuseStorage(t, 1)
    t.spm(1, config={f"domain {t.pool.uuid}.pvs": storage.device})
    spm2 = t.spm(2, wait=False)  # the standby: must never serve
    spm2.proc.wait_log(r"SPM lease busy", timeout=120)
    ranges = storage.ranges(c.INBOX, c.OUTBOX)
    control = ControlClient(os.path.join(t.pool.workdir, "spm1.sock"))
    return storage, control, ranges


def _check_spm(t: Trial) -> None:
    spm1 = t.spms[0]
    t.expect(spm1.alive(), f"the SPM exited rc={spm1.proc.proc.returncode} under the mailbox fault")
    t.expect(not t.spms[1].proc.serving(), "the standby served: the SPM lost its lease")


def _slow(t: Trial, hosts: list[int], per_host: int, steps: int) -> None:
    storage, control, ranges = _setup(t)
    (ib0, ib1), (ob0, ob1) = ranges[c.INBOX], ranges[c.OUTBOX]
    delay = round(t.rng.uniform(0.2, 0.5), 2)
    before = _spm_io(control)
    t.inject(f"every inbox and outbox I/O of the SPM's host takes {delay * 1000:.0f} ms")
    storage.fs.set([{"op": "read", "start": ib0, "end": ib1, "delay": delay},
                    {"op": "write", "start": ob0, "end": ob1, "delay": delay}])
    try:
        futures = t.burst(hosts, volumes_per_host=per_host, steps=steps)
        t.wait_answers(futures)
        after = _spm_io(control)
        inbox, outbox = _rule_counts(storage.fs)
    finally:
        storage.fs.set([])
    history.record("inject", what="mailbox storage fast again")
    _prove_reached(t, before, after, inbox, outbox)
    t.expect(inbox["delayed"] > 0 and outbox["delayed"] > 0, "no mailbox I/O was delayed")
    t.expect(after["errors"] == before["errors"],
             f"the SPM counted {after['errors'] - before['errors']} mailbox errors on slow storage")
    _check_spm(t)


def slow_mailbox(t: Trial) -> None:
    """Slow mailbox storage: every inbox read and outbox write of the SPM's host takes 200-500 ms (FUSE layer).

    Must hold: every request is answered exactly once (later, not lost);
    the SPM counts no mailbox error, stays up and keeps its lease (the
    standby never serves); the FUSE layer saw every mailbox I/O the SPM
    issued (O_DIRECT reached it).
    """
    _slow(t, [3, 4], per_host=1, steps=2)


def slow_mailbox_long(t: Trial) -> None:
    """Slow mailbox storage under a larger burst (4 hosts, 3 volumes each, 3 steps).

    Must hold: as slow-mailbox.
    """
    _slow(t, [3, 4, 5, 6], per_host=3, steps=3)


ERROR_LINE = re.compile(r"^.*mailbox storage error: .*$", re.MULTILINE)


def _failing(t: Trial, hosts: list[int], per_host: int, steps: int, budget: int) -> None:
    storage, control, ranges = _setup(t)
    (ib0, ib1), (ob0, ob1) = ranges[c.INBOX], ranges[c.OUTBOX]
    p_read, p_write = round(t.rng.uniform(0.2, 0.6), 2), round(t.rng.uniform(0.3, 0.8), 2)
    before = _spm_io(control)
    t.inject(f"EIO on {p_read:.0%} of inbox reads and {p_write:.0%} of outbox writes of the SPM's host "
             f"(at most {budget} each)")
    storage.fs.set([{"op": "read", "start": ib0, "end": ib1, "eio": p_read, "count": budget},
                    {"op": "write", "start": ob0, "end": ob1, "eio": p_write, "count": budget}],
                   seed=t.rng.randrange(2**32))
    try:
        futures = t.burst(hosts, volumes_per_host=per_host, steps=steps)
        t.wait_answers(futures)
        # A short burst may meet no failing read; the SPM's own polling of
        # the event block does, soon.
        wait_for(lambda: _rule_counts(storage.fs)[0]["eios"] > 0, timeout=30, interval=0.2,
                 what="a failed inbox read")
        after = _spm_io(control)
        inbox, outbox = _rule_counts(storage.fs)
    finally:
        storage.fs.set([])
    history.record("inject", what="mailbox storage healthy again")
    _prove_reached(t, before, after, inbox, outbox)
    eios = inbox["eios"] + outbox["eios"]
    t.phase(f"{inbox['eios']} inbox reads and {outbox['eios']} outbox writes failed; "
            f"the SPM counted {after['errors'] - before['errors']} mailbox errors")
    t.expect(inbox["eios"] > 0, "no inbox read failed: the fault did not reach the SPM")
    t.expect(after["errors"] > before["errors"], "the SPM counted no mailbox error")
    log = t.log_of(t.spms[0].name)
    lines = ERROR_LINE.findall(log)
    t.expect(bool(lines), f"the SPM logged no 'mailbox storage error' line for {eios} EIOs")
    t.expect(all("Input/output error" in line or "EIO" in line or "Errno 5" in line for line in lines),
             f"a mailbox error line does not name the I/O error: {lines[:1]}")
    t.expect("Traceback" not in log, "the SPM logged a traceback")
    # Once healthy, a new request is served at once.
    more = t.burst([hosts[0]], volumes_per_host=1, steps=1)
    t.wait_answers(more, timeout=30)
    _check_spm(t)


def failing_mailbox(t: Trial) -> None:
    """Failing mailbox storage: EIO on some inbox reads and outbox writes of the SPM's host (FUSE layer, <= 8 each).

    Must hold: the SPM logs each failure as one line "mailbox storage
    error: ... Input/output error" (no traceback), counts it, retries and
    answers every request exactly once; it stays up and keeps its lease
    (the standby never serves); the FUSE layer saw every mailbox I/O the
    SPM issued.
    """
    _failing(t, [3, 4], per_host=2, steps=2, budget=8)


def failing_mailbox_long(t: Trial) -> None:
    """Failing mailbox storage under a larger burst, up to 40 EIOs on reads and on writes.

    Must hold: as failing-mailbox.
    """
    _failing(t, [3, 4, 5, 6], per_host=3, steps=3, budget=40)


# (name, function, long): registered in scenarios.SCENARIOS.
SCENARIOS = [
    ("slow-mailbox", slow_mailbox, False),
    ("failing-mailbox", failing_mailbox, False),
    ("slow-mailbox-long", slow_mailbox_long, True),
    ("failing-mailbox-long", failing_mailbox_long, True),
]
