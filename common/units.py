"""Sizes: binary units and the one rounding rule."""

from __future__ import annotations

KiB = 1024
MiB = 1024**2
GiB = 1024**3


def round_up(n: int, unit: int) -> int:
    """n rounded up to a multiple of unit (integers: no float error above 2**53)."""
    return (n + unit - 1) // unit * unit
