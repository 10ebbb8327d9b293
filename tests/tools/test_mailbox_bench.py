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
    # A few scans and writes per round, not one per host.
    assert 1 <= r["spm_scans_per_round"] < 30
    assert 1 <= r["spm_outbox_writes_per_round"] < 30
    # Where each wave's time went: its scans read the inbox, its writes
    # answered, and it found the requests no later than it ended.
    assert len(r["spm_wave_detail"]) == r["spm_waves"]
    worst = r["spm_wave_worst"]
    assert worst["ms"] == r["spm_wave_max_ms"]
    assert worst["scans"] >= 1 and worst["read_mib"] > 0 and worst["outbox_writes"] >= 1
    assert 0 <= worst["intake_ms"] <= worst["ms"]
    assert worst["io_cpu_ms"] > 0
    # Each round lined up with its waves: the client's write, the SPM's waves.
    assert len(r["round_split"]) == 2
    for split in r["round_split"]:
        assert split["waves"] >= 1 and split["spm_ms"] > 0 and split["client_write_ms"] > 0
    assert r["limit"] in ("spm", "client")
    text = mailbox_bench.format_result(r)
    assert "SPM wave" in text and "roundtrip" in text and "worst wave" in text and "the limit is the" in text


def test_hsm_clients_bench() -> None:
    """Real HSMMailbox clients, two hosts per process."""
    r = mailbox_bench.run_bench(4, 2, rounds=1, idle_seconds=0.3, max_hosts=10, hsm_procs=2)
    assert (r["failures"], r["requests"], r["hsm_processes"]) == (0, 8, 2)
    assert r["spm_waves"] >= 1
