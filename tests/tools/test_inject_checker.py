"""The inject checker on synthetic histories: good ones pass, each kind of
violation fails with a reason naming it."""

from __future__ import annotations

from typing import Any

from xtnd.tools.inject.checker import MiB, check

V = "11111111-1111-1111-1111-111111111111"
SPM1, SPM2, HSM = 100, 200, 300


def ev(t: float, kind: str, pid: int, **fields: Any) -> dict[str, Any]:
    return {"t": t, "ev": kind, "pid": pid, "name": str(pid), **fields}


def req(host: int = 3, size_mb: int = 12) -> dict[str, Any]:
    return {"host": host, "volume": V, "size_mb": size_mb}


def good() -> list[dict[str, Any]]:
    """SPM1 serves one extend, is killed, SPM2 takes over and serves one."""
    return [
        ev(0.0, "serving", SPM1, host=1, generation=1),
        ev(1.0, "sent", HSM, **req(size_mb=12)),
        ev(1.1, "seen", SPM1, slot=0, **req(size_mb=12)),
        ev(1.2, "lvm_start", SPM1, cmd="lvextend", vg="vg", lv=V, size=12 * MiB),
        ev(1.3, "lvm_done", SPM1, cmd="lvextend", vg="vg", lv=V, size=12 * MiB, ok=True),
        ev(1.4, "reply", SPM1, slot=0, granted=12, **req(size_mb=12)),
        ev(1.5, "taken", HSM, granted=12, **req(size_mb=12)),
        ev(2.0, "sent", HSM, **req(size_mb=16)),
        ev(2.1, "inject", HSM, what="kill"),
        ev(2.1, "killed", HSM, target=SPM1, name="spm1"),
        ev(3.0, "serving", SPM2, host=2, generation=1),
        ev(3.2, "lvm_start", SPM2, cmd="lvextend", vg="vg", lv=V, size=16 * MiB),
        ev(3.4, "reply", SPM2, slot=1, granted=16, **req(size_mb=16)),
        ev(3.5, "taken", HSM, granted=16, **req(size_mb=16)),
    ]


def test_good_history_passes() -> None:
    r = check(good(), sizes={V: (8 * MiB, 16 * MiB)})
    assert r.ok, r.violations
    assert (r.sent, r.answered, r.lost, r.overlaps, r.wrong_extends) == (2, 2, 0, 0, 0)
    assert r.recovery is not None and abs(r.recovery - 1.4) < 1e-9


def test_unanswered_request_is_lost() -> None:
    h = [e for e in good() if not (e["ev"] == "taken" and e["size_mb"] == 16)]
    r = check(h)
    assert r.lost == 1 and not r.ok
    assert any("never answered" in v for v in r.violations)


def test_answer_taken_twice_fails() -> None:
    h = good() + [ev(4.0, "taken", HSM, granted=16, **req(size_mb=16))]
    r = check(h)
    assert any("taken twice" in v for v in r.violations)


def test_late_answer_fails() -> None:
    r = check(good(), bound=1.0)
    assert any("answer after 1.5s" in v for v in r.violations)


def test_answer_without_spm_reply_fails() -> None:
    h = [e for e in good() if not (e["ev"] == "reply" and e["size_mb"] == 16)]
    r = check(h)
    assert any("no reply written" in v for v in r.violations)


def test_failure_answer_needs_a_reason() -> None:
    h = good()
    h[-1] = ev(3.5, "taken", HSM, granted=0, **req(size_mb=16))
    assert any("without a reason" in v for v in check(h).violations)
    h.append(ev(3.3, "done", SPM2, slot=1, result="refused", granted=0, reason="no space", **req(size_mb=16)))
    r = check(h)
    assert r.ok, r.violations
    assert r.refused == 1


