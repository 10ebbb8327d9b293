"""``xtnd inject soak``: many simulated hosts, random faults, every request counted.

One rig with room for ``hosts`` mailbox hosts (the shared rig's master
domain is made with that many host ids), two SPM candidates on their own
sanlock daemons, and for ``duration`` seconds:

- lean clients (xtnd.tools.mailbox_lean, one process, real O_DIRECT I/O
  and the full request/reply/clean handshake) for hosts 3..hosts+2, in
  rounds: every host sends one request at once; each request names a
  volume the SPM does not know, so it is answered with a refusal without
  LVM (this load is on the mailbox and the SPM's serving loop);
- two HSM mailbox clients (hosts 1 and 2: the real HSM mailbox code) extend
  a real volume each by one extent every 4 rounds (up to 300 MiB),
  recorded in the history;
- every ``fault_interval`` seconds a random fault from: SIGKILL of the
  serving SPM (a new standby is started in its place), SIGSTOP of it for
  2 s, an LVM lock held for 2 s.

Verdict: no lean request unanswered at the end of its round, and the
history of the real clients passes the checker (every request answered
once by a holder, no overlap, no LV past its size, no unexpected death).
"""

from __future__ import annotations

import random
import signal
import statistics
import time
from concurrent.futures import Future
from typing import Any

from xtnd.common import history
from xtnd.mailbox.directio import DirectFile
from xtnd.tools.inject.harness import Spm, Trial, progress
from xtnd.tools.mailbox_lean import LeanHosts
from xtnd.tools.rig import spmd
from xtnd.tools.rig.spmd import EXTENT, MiB

REAL_EVERY = 4
REAL_CAP = 300 * MiB


def _serving(t: Trial) -> Spm | None:
    for spm in t.spms:
        if spm.alive() and spm.proc.serving() and spm.proc.serving()[-1][0] == "started":
            return spm
    return None


def run(t: Trial, hosts: int, duration: float, seed: int, fault_interval: float = 10.0) -> dict[str, Any]:
    rng = random.Random(seed)
    t.bound = 120.0
    standby_host = {1: 2, 2: 1}
    t.spm(1)
    t.spm(2, wait=False).proc.wait_log(r"SPM lease busy", timeout=120)
    mbx = t.rig.mailbox
    inbox, outbox = DirectFile(mbx.inbox), DirectFile(mbx.outbox)
    lean = LeanHosts(inbox, outbox, list(range(3, hosts + 3)))
    clients = [t.client(1), t.client(2)]
    # One volume per client, one extent more every REAL_EVERY rounds, up to
    # REAL_CAP: both fit in the rig's VG, so every real extend succeeds.
    vols = [[t.volume(capacity=1024 * MiB)] for _ in clients]
    sizes = {v: 8 * MiB for vs in vols for v in vs}
    pending: list[Future[int]] = []
    latencies: list[float] = []
    lean_sent = lean_lost = rounds = 0
    faults: dict[str, int] = {}
    start = time.monotonic()
    next_fault = start + fault_interval
    try:
        while time.monotonic() - start < duration:
            # The real clients: one more extent for each of their volumes.
            for client, vs in zip(clients, vols, strict=True):
                for v in vs:
                    if rounds % REAL_EVERY == 0 and sizes[v] < REAL_CAP:
                        sizes[v] += EXTENT
                        pending.append(client.submit(t.pool.uuid, v, sizes[v]))
            # Every lean request is refused (unknown volume): a reply that
            # differs from the request is expected; only missing ones count.
            lat, _ = lean.round(1)
            rounds += 1
            lean_sent += hosts
            latencies += lat
            lean_lost += hosts - len(lat)
            if time.monotonic() >= next_fault:
                next_fault = time.monotonic() + fault_interval
                kind = rng.choice(["spm-kill", "spm-stop", "lvm-lock"])
                faults[kind] = faults.get(kind, 0) + 1
                serving = _serving(t)
                progress(f"soak: round {rounds}, fault {kind}")
                history.record("inject", what=kind)
                if kind == "spm-kill" and serving is not None:
                    t.kill(serving)
                    t.spm(standby_host[serving.host_id], wait=False)
                elif kind == "spm-stop" and serving is not None:
                    serving.proc.proc.send_signal(signal.SIGSTOP)
                    time.sleep(2)
                    serving.proc.proc.send_signal(signal.SIGCONT)
                    if not serving.alive():
                        t.may_die.add(serving.name)
                elif kind == "lvm-lock":
                    with spmd.vg_locked(str(t.pool.uuid)):
                        time.sleep(2)
                # A stopped SPM may exit (known stall-guard behaviour) or a
                # killed one leave: keep a standby for every serving SPM.
                for spm in list(t.spms):
                    if not spm.alive() and not spm.killed:
                        t.may_die.add(spm.name)
                        spm.killed = True
                        t.spm(spm.host_id, wait=False)
        t.phase("soak over: waiting for the real clients' answers")
        answered = t.wait_answers({i: f for i, f in enumerate(pending)})
    finally:
        inbox.close()
        outbox.close()
    lat_ms = sorted(x * 1000 for x in latencies)
    return {
        "hosts": hosts,
        "duration": round(time.monotonic() - start, 1),
        "rounds": rounds,
        "lean_sent": lean_sent,
        "lean_answered": len(latencies),
        "lean_lost": lean_lost,
        "real_sent": len(pending),
        "real_answered": answered,
        "faults": faults,
        "latency_ms": {
            "p50": round(statistics.median(lat_ms), 1) if lat_ms else None,
            "p99": round(lat_ms[int(len(lat_ms) * 0.99) - 1], 1) if lat_ms else None,
            "max": round(lat_ms[-1], 1) if lat_ms else None,
        },
    }

