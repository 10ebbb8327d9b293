"""Reading libvirt's bulk domain stats (virConnectGetAllDomainStats).

One call with VIR_DOMAIN_STATS_STATE | VIR_DOMAIN_STATS_BLOCK and the
BACKING flag returns, for every VM, its state and one ``block.<i>.*`` group
per image of every disk's chain (top first). The HSM needs, per disk, the
top image's capacity, allocation (highest offset written), physical size
(the device's size) and the armed threshold, if any (libvirt drops the key
once the threshold fired).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class BlockStats:
    name: str
    index: int | None
    path: str
    capacity: int
    allocation: int
    physical: int
    threshold: int | None


@dataclass(frozen=True)
class VMStats:
    state: int | None
    reason: int | None
    blocks: dict[str, BlockStats]  # top image per disk name


def parse(stats: dict[str, Any]) -> VMStats:
    blocks: dict[str, BlockStats] = {}
    for i in range(int(stats.get("block.count", 0))):
        p = f"block.{i}."
        name = stats.get(p + "name")
        if name is None or name in blocks:
            continue  # not a disk, or a backing image of one already seen
        index = stats.get(p + "backingIndex")
        blocks[name] = BlockStats(
            name=name,
            index=int(index) if index is not None else None,
            path=stats.get(p + "path", ""),
            capacity=int(stats.get(p + "capacity", 0)),
            allocation=int(stats.get(p + "allocation", 0)),
            physical=int(stats.get(p + "physical", 0)),
            threshold=int(stats[p + "threshold"]) if p + "threshold" in stats else None,
        )
    return VMStats(stats.get("state.state"), stats.get("state.reason"), blocks)
