"""The benchmarks' shared latency summary and epilogue (xtnd.common.stats)."""

from __future__ import annotations

import json
import math

import pytest
from xtnd.common import stats


def test_percentile_nearest_rank_and_empty() -> None:
    assert stats.percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert stats.percentile([1.0, 2.0, 3.0, 4.0], 99) == 4.0
    assert math.isnan(stats.percentile([], 50))


def test_summary_ms() -> None:
    s = stats.summary_ms([0.010, 0.0304, 0.020])
    assert s == {"count": 3, "min": 10.0, "p50": 20.0, "p99": 30.4, "max": 30.4}
    assert stats.summary_ms([]) == {"count": 0}
    assert stats.summary_ms([0.00125], digits=2)["max"] == 1.25


def test_loadavg() -> None:
    load = stats.loadavg()
    assert len(load) == 3 and all(x >= 0 for x in load)


def test_emit_json_or_text(capsys: pytest.CaptureFixture[str]) -> None:
    result = {"p50_ms": 1.5, "load": [0.1, 0.2, 0.3]}
    stats.emit(result, True, lambda r: "unused")
    assert json.loads(capsys.readouterr().out) == result
    stats.emit(result, False, lambda r: f"p50 {r['p50_ms']} ms")
    assert capsys.readouterr().out == "p50 1.5 ms\n"
