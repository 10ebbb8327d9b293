"""``xtnd hsm bench --policy fixed,adaptive``: the same fast writer under
each sizing policy, on a real guest, real LVM and a real mailbox.

The in-process SPM adds 250 ms to every extend (a busy SPM): a 1 MiB
fixed chunk cannot keep ahead of a guest writing several MiB/s then,
while the adaptive chunk learns rate and latency and grows, never past
the cap.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from testlib.cli import xtnd

pytestmark = [pytest.mark.root, pytest.mark.timeout(600)]

CAP_MB = 16
EXTENT_MB = 4  # the rig's VG extent: an extend rounds up to it


def bench(capsys: pytest.CaptureFixture[str], write_mb: int) -> dict[str, Any]:
    rc = xtnd(
        "hsm", "bench", "--policy", "fixed,adaptive", "--json", "--spm", "inprocess", "--spm-delay-ms", "250",
        "--policy-chunk-mb", "1", "--max-chunk-mb", str(CAP_MB), "--policy-write-mb", str(write_mb),
    )  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0, out
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    print(json.dumps(result["policies"], indent=1), "load", result["load_before"], result["load_after"])
    return result


def check(result: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    fixed, adaptive = result["policies"]["fixed"], result["policies"]["adaptive"]
    for p in (fixed, adaptive):
        assert {"pauses", "paused_s", "extends", "overallocation_mb"} <= set(p)
        assert p["extends"] >= 2
    assert fixed["largest_chunk_mb"] == 1
    # The fixed 1 MiB chunk loses the race against this writer...
    assert fixed["pauses"] >= 1 and fixed["paused_s"] > 0
    # ...the adaptive one pauses less, and never asks beyond the cap.
    assert adaptive["pauses"] < fixed["pauses"]
    assert 1 < adaptive["largest_chunk_mb"] <= CAP_MB
    assert adaptive["largest_extend_mb"] <= CAP_MB
    return fixed, adaptive


def test_adaptive_pauses_less_than_fixed(need_root: None, capsys: pytest.CaptureFixture[str]) -> None:
    check(bench(capsys, write_mb=16))


@pytest.mark.soak
def test_adaptive_no_pause_after_first_extend_long(need_root: None, capsys: pytest.CaptureFixture[str]) -> None:
    fixed, adaptive = check(bench(capsys, write_mb=96))
    assert adaptive["pauses_after_first_extend"] == 0
    # What was free when the last extend began plus that extend: two caps at most.
    assert adaptive["overallocation_mb"] <= 2 * CAP_MB + EXTENT_MB
