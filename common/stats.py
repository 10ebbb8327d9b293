"""Latency statistics shared by the daemons' metrics and the benchmarks."""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100); NaN when there is nothing to rank.

    The one percentile of the project: daemons' stats, benchmarks and
    ``xtnd stats`` all use it, so an empty window reads the same everywhere
    (NaN, or null in JSON: see ``json_number``).
    """
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def json_number(x: float, digits: int) -> float | None:
    """x rounded for a JSON document; None (null) for NaN, which JSON lacks."""
    return None if math.isnan(x) else round(x, digits)


def summary_ms(seconds: Sequence[float], digits: int = 1) -> dict[str, float]:
    """count, min, p50, p99 and max of durations given in seconds, in ms.

    The latency block every benchmark reports; ``{"count": 0}`` when there
    is nothing to summarize (no NaN in a JSON document).
    """
    if not seconds:
        return {"count": 0}
    ms = [s * 1000 for s in seconds]
    return {
        "count": len(ms),
        "min": round(min(ms), digits),
        "p50": round(percentile(ms, 50), digits),
        "p99": round(percentile(ms, 99), digits),
        "max": round(max(ms), digits),
    }


def loadavg() -> list[float]:
    """The machine's 1, 5 and 15 minute load averages, as benchmarks report them."""
    return [round(x, 2) for x in os.getloadavg()]


def emit(result: dict[str, Any], as_json: bool, text: Callable[[dict[str, Any]], str]) -> None:
    """A benchmark's epilogue: one JSON object on a line, or text(result)."""
    if as_json:
        json.dump(result, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(text(result))
    sys.stdout.flush()
