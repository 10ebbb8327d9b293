"""Proving a trial from its recorded history (xtnd.common.history).

The history is the merged event list of every process of a trial: the SPMs
and the harness's HSM clients write it themselves; the harness adds
``inject`` (a fault it caused, with ``what``), ``killed`` (pid, name: a
process it killed on purpose) and ``died`` (pid, name, rc: a process that
ended although nobody killed it). ``check()`` proves, for one trial:

1. every request sent (``sent``) was taken (``taken``) exactly once within
   ``bound`` seconds; a failure answer (granted 0) carries a reason
   (``done`` with a reason from the SPM); a taken answer was put in the
   outbox (``reply``) by a process serving at that moment; requests of a
   client that was killed (``killed``/``died``) are not counted: a client
   that is restarted asks again;
2. no LVM metadata write (``lvm_start``/``lvm_done``) and no reply by a
   process that did not hold the lease: a process holds it from its
   ``serving`` event until the next ``serving`` of another process (which
   sanlock granted only once the lease was free); and no two serving
   intervals overlap: an interval lasts from ``serving`` to the process's
   last write or its clean ``stopped``, whichever is later;
3. no LV was extended beyond the largest size asked for it (rounded up to
   the extent size), and none shrank or grew past that (``sizes``: LV ->
   (before, after) as lvs reported them);
4. every VM paused for ENOSPC was resumed later, and no VM paused for
   another reason was resumed by the HSM;
5. no process died but those the scenario allows (``may_die``: names).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

MiB = 1024**2
WRITES = ("lvm_start", "lvm_done", "reply")


@dataclasses.dataclass
class TrialResult:
    sent: int = 0
    answered: int = 0
    refused: int = 0
    lost: int = 0
    wrong_extends: int = 0
    overlaps: int = 0
    recovery: float | None = None
    violations: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    def fail(self, text: str) -> None:
        self.violations.append(text)


def _round_up(size: int, extent: int) -> int:
    return -(-size // extent) * extent


def _key(e: dict[str, Any]) -> tuple[int, str, int]:
    return (int(e["host"]), str(e["volume"]), int(e["size_mb"]))


def check(
    events: Iterable[dict[str, Any]],
    bound: float = 60.0,
    extent: int = 4 * MiB,
    sizes: dict[str, tuple[int, int]] | None = None,
    may_die: Iterable[str] = (),
) -> TrialResult:
    evs = sorted(events, key=lambda e: float(e["t"]))
    r = TrialResult()
    _check_answers(evs, bound, r)
    _check_holders(evs, r)
    _check_sizes(evs, extent, sizes or {}, r)
    _check_vms(evs, r)
    _check_deaths(evs, set(may_die), r)
    _recovery(evs, r)
    return r


def _check_answers(evs: list[dict[str, Any]], bound: float, r: TrialResult) -> None:
    pending: dict[tuple[int, str, int], list[tuple[float, int]]] = defaultdict(list)
    reasons: dict[tuple[int, str, int], str] = {}
    replied: dict[tuple[int, str, int], list[float]] = defaultdict(list)
    for e in evs:
        ev = e["ev"]
        if ev == "sent":
            r.sent += 1
            pending[_key(e)].append((float(e["t"]), int(e["pid"])))
        elif ev in ("killed", "died"):
            # A client killed with requests in flight: its restart asks again.
            gone = int(e.get("target", 0))
            for key, items in pending.items():
                kept = [item for item in items if item[1] != gone]
                r.sent -= len(items) - len(kept)
                pending[key] = kept
        elif ev == "done" and e.get("reason"):
            reasons[_key(e)] = str(e["reason"])
        elif ev == "reply":
            replied[_key(e)].append(float(e["t"]))
        elif ev == "taken":
            key = _key(e)
            if not pending[key]:
                r.fail(f"answer taken twice or never asked: host {key[0]} volume {key[1]} size {key[2]} MiB")
                continue
            sent = pending[key].pop(0)[0]
            t = float(e["t"])
            r.answered += 1
            if t - sent > bound:
                r.fail(f"answer after {t - sent:.1f}s > {bound:.0f}s: host {key[0]} volume {key[1]}")
            # The reply may predate this send: a client restarted with the
            # same request in the same slot takes the answer to its first
            # incarnation's identical request (the protocol has no ids).
            if not any(rt <= t for rt in replied[key]):
                r.fail(f"answer taken with no reply written by an SPM: host {key[0]} volume {key[1]} size {key[2]}")
            if int(e["granted"]) == 0:
                r.refused += 1
                if key not in reasons:
                    r.fail(f"failure answer without a reason: host {key[0]} volume {key[1]} size {key[2]} MiB")
    for key, times in pending.items():
        for _ in times:
            r.lost += 1
            r.fail(f"request never answered: host {key[0]} volume {key[1]} size {key[2]} MiB")


def _check_holders(evs: list[dict[str, Any]], r: TrialResult) -> None:
    # Acquisitions in time order: (t, pid). A pid holds from its acquisition
    # until the next acquisition by another pid.
    acqs = [(float(e["t"]), int(e["pid"])) for e in evs if e["ev"] == "serving"]
    ends: dict[int, float] = {}  # acquisition index -> end of its interval
    for e in evs:
        if e["ev"] not in WRITES and not (e["ev"] == "stopped" and e.get("reason") != "lease-lost"):
            continue
        t, pid = float(e["t"]), int(e["pid"])
        mine = [i for i, (at, p) in enumerate(acqs) if p == pid and at <= t]
        if not mine:
            if e["ev"] in WRITES:
                r.fail(f"{e['ev']} by pid {pid} ({e.get('name', '')}) that never held the lease")
            continue
        k = mine[-1]
        ends[k] = max(ends.get(k, acqs[k][0]), t)
        later = [i for i in range(k + 1, len(acqs)) if acqs[i][1] != pid and acqs[i][0] < t]
        if later and e["ev"] in WRITES:
            r.fail(f"{e['ev']} by pid {pid} at {t:.3f} after pid {acqs[later[0]][1]} took the lease "
                   f"at {acqs[later[0]][0]:.3f}")
    for k in range(len(acqs) - 1):
        end = ends.get(k, acqs[k][0])
        if acqs[k + 1][1] != acqs[k][1] and end > acqs[k + 1][0]:
            r.overlaps += 1
            r.fail(f"serving intervals overlap: pid {acqs[k][1]} until {end:.3f}, "
                   f"pid {acqs[k + 1][1]} from {acqs[k + 1][0]:.3f}")


def _check_sizes(evs: list[dict[str, Any]], extent: int, sizes: dict[str, tuple[int, int]], r: TrialResult) -> None:
    asked: dict[str, int] = defaultdict(int)
    for e in evs:
        if e["ev"] in ("sent", "seen"):
            asked[str(e["volume"])] = max(asked[str(e["volume"])], int(e["size_mb"]) * MiB)
    for e in evs:
        if e["ev"] == "lvm_start" and e.get("cmd") == "lvextend":
            lv = str(e["lv"])
            if int(e["size"]) > _round_up(asked.get(lv, 0), extent):
                r.wrong_extends += 1
                r.fail(f"lvextend of {lv} to {int(e['size']) // MiB} MiB, largest asked "
                       f"{asked.get(lv, 0) // MiB} MiB")
    for lv, (before, after) in sizes.items():
        if after < before:
            r.wrong_extends += 1
            r.fail(f"LV {lv} shrank from {before // MiB} to {after // MiB} MiB")
        elif after > max(before, _round_up(asked.get(lv, 0), extent)):
            r.wrong_extends += 1
            r.fail(f"LV {lv} grew to {after // MiB} MiB, largest asked {asked.get(lv, 0) // MiB} MiB")


def _check_vms(evs: list[dict[str, Any]], r: TrialResult) -> None:
    paused: dict[str, str] = {}
    for e in evs:
        vm = str(e.get("vm", ""))
        if e["ev"] == "paused":
            paused[vm] = str(e.get("reason", ""))
        elif e["ev"] == "resumed":
            reason = paused.pop(vm, None)
            if reason is not None and reason != "enospc":
                r.fail(f"VM {vm} paused for {reason!r} was resumed")
    for vm, reason in paused.items():
        if reason == "enospc":
            r.fail(f"VM {vm} paused for ENOSPC never resumed")


def _check_deaths(evs: list[dict[str, Any]], may_die: set[str], r: TrialResult) -> None:
    for e in evs:
        if e["ev"] == "died" and e.get("name") not in may_die:
            r.fail(f"{e.get('name')} (pid {e.get('target')}) died rc={e.get('rc')} and was not the one killed")


def _recovery(evs: list[dict[str, Any]], r: TrialResult) -> None:
    """Seconds from the first injected fault to the first answer after it."""
    inject = next((float(e["t"]) for e in evs if e["ev"] == "inject"), None)
    if inject is None:
        return
    taken = next((float(e["t"]) for e in evs if e["ev"] == "taken" and float(e["t"]) >= inject), None)
    if taken is not None:
        r.recovery = taken - inject
