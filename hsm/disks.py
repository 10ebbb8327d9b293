"""Which disks of a VM the HSM watches, read from the live domain XML.

A disk is ours when it is a block device (a file volume grows by itself),
its source path is a volume link under the run dir (xtnd.hsm.links), its
format is qcow2 (a raw volume is fully allocated) and libvirt gave the top
image an index (``<source index='N'>``), which
setBlockThreshold and the threshold event use as ``vda[N]``.
"""

from __future__ import annotations

import uuid as uuidlib
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from xtnd.hsm import links


@dataclass(frozen=True)
class Disk:
    name: str  # target dev, e.g. "vda"
    index: int
    path: str
    domain: uuidlib.UUID
    volume: uuidlib.UUID


def disk_element(root: ET.Element, dev: str) -> ET.Element | None:
    """The <disk> of a domain XML whose target is dev (e.g. "vda"), if any."""
    for disk in root.iterfind("devices/disk"):
        target = disk.find("target")
        if target is not None and target.get("dev") == dev:
            return disk
    return None


def thin_disks(xml: str, run_dir: str = links.RUN_DIR) -> list[Disk]:
    root = ET.fromstring(xml)
    found = []
    for disk in root.iterfind("devices/disk"):
        if disk.get("device", "disk") != "disk" or disk.get("type") != "block":
            continue
        driver = disk.find("driver")
        if driver is None or driver.get("type") != "qcow2":
            continue
        source = disk.find("source")
        target = disk.find("target")
        if source is None or target is None or target.get("dev") is None:
            continue
        path = source.get("dev")
        if not path:
            continue
        ids = links.parse(path, run_dir)
        index = source.get("index")
        if ids is None or index is None:
            continue
        found.append(Disk(target.get("dev", ""), int(index), path, ids[0], ids[1]))
    return found
