"""Latency statistics shared by the daemons' metrics and the benchmarks."""

from __future__ import annotations

import math
from collections.abc import Sequence


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
