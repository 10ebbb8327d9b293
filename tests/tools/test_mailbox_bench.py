"""The mailbox bench end to end, short form: SPM and lean client processes
on real O_DIRECT files."""

from __future__ import annotations

from xtnd.tools import mailbox_bench


def test_lean_bench_reports_roundtrip_and_spm_waves() -> None:
    r = mailbox_bench.run_bench(30, 2, rounds=2, idle_seconds=0.3, max_hosts=40, clients="lean")
    assert r["failures"] == 0
    assert r["requests"] == 30 * 2 * 2
    # At least one wave of requests per round (a scan racing the client's
    # write may split one).
    assert r["spm_waves"] >= 2
    assert 0 < r["spm_wave_p50_ms"] <= r["spm_wave_max_ms"]
    text = mailbox_bench.format_result(r)
    assert "SPM wave" in text and "roundtrip" in text
