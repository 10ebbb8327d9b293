"""The ``xtnd inject`` scenarios that need real guests (xtnd.tools.inject.guestrig).

Each trial has its own thin qcow2 volumes, linked under the trial's run
folder, TCG guests writing a known pattern to them and reading it back
(xtnd.tools.rig.guest), a real ``xtnd hsm`` watching them through the run's
private libvirtd, and a real ``xtnd spm`` extending them. Without
device-mapper a volume is mapped by one loop device and must stay one
segment: the SPMs here extend with ``alloc = contiguous`` and every guest
volume has its own free room right after it.

Besides each scenario's own checks, the checker proves from the history
that every VM the HSM saw paused for ENOSPC was resumed and that no VM
paused for another reason (``paused`` with reason ``user``, recorded by
the harness when it suspends a guest as an operator would) was resumed.
Each docstring's "Must hold" is the expected outcome (``xtnd inject
--list`` and README.md show it).
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator
from typing import Any

import libvirt
from xtnd import lvm
from xtnd.common import history
from xtnd.tools.inject.guestrig import GuestVolume, HsmDaemon
from xtnd.tools.inject.harness import Trial
from xtnd.tools.rig import guest, spmd
from xtnd.tools.rig.spmd import EXTENT, MiB
from xtnd.tools.rig.wait import wait_for

# One segment per LV (loop mapping); a long lvm command_timeout so that an
# lvextend held on the VG lock by a scenario is not killed meanwhile.
SPM_CONFIG = {"lvm.alloc": "contiguous", "lvm.command_timeout": "30", "spm.shutdown_grace": "40"}
# TCG guests: boot a few seconds, write ~3 MiB/s.
GUEST_TIMEOUT = 180.0

PAUSED_ENOSPC = (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_IOERROR)
PAUSED_USER = (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_USER)


def _run_dir(t: Trial) -> str:
    path = os.path.join(t.dir, "run")
    os.makedirs(path, mode=0o755)
    return path


@contextlib.contextmanager
def _guests(t: Trial) -> Iterator[Callable[[GuestVolume, guest.Workload], guest.Guest]]:
    """start(volume, workload) -> a started guest; all removed at the end."""
    rig = t.rig.guests()
    started: list[guest.Guest] = []

    def start(vol: GuestVolume, workload: guest.Workload) -> guest.Guest:
        g = rig.define(vol.link, workload, t.dir)
        started.append(g)
        g.start()
        t.phase(f"guest {g.name} started on volume {vol.uuid}")
        return g

    try:
        yield start
    finally:
        for g in started:
            rig.remove(g)


def _events(t: Trial, ev: str, **match: Any) -> list[dict[str, Any]]:
    return [e for e in t.events(ev) if all(str(e.get(k)) == str(v) for k, v in match.items())]


def _progress(g: guest.Guest) -> int:
    """MiB the guest says it wrote so far (its console; libvirtd may be down)."""
    lines = [ln for ln in g.console().splitlines() if ln.startswith("XTND-PROGRESS mb=")]
    return int(lines[-1].split("=")[1]) if lines else 0


def _finished(t: Trial, g: guest.Guest, write_mb: int) -> None:
    """The guest wrote everything and read it back intact (so it ran again)."""
    text = g.wait_console("XTND-VERIFY-OK", timeout=GUEST_TIMEOUT)
    t.expect(f"XTND-WRITE-DONE mb={write_mb}" in text, f"guest {g.name} did not write its {write_mb} MiB")


def _filler(t: Trial, size: int) -> str:
    name = str(uuidlib.uuid4())
    lvm.lvcreate(t.pool.domain.runner, t.pool.domain.vg, name, size)
    return name


def _adjacent(t: Trial, first: str, second: str) -> bool:
    runner, vg = t.pool.domain.runner, t.pool.domain.vg
    a, b = lvm.lv_info(runner, vg, first).segments, lvm.lv_info(runner, vg, second).segments
    return len(a) == 1 and len(b) == 1 and a[0].pv == b[0].pv and a[0].first_pe + a[0].extents == b[0].first_pe


def _volumes(t: Trial, run_dir: str, *initial: int, room: int = 64 * MiB) -> list[GuestVolume]:
    """Guest volumes with ``room`` bytes free right after each (one segment
    each as they grow): each is made with a spacer LV after it, removed
    once all are made."""
    runner, vg = t.pool.domain.runner, t.pool.domain.vg
    vols, spacers = [], []
    try:
        for size in initial:
            vols.append(GuestVolume(t, run_dir, initial=size))
            spacers.append(_filler(t, room))
            if not _adjacent(t, str(vols[-1].uuid), spacers[-1]):
                raise AssertionError(f"no room right after volume {vols[-1].uuid}: the VG is fragmented")
    finally:
        for name in spacers:
            lvm.lvremove(runner, vg, name)
    return vols


def hsm_kill_paused(t: Trial) -> None:
    """HSM SIGKILLed while its VM is paused on ENOSPC, then restarted; a VM paused by the operator beside it.

    Two guests on one ``xtnd hsm`` (no headroom: every chunk ends in
    ENOSPC); the operator suspends one (as ``virsh suspend``); the other
    pauses on ENOSPC and the HSM is killed with its extend in flight (the
    SPM's lvextend held on the VG lock) or before any SPM serves.
    Must hold: the restarted HSM finds the VM paused for ENOSPC, has its
    disk extended and resumes it, and the guest finishes its writes with
    its data intact; the operator's VM is never resumed (still paused by
    the user at the end); every request of the surviving HSM is answered
    exactly once; no daemon dies but the killed HSM.
    """
    variant = t.rng.choice(["extend-in-flight", "no-spm-yet"])
    t.phase(f"variant {variant}")
    run_dir = _run_dir(t)
    # The operator's volume (16 MiB) never fills.
    full, held = _volumes(t, run_dir, 8 * MiB, 16 * MiB)
    # The daemons start while the guests boot.
    spm = t.spm(1, config=SPM_CONFIG, wait=False) if variant == "extend-in-flight" else None
    hsm = HsmDaemon(t, run_dir, chunk_mb=8, utilization=100)
    hsm.start(wait=False)
    write_mb = 12
    with _guests(t) as start, contextlib.ExitStack() as lock:
        user = start(held, guest.Workload(write_mb=2, rate=1, hold=True))
        hsm.wait_connected()
        if spm is not None:
            spm.proc.wait_serving(timeout=120)
            # Writers of the VG wait (the SPM's lvextend); readers do not.
            lock.enter_context(spmd.vg_locked(str(t.pool.uuid), shared=True))
        paused = start(full, guest.Workload(write_mb=write_mb))
        user.wait_console("XTND-START", timeout=GUEST_TIMEOUT)
        user.dom.suspend()
        history.record("paused", vm=user.dom.UUIDString(), reason="user")
        t.phase("the operator suspended one guest")
        paused.wait_state(*PAUSED_ENOSPC, timeout=GUEST_TIMEOUT)
        vm = paused.dom.UUIDString()
        wait_for(lambda: _events(t, "paused", vm=vm, reason="enospc", name=hsm.name), timeout=30, interval=0.05,
                 what="the HSM to see the ENOSPC pause")
        if variant == "extend-in-flight":
            wait_for(lambda: _events(t, "lvm_start", lv=full.uuid), timeout=30, interval=0.05,
                     what="the SPM's lvextend, held on the VG lock")
        else:
            wait_for(lambda: _events(t, "sent", volume=full.uuid), timeout=30, interval=0.05,
                     what="the HSM's extend request")
        t.inject(f"SIGKILL of xtnd hsm while its VM is paused on ENOSPC ({variant})")
        hsm.kill()
        t.expect(paused.state() == PAUSED_ENOSPC, f"the VM is {paused.state()} once its HSM died, expected paused")
        spm_first = variant == "no-spm-yet" and t.rng.random() < 0.5
        if spm_first:
            t.spm(1, config=SPM_CONFIG)
        hsm.start()
        lock.close()  # the held lvextend goes on
        if variant == "no-spm-yet" and not spm_first:
            t.spm(1, config=SPM_CONFIG)
        t.phase("waiting for the paused guest to finish")
        _finished(t, paused, write_mb)
        resumed = _events(t, "resumed", vm=vm)
        t.expect(any(e["name"] != "hsm1" for e in resumed), "the restarted HSM resumed nothing")
        t.expect(user.state() == PAUSED_USER, f"the operator's VM is {user.state()}, expected paused by the user")
        hsm.stop()
    t.expect(t.pool.lv_size(held.uuid) == t.sizes_before[str(held.uuid)], "the operator's volume was extended")


def vg_full_guests(t: Trial) -> None:
    """The VG is full while two guests write: they pause on ENOSPC; space is freed next to their volumes.

    Each guest volume is followed by a 32 MiB filler LV and the rest of the
    VG is filled, so every extend is refused ("no free space") and both
    guests pause on ENOSPC while the HSM retries with backoff. Then the
    fillers next to the volumes are removed (the space a volume can grow
    into here: without device-mapper it must stay one segment, so a new
    PV, vgextend, would not do).
    Must hold: the refusals carry the reason "no free space" and change
    nothing; once space is free the HSM's next retry extends both volumes
    and resumes both VMs with no other action; both guests finish with
    their data intact; nothing lost, no daemon dies.
    """
    run_dir = _run_dir(t)
    runner, vg = t.pool.domain.runner, t.pool.domain.vg
    vols, fillers = [], []
    rest = ""
    try:
        for _ in range(2):
            vol = GuestVolume(t, run_dir, initial=8 * MiB)
            filler = _filler(t, 32 * MiB)
            vols.append(vol)
            fillers.append(filler)
            t.expect(_adjacent(t, str(vol.uuid), filler), f"filler {filler} does not follow volume {vol.uuid}")
        free = t.pool.free_extents()
        if free:
            rest = _filler(t, free * EXTENT)
        spm = t.spm(1, config=SPM_CONFIG, wait=False)
        hsm = HsmDaemon(t, run_dir, chunk_mb=8, utilization=50)
        hsm.start(wait=False)
        write_mb = 12
        with _guests(t) as start:
            t.inject("two guests writing into a full VG")
            guests = [start(vol, guest.Workload(write_mb=write_mb)) for vol in vols]
            hsm.wait_connected()
            spm.proc.wait_serving(timeout=120)
            for g in guests:
                g.wait_state(*PAUSED_ENOSPC, timeout=GUEST_TIMEOUT)
            for vol in vols:

                def refused(v: GuestVolume = vol) -> bool:
                    return any("no free space" in str(e.get("reason")) for e in _events(t, "done", volume=v.uuid))

                wait_for(refused, timeout=30, interval=0.05, what=f"a 'no free space' refusal for {vol.uuid}")
                t.expect(t.pool.lv_size(vol.uuid) == 8 * MiB, f"{vol.uuid} changed although the VG is full")
            t.inject("the fillers next to the guest volumes removed")
            for filler in fillers:
                lvm.lvremove(runner, vg, filler)
            fillers.clear()
            for g in guests:
                _finished(t, g, write_mb)
            for vol in vols:
                t.expect(t.pool.lv_size(vol.uuid) >= write_mb * MiB, f"{vol.uuid} not extended after space came")
            hsm.stop()
    finally:
        for name in [*fillers, *([rest] if rest else [])]:
            with contextlib.suppress(lvm.LVMError):
                lvm.lvremove(runner, vg, name)


def libvirtd_restart(t: Trial) -> None:
    """libvirtd SIGKILLed and restarted under a running HSM while its guest crosses a threshold.

    The guest writes steadily (4 MiB/s, 8 MiB chunks with 4 MiB of
    headroom); libvirtd is killed before the guest crosses its next
    threshold and started again after it crossed (the event is lost), or
    killed while the extend for a crossing is in flight (the HSM cannot
    re-arm the threshold until it is back).
    Must hold: the HSM reconnects, registers its events again, re-reads
    every drive, re-arms the thresholds and extends past the crossing it
    missed; the guest finishes with its data intact (a pause while libvirtd
    was down is resumed); every request answered exactly once; the HSM
    and the SPM stay up.
    """
    variant = t.rng.choice(["threshold-while-down", "extend-in-flight"])
    t.phase(f"variant {variant}")
    run_dir = _run_dir(t)
    [vol] = _volumes(t, run_dir, 16 * MiB)
    spm = t.spm(1, config=SPM_CONFIG, wait=False)
    hsm = HsmDaemon(t, run_dir, chunk_mb=8, utilization=50)
    hsm.start(wait=False)
    rig = t.rig.guests()
    write_mb = 20
    with _guests(t) as start:
        g = start(vol, guest.Workload(write_mb=write_mb, rate=4))
        hsm.wait_connected()
        spm.proc.wait_serving(timeout=120)
        if variant == "threshold-while-down":
            # The first threshold is at 12 MiB of allocation (16 - 4).
            wait_for(lambda: _progress(g) >= 3, timeout=GUEST_TIMEOUT, interval=0.05, what="guest past 3 MiB")
        else:
            wait_for(lambda: _events(t, "sent", volume=vol.uuid), timeout=GUEST_TIMEOUT, interval=0.02,
                     what="an extend request")
        down_at = _progress(g)
        t.inject(f"SIGKILL of libvirtd ({variant})")
        rig.kill_libvirtd()
        wait_for(lambda: _progress(g) >= down_at + 8, timeout=GUEST_TIMEOUT, interval=0.05,
                 what=f"guest past {down_at + 8} MiB while libvirtd is down")
        restarted = time.monotonic()
        rig.start_libvirtd()
        history.record("inject", what="libvirtd started again")
        wait_for(lambda: "generation=2" in hsm.log(), timeout=60, interval=0.05, what="the HSM to reconnect")
        _finished(t, g, write_mb)
        after = [e for e in _events(t, "sent", volume=vol.uuid) if float(e["t"]) > restarted]
        t.expect(bool(after), "no extend after libvirtd came back")
        t.expect(t.pool.lv_size(vol.uuid) >= write_mb * MiB, f"the volume is {t.pool.lv_size(vol.uuid) // MiB} MiB")
        hsm.stop()


# (name, function, long): registered by xtnd.tools.inject.scenarios.
SCENARIOS: list[tuple[str, Callable[[Trial], None], bool]] = [
    ("hsm-kill-paused", hsm_kill_paused, False),
    ("vg-full-guests", vg_full_guests, False),
    ("libvirtd-restart", libvirtd_restart, False),
]