def test_write_by_old_spm_after_takeover_fails() -> None:
    # The old SPM, frozen and thawed, runs lvextend after SPM2 took the lease.
    h = [e for e in good() if e["ev"] != "killed"]
    h.append(ev(3.3, "lvm_start", SPM1, cmd="lvextend", vg="vg", lv=V, size=16 * MiB))
    r = check(h)
    assert any("after pid 200 took the lease" in v for v in r.violations)
    assert r.overlaps == 1


def test_reply_by_old_spm_after_takeover_fails() -> None:
    h = [e for e in good() if e["ev"] != "killed"]
    h.append(ev(3.6, "reply", SPM1, slot=0, granted=12, **req(size_mb=12)))
    r = check(h)
    assert any("reply by pid 100" in v for v in r.violations)


def test_write_by_process_that_never_held_the_lease_fails() -> None:
    h = good() + [ev(1.25, "lvm_start", 999, cmd="lvextend", vg="vg", lv=V, size=12 * MiB)]
    assert any("never held the lease" in v for v in check(h).violations)


def test_clean_stop_after_next_acquire_is_overlap() -> None:
    h = [e for e in good() if e["ev"] != "killed"] + [ev(3.1, "stopped", SPM1, host=1, reason="SIGTERM")]
    r = check(h)
    assert r.overlaps == 1


def test_lease_lost_stop_is_no_overlap() -> None:
    h = good() + [ev(3.1, "stopped", SPM1, host=1, reason="lease-lost")]
    assert check(h).ok


def test_extend_beyond_asked_fails() -> None:
    h = good()
    h[11] = ev(3.2, "lvm_start", SPM2, cmd="lvextend", vg="vg", lv=V, size=24 * MiB)
    r = check(h)
    assert r.wrong_extends == 1 and any("largest asked 16 MiB" in v for v in r.violations)


def test_extend_rounds_up_to_extents() -> None:
    h = good()
    h[11] = ev(3.2, "lvm_start", SPM2, cmd="lvextend", vg="vg", lv=V, size=16 * MiB)
    for e in h:
        if e.get("size_mb") == 16:
            e["size_mb"] = 13  # 13 MiB rounds up to 16 MiB with 4 MiB extents
    assert check(h).ok


def test_shrunk_or_overgrown_lv_fails() -> None:
    assert any("shrank" in v for v in check(good(), sizes={V: (16 * MiB, 8 * MiB)}).violations)
    assert any("grew to 20 MiB" in v for v in check(good(), sizes={V: (8 * MiB, 20 * MiB)}).violations)


def test_enospc_paused_vm_must_resume() -> None:
    h = good() + [ev(1.0, "paused", HSM, vm="vm1", reason="enospc")]
    assert any("never resumed" in v for v in check(h).violations)
    h.append(ev(4.0, "resumed", HSM, vm="vm1"))
    assert check(h).ok


def test_vm_paused_for_another_reason_must_not_resume() -> None:
    h = good() + [ev(1.0, "paused", HSM, vm="vm1", reason="user"), ev(4.0, "resumed", HSM, vm="vm1")]
    assert any("paused for 'user' was resumed" in v for v in check(h).violations)


def test_unexpected_death_fails() -> None:
    h = good() + [ev(5.0, "died", HSM, target=SPM2, name="spm2", rc=1)]
    assert any("spm2" in v and "died rc=1" in v for v in check(h).violations)
    assert check(h, may_die=["spm2"]).ok


def test_killed_client_requests_are_asked_again() -> None:
    h = [
        ev(0.0, "serving", SPM1, host=1),
        ev(1.0, "sent", HSM, **req()),
        ev(1.5, "killed", 1, target=HSM, name="hsm3"),
        ev(2.0, "sent", HSM + 1, **req()),
        ev(2.1, "reply", SPM1, slot=0, granted=12, **req()),
        ev(2.2, "taken", HSM + 1, granted=12, **req()),
    ]
    r = check(h)
    assert r.ok, r.violations
    assert (r.sent, r.answered) == (1, 1)
