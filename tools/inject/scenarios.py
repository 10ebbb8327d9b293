"""The scenarios of ``xtnd inject``: one function per fault, with what must hold.

Every scenario runs against the real rig (xtnd.tools.inject.harness): real
``xtnd spm`` processes with their own sanlock daemons, real LVM on a loop
PV, the real HSM mailbox code over O_DIRECT files. Besides its own checks
(``t.expect``), every trial is proven from its history by
xtnd.tools.inject.checker: every request answered exactly once by a lease
holder within the bound, no write by a non-holder, no overlapping SPMs, no
LV beyond the largest size asked, no daemon dead but the one killed.

Each scenario's docstring says what it does and what must hold (``xtnd
inject --list`` prints them; README.md lists them too).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
import uuid as uuidlib
from collections.abc import Callable

from xtnd import lvm
from xtnd.common import history
from xtnd.mailbox import codec
from xtnd.mailbox.directio import DirectFile
from xtnd.mailbox.hsm import ExtendFailed
from xtnd.spm.control import ControlClient
from xtnd.storage import constants as c
from xtnd.tools.inject import scen_fuse, scen_guest
from xtnd.tools.inject.harness import Trial, alive, descendants
from xtnd.tools.rig import loops, spmd
from xtnd.tools.rig.spmd import EXTENT, IO_TIMEOUT, MiB
from xtnd.tools.rig.wait import wait_for

BLOCK = codec.BLOCK_SIZE
# sanlock's host_dead_seconds for the rig's io_timeout: a frozen host's
# lease is free for others after this.
HOST_DEAD = 8 * IO_TIMEOUT + 60


@dataclasses.dataclass
class Scenario:
    name: str
    func: Callable[[Trial], None]
    # Long (minutes per trial): left out of the default test run's short form.
    long: bool = False
    # Needs real guests (xtnd.tools.inject.guestrig): run together in the tests.
    guests: bool = False

    @property
    def summary(self) -> str:
        doc = (self.func.__doc__ or "").strip()
        return doc.split("\n")[0]

    @property
    def expect(self) -> str:
        doc = (self.func.__doc__ or "").strip()
        _, _, rest = doc.partition("Must hold:")
        return " ".join(rest.split())


def _standby(t: Trial) -> None:
    """Start SPM host 2 as the standby; return once it waits for the lease."""
    spm2 = t.spm(2, wait=False)
    spm2.proc.wait_log(r"SPM lease busy", timeout=120)


def spm_kill(t: Trial) -> None:
    """SPM SIGKILLed in the middle of a burst from three hosts.

    Must hold: the standby takes the lease; every request is answered
    exactly once; the killed SPM writes nothing after it died; no LV grows
    past the size asked.
    """
    spm1 = t.spm(1)
    _standby(t)
    futures = t.burst([3, 4, 5], volumes_per_host=3, steps=3)
    t.wait_taken(t.rng.randrange(1, len(futures) // 2))
    t.inject("SIGKILL of the serving SPM")
    t.kill(spm1)
    t.phase("waiting for the standby and every answer")
    t.wait_answers(futures)


def spm_stop(t: Trial) -> None:
    """SPM alone SIGSTOPped for 3 s during a burst, then SIGCONT (scenario 2b).

    Must hold: its host's sanlock daemon keeps renewing, so the lease stays
    held and the standby never serves; once thawed the same SPM serves
    again; nothing is lost.
    """
    spm1 = t.spm(1)
    _standby(t)
    futures = t.burst([3, 4], volumes_per_host=2, steps=3)
    t.wait_taken(1)
    t.inject("SIGSTOP of the SPM process for 3s")
    t.kill(spm1, signal.SIGSTOP)
    time.sleep(3 * IO_TIMEOUT)  # the fault: the SPM stays frozen this long
    spm1.proc.proc.send_signal(signal.SIGCONT)
    history.record("signal", target=spm1.pid, name=spm1.name, signal="SIGCONT")
    t.wait_answers(futures)
    t.expect(spm1.alive(), "the thawed SPM exited")
    t.expect(not any(s[0] == "started" for s in t.spms[1].proc.serving()), "the standby served")


def host_freeze(t: Trial) -> None:
    """The SPM's whole host (sanlock daemon and SPM) SIGSTOPped past host-dead time, then thawed.

    Must hold: the standby takes the lease after sanlock's host-dead time
    (~70 s here); the thawed old SPM writes no LVM metadata and no reply
    after that and ends (exit 3, lease lost, or SIGKILL by its own sanlock
    daemon whose lockspace failed); every request is answered once.
    """
    spm1 = t.spm(1)
    _standby(t)
    t.bound = HOST_DEAD + 60
    futures = t.burst([3, 4], volumes_per_host=2, steps=2)
    t.wait_taken(1)
    host1 = t.rig.hosts[0]
    t.inject("SIGSTOP of host 1 (its sanlock daemon and its SPM)")
    history.record("signal", target=spm1.pid, name=spm1.name, signal="SIGSTOP")
    host1.proc.send_signal(signal.SIGSTOP) if host1.proc else None
    spm1.proc.proc.send_signal(signal.SIGSTOP)
    try:
        t.phase(f"waiting up to {HOST_DEAD + 60}s for the standby to take over")
        t.spms[1].proc.wait_serving(timeout=HOST_DEAD + 60)
    finally:
        if host1.proc:
            host1.proc.send_signal(signal.SIGCONT)
        spm1.proc.proc.send_signal(signal.SIGCONT)
    t.may_die.add(spm1.name)
    t.phase("thawed; waiting for the old SPM to leave and every answer")
    t.wait_answers(futures)
    wait_for(lambda: not spm1.alive(), timeout=60, what="the old SPM to exit")
    # Its watchdog sees the lease lost (exit 3), unless its sanlock daemon,
    # whose lockspace failed, kills it first (SIGKILL): either way it ends.
    rc = spm1.proc.proc.returncode
    t.expect(rc in (3, -signal.SIGKILL), f"old SPM exit code {rc}, expected 3 (lease lost) or SIGKILL by sanlock")


def lvextend_hang(t: Trial) -> None:
    """An lvextend hanging on a held LVM lock when the SPM is told to stop.

    Must hold: the SPM exits within shutdown_grace (the hung command is
    killed at command_timeout and answered as a failure with a reason, or
    left for the next SPM); no LVM process is left behind; the next SPM
    extends the volume when asked again.
    """
    vol = t.volume()  # before the SPM starts: it lists volumes while the lock is free
    spm1 = t.spm(1, config={"spm.shutdown_grace": "6", "lvm.command_timeout": "3"})
    hsm = t.client(3)
    vg = str(t.pool.uuid)
    with spmd.vg_locked(vg):
        fut = hsm.submit(t.pool.uuid, vol, 16 * MiB)
        t.wait_event("lvm_start")
        # The SPM's processes (the LVM shell or an lvm command) now.
        children = descendants(spm1.proc.proc.pid)
        t.inject("SIGTERM of the SPM while lvextend waits for the LVM lock")
        began = time.monotonic()
        rc = t.terminate(spm1)
        took = time.monotonic() - began
        left = [pid for pid in children if alive(pid)]
    t.expect(rc == 0, f"SPM exit code {rc} at stop, expected 0")
    t.expect(took < 6 + 3, f"SPM took {took:.1f}s to stop, shutdown_grace is 6s")
    t.expect(bool(children), "no LVM process of the SPM found while lvextend waited")
    t.expect(not left, f"processes of the SPM outlived it: {left}")
    t.spm(1)
    try:
        fut.result(timeout=t.bound)
    except ExtendFailed:
        t.phase("the hung extend was answered as a failure; asking again")
        again = hsm.submit(t.pool.uuid, vol, 16 * MiB)
        t.expect(again.result(timeout=t.bound) >= 16 * MiB, "the retried extend was not granted")


def hsm_kill(t: Trial) -> None:
    """An HSM client killed with requests in flight, then restarted with the same host id.

    Must hold: the restarted client's requests (the same ones) are answered
    exactly once; the SPM is not disturbed; no LV grows past the size asked.
    """
    vols = [t.volume() for _ in range(3)]  # before the SPM lists them
    t.spm(1)
    asks = [(v, 8 * MiB + step * EXTENT) for step in (1, 2) for v in vols]
    vg = str(t.pool.uuid)
    with spmd.vg_locked(vg):
        first = t.client_process(3, asks)
        t.wait_event("lvm_start")  # extends in flight, held by the lock
        t.inject("SIGKILL of the HSM client")
        t.kill_process(first, "hsm3")
    second = t.client_process(3, asks, name="hsm3.1")
    rc = second.wait(timeout=t.bound + 10)
    t.expect(rc == 0, f"restarted client exit code {rc}")


def crash_after_lvextend(t: Trial) -> None:
    """SPM crashes (fault point spm.after_lvextend) between an lvextend and its reply; restarted.

    Must hold: the restarted SPM answers the pending request (the volume
    already has the size: no second lvextend grows it further); every
    request answered exactly once; only the crashed SPM died.
    """
    nth = t.rng.randrange(1, 4)
    spm1 = t.spm(1, env={"XTND_FAULTS": f"spm.after_lvextend=kill@{nth}"})
    futures = t.burst([3, 4], volumes_per_host=2, steps=2)
    t.phase(f"waiting for the crash after lvextend #{nth}")
    wait_for(lambda: not spm1.alive(), timeout=60, what="the SPM to crash at the fault point")
    t.may_die.add(spm1.name)
    t.inject("SPM crashed between lvextend and reply")
    t.spm(1)
    t.wait_answers(futures)


def _corrupt_blocks(t: Trial, vol: uuidlib.UUID) -> dict[int, bytes]:
    good = codec.encode(codec.Extend.for_bytes(t.pool.uuid, vol, 40 * MiB))
    bad_sum = bytearray(codec.build_block([good]))
    bad_sum[codec.CHECKSUM_OFFSET] ^= 0xFF
    old = codec.build_block([codec.encode(codec.Extend.for_bytes(t.pool.uuid, vol, 44 * MiB))])
    new = codec.build_block([good, good[:1] + b"zzzz" + good[5:]])
    torn = new[: BLOCK // 2] + old[BLOCK // 2 :]
    unknown = codec.build_block([good[:1] + b"zzzz" + good[5:]])
    return {6: bytes(bad_sum), 7: torn, 8: t.rng.randbytes(BLOCK), 9: unknown}


def corrupt_inbox(t: Trial) -> None:
    """Corrupt inbox blocks (bad checksum, torn 4 KiB write, random bytes, unknown opcode) during a burst.

    Must hold: the SPM never acts on a corrupt block (no request seen from
    those hosts, no LV extended for them), keeps serving the valid hosts,
    and stays up.
    """
    t.spm(1)
    target = t.volume()
    futures = t.burst([3, 4], volumes_per_host=2, steps=2)
    mbx = t.rig.mailbox
    inbox = DirectFile(mbx.inbox)
    try:
        blocks = _corrupt_blocks(t, target)
        t.inject("corrupt blocks written into the inbox of hosts 6-9")
        for host, block in blocks.items():
            inbox.write(host * BLOCK, block)
        inbox.write(0, codec.encode_event())
        t.wait_answers(futures)
        # Another full inbox scan after the corruption, then clean up.
        more = t.burst([5], volumes_per_host=1, steps=1)
        t.wait_answers(more)
        for host in blocks:
            inbox.write(host * BLOCK, codec.EMPTY_BLOCK)
    finally:
        inbox.close()
    seen = [e for e in history.read(t.history) if e["ev"] == "seen" and int(e["host"]) in blocks]
    t.expect(not seen, f"the SPM took requests from corrupt blocks: {seen[:3]}")
    t.expect(t.pool.lv_size(target) == t.sizes_before[str(target)], "the volume named in corrupt blocks changed")


def refusals(t: Trial) -> None:
    """Requests the SPM must refuse: unknown domain/volume, special/foreign LV, above capacity x 1.1, shrink.

    Must hold: each is answered with a failure and a reason (a shrink: with
    the current size, nothing changed); no LVM command runs for them; a
    valid request after them is extended.
    """
    t.spm(1)
    hsm = t.client(3)
    vol = t.volume(capacity=100 * MiB, size=16 * MiB)
    runner, vg = t.pool.domain.runner, t.pool.domain.vg
    special, foreign = uuidlib.uuid4(), uuidlib.uuid4()
    lvm.lvcreate(runner, vg, str(special), 8 * MiB, (c.TAG_SPECIAL,))
    lvm.lvcreate(runner, vg, str(foreign), 8 * MiB)
    for lv in (special, foreign):
        t.volumes.append(lv)
        t.sizes_before[str(lv)] = t.pool.lv_size(lv)
    must_fail = {
        "unknown domain": hsm.submit(uuidlib.uuid4(), vol, 20 * MiB),
        "unknown volume": hsm.submit(t.pool.uuid, uuidlib.uuid4(), 20 * MiB),
        "special LV": hsm.submit(t.pool.uuid, special, 20 * MiB),
        "foreign LV": hsm.submit(t.pool.uuid, foreign, 20 * MiB),
        "beyond capacity x 1.1": hsm.submit(t.pool.uuid, vol, 111 * MiB),
    }
    t.inject("requests the SPM must refuse")
    for what, fut in must_fail.items():
        try:
            got = fut.result(timeout=t.bound)
            t.fail(f"{what}: granted {got // MiB} MiB, expected a refusal")
        except ExtendFailed:
            pass
    shrink = hsm.submit(t.pool.uuid, vol, 8 * MiB).result(timeout=t.bound)
    t.expect(shrink == 16 * MiB, f"shrink answered {shrink // MiB} MiB, expected the current 16 MiB")
    ok = hsm.submit(t.pool.uuid, vol, 24 * MiB).result(timeout=t.bound)
    t.expect(ok >= 24 * MiB, f"valid request after refusals granted {ok // MiB} MiB")
    for lv in (special, foreign, vol):
        want = t.sizes_before[str(lv)] if lv != vol else 24 * MiB
        t.expect(t.pool.lv_size(lv) == want, f"LV {lv} is {t.pool.lv_size(lv) // MiB} MiB, expected {want // MiB}")
    starts = [e for e in history.read(t.history) if e["ev"] == "lvm_start"]
    t.expect(len(starts) == 1, f"{len(starts)} lvextends ran, expected 1 (the valid request)")


def old_vdsm(t: Trial) -> None:
    """A vdsm-format request from a host writing no event block (old vdsm).

    Must hold: the SPM finds it by its periodic full inbox scan and answers
    within scan_interval plus a margin (10 s here).
    """
    t.spm(1)
    vol = t.volume()
    host, size_mb = 7, 8 + 2 * EXTENT // MiB
    req = codec.encode(codec.Extend(t.pool.uuid, vol, size_mb))
    mbx = t.rig.mailbox
    inbox, outbox = DirectFile(mbx.inbox), DirectFile(mbx.outbox)
    t.bound = 10.0
    try:
        t.inject("a request block with no event write")
        history.record("sent", host=host, volume=str(vol), size_mb=size_mb)
        inbox.write(host * BLOCK, codec.build_block([req]))

        def answered() -> bytes | None:
            raw = codec.slot(outbox.read(host * BLOCK, BLOCK), 0)
            return raw if raw[: codec.MESSAGE_HEAD_SIZE] == req[: codec.MESSAGE_HEAD_SIZE] else None

        reply = wait_for(answered, timeout=30, interval=0.05, what="the reply to the old-vdsm request")
        granted = getattr(codec.decode(reply), "size_mb", 0)
        history.record("taken", host=host, volume=str(vol), size_mb=size_mb, granted=granted)
        t.expect(granted == size_mb, f"granted {granted} MiB, asked {size_mb}")
        inbox.write(host * BLOCK, codec.EMPTY_BLOCK)
    finally:
        inbox.close()
        outbox.close()


def mailbox_loss(t: Trial) -> None:
    """The SPM's host loses its mailbox storage (inbox and outbox reads fail) during a burst; it returns after 3 s.

    Must hold: the SPM keeps its lease (its lease storage still works) and
    stays up, counting I/O errors; once the storage is back it answers
    every request exactly once; the standby never serves.
    """
    device = t.own_storage(1)
    spm1 = t.spm(1, config={f"domain {t.pool.uuid}.pvs": device})
    _standby(t)
    mailbox = t.lv_devices(device, c.INBOX, c.OUTBOX)
    t.expect(len(mailbox) == 2, f"found {len(mailbox)} mailbox devices of host 1, expected 2")
    control = ControlClient(os.path.join(t.pool.workdir, "spm1.sock"))
    errors = control.call("stats")["mailbox"]["errors"]
    t.inject("inbox and outbox of the SPM's host fail")
    loops.fail_storage(*mailbox)
    try:
        # Sent while the SPM cannot read them; the fault lasts 3 s.
        futures = t.burst([3, 4], volumes_per_host=2, steps=2)
        time.sleep(3)
    finally:
        loops.restore_storage(*mailbox)
    history.record("inject", what="mailbox storage back")
    t.wait_answers(futures)
    t.expect(spm1.alive(), f"the SPM exited rc={spm1.proc.proc.returncode} on mailbox I/O errors")
    after = control.call("stats")["mailbox"]["errors"]
    t.expect(after > errors, "the SPM saw no mailbox I/O error: the fault did not reach it")
    t.expect(not t.spms[1].proc.serving(), "the standby served")


def lease_loss(t: Trial) -> None:
    """The SPM's host loses its lease storage (ids and leases reads fail) during a burst; it returns later.

    Must hold: the SPM stops serving (exit 3, lease lost) before sanlock's
    renewal-fail time (8 s here) and writes nothing after; the standby
    takes the lease after host-dead time (~70 s); every request is
    answered exactly once.
    """
    device = t.own_storage(1)
    spm1 = t.spm(1, config={f"domain {t.pool.uuid}.pvs": device})
    _standby(t)
    t.bound = HOST_DEAD + 60
    lease = t.lv_devices(device, c.IDS, c.LEASES)
    t.expect(len(lease) == 2, f"found {len(lease)} lease devices of host 1, expected 2")
    t.inject("ids and leases of the SPM's host fail")
    failed = time.monotonic()
    loops.fail_storage(*lease)
    t.may_die.add(spm1.name)
    try:
        rc = spm1.proc.wait(timeout=8 * IO_TIMEOUT + 30)
        took = time.monotonic() - failed
        # Sent with no SPM serving: the recovery figure (fault to first
        # answer) is the time until the standby serves.
        futures = t.burst([3, 4], volumes_per_host=2, steps=2)
        t.expect(rc in (3, -signal.SIGKILL), f"SPM exit code {rc}, expected 3 (lease lost)")
        t.expect(took < 8 * IO_TIMEOUT, f"SPM stopped {took:.1f}s after its lease storage failed, "
                 f"sanlock's renewal-fail time is {8 * IO_TIMEOUT}s")
        t.phase(f"waiting up to {HOST_DEAD + 60}s for the standby")
        t.spms[1].proc.wait_serving(timeout=HOST_DEAD + 60)
    finally:
        loops.restore_storage(*lease)
    t.wait_answers(futures)


def vg_full(t: Trial) -> None:
    """The VG runs out of space during a burst, then space is freed (another LV removed).

    Must hold: extends that do not fit are answered as failures with the
    reason "no free space" (nothing extended partly, the SPM stays up);
    once space is free the same requests are extended to the size asked.
    """
    vols = [t.volume() for _ in range(4)]
    runner, vg = t.pool.domain.runner, t.pool.domain.vg
    free = lvm.vg_info(runner, vg).free_extents
    filler = uuidlib.uuid4()
    # Room for 2 of the 4 volumes to grow by 3 extents each.
    lvm.lvcreate(runner, vg, str(filler), (free - 6) * EXTENT)
    try:
        t.spm(1)
        hsm = t.client(3)
        target = 8 * MiB + 3 * EXTENT
        t.inject("a burst into a nearly full VG")
        futures = {v: hsm.submit(t.pool.uuid, v, target) for v in vols}
        failed = []
        for vol, fut in futures.items():
            try:
                fut.result(timeout=t.bound)
            except ExtendFailed:
                failed.append(vol)
        t.expect(bool(failed), "every extend fitted: the VG was not full")
        reasons = {str(e["volume"]): str(e["reason"]) for e in t.events("done") if e.get("reason")}
        for vol in failed:
            t.expect("no free space" in reasons.get(str(vol), ""), f"failure of {vol} without 'no free space'")
            t.expect(t.pool.lv_size(vol) == 8 * MiB, f"{vol} changed although its extend failed")
    finally:
        lvm.lvremove(runner, vg, str(filler))
    history.record("inject", what="space freed")
    for vol in failed:
        got = hsm.submit(t.pool.uuid, vol, target).result(timeout=t.bound)
        t.expect(got >= target, f"{vol} granted {got // MiB} MiB after space was freed")
    for vol in vols:
        size = t.pool.lv_size(vol)
        t.expect(size == target, f"{vol} is {size // MiB} MiB, expected {target // MiB}")


def duplicate_host_id(t: Trial) -> None:
    """Two HSM daemons configured with the same host id, on two hosts, while the SPM serves a burst.

    Must hold: the first (on the SPM's host, sharing its id) runs; the
    second is refused at start (exit 2, one line naming the id, no
    traceback); the SPM and every request are
    unaffected; the first stops cleanly.
    """
    spm1 = t.spm(1)
    first = t.hsm_daemon(1, 1, "hsm1")
    wait_for(lambda: "hsm started" in t.log_of("hsm1") or first.poll() is not None, timeout=60,
             what="the first HSM to start")
    t.expect(first.poll() is None, f"the first HSM exited rc={first.returncode}: {t.log_of('hsm1')[-500:]}")
    futures = t.burst([3, 4], volumes_per_host=2, steps=2)
    t.inject("a second HSM with host id 1 on host 2")
    second = t.hsm_daemon(2, 1, "hsm2-dup")
    rc = second.wait(timeout=60)
    out = t.log_of("hsm2-dup")
    t.expect(rc == 2, f"the duplicate HSM exited rc={rc}, expected 2: {out[-500:]}")
    t.expect("Traceback" not in out, "the duplicate HSM printed a traceback")
    t.expect("host id 1" in out, f"the refusal does not name host id 1: {out[-300:]}")
    t.wait_answers(futures)
    t.expect(spm1.alive() and first.poll() is None, "the SPM or the first HSM died")
    first.send_signal(signal.SIGTERM)
    t.expect(first.wait(timeout=60) == 0, f"the first HSM did not stop cleanly: {t.log_of('hsm1')[-500:]}")


SCENARIOS = [
    Scenario("spm-kill", spm_kill),
    Scenario("host-freeze", host_freeze, long=True),
    Scenario("spm-stop", spm_stop),
    Scenario("lvextend-hang", lvextend_hang),
    Scenario("hsm-kill", hsm_kill),
    Scenario("lease-loss", lease_loss, long=True),
    Scenario("mailbox-loss", mailbox_loss),
    Scenario("vg-full", vg_full),
    Scenario("duplicate-host-id", duplicate_host_id),
    Scenario("corrupt-inbox", corrupt_inbox),
    Scenario("refusals", refusals),
    Scenario("old-vdsm", old_vdsm),
    Scenario("crash-after-lvextend", crash_after_lvextend),
]
SCENARIOS += [Scenario(name, func, long=long, guests=True) for name, func, long in scen_guest.SCENARIOS]
SCENARIOS += [Scenario(name, func, long=long) for name, func, long in scen_fuse.SCENARIOS]
BY_NAME = {s.name: s for s in SCENARIOS}
