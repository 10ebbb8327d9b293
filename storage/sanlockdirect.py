"""Formatting sanlock areas with ``sanlock direct`` (no daemon needed).

A new domain's ``ids`` volume gets an empty lockspace named by the domain
UUID and its ``leases`` volume the SPM resource. Both depend on the
storage's sector size and the lease alignment, which sanlock ties to the
number of hosts: with 512-byte sectors a 1 MiB alignment serves 2000
hosts; with 4 KiB sectors 1 MiB serves 250, 2 MiB 500, 4 MiB 1000 and
8 MiB 2000 (``sanlock help``).
"""

from __future__ import annotations

import logging

from xtnd.common.cmd import run

from .constants import MiB
from .errors import InvalidArgument

log = logging.getLogger("xtnd.storage")

SANLOCK = "sanlock"
TIMEOUT = 60.0


def alignment(sector_size: int, max_hosts: int) -> int:
    """Lease alignment in bytes for sector_size and max_hosts."""
    if sector_size == 512:
        if max_hosts > 2000:
            raise InvalidArgument(f"sanlock supports at most 2000 hosts, not {max_hosts}")
        return MiB
    if sector_size == 4096:
        for align in (1, 2, 4, 8):
            if max_hosts <= 250 * align:
                return align * MiB
        raise InvalidArgument(f"sanlock supports at most 2000 hosts, not {max_hosts}")
    raise InvalidArgument(f"unsupported sector size {sector_size}")


def _geometry(sector_size: int, align: int) -> list[str]:
    return ["-Z", str(sector_size), "-A", f"{align // MiB}M"]


def init_lockspace(name: str, path: str, offset: int, sector_size: int, align: int) -> None:
    run([SANLOCK, "direct", "init", "-s", f"{name}:0:{path}:{offset}", *_geometry(sector_size, align)], timeout=TIMEOUT)
    log.info("sanlock lockspace initialized lockspace=%s path=%s offset=%d", name, path, offset)


def init_resource(lockspace: str, name: str, path: str, offset: int, sector_size: int, align: int) -> None:
    run(
        [SANLOCK, "direct", "init", "-r", f"{lockspace}:{name}:{path}:{offset}", *_geometry(sector_size, align)],
        timeout=TIMEOUT,
    )
    log.info("sanlock resource initialized lockspace=%s resource=%s path=%s offset=%d", lockspace, name, path, offset)


def dump(path: str, offset: int = 0, size: int = 0) -> str:
    """``sanlock direct dump``: the leases found in path, as text."""
    target = f"{path}:{offset}:{size}" if size else f"{path}:{offset}"
    return run([SANLOCK, "direct", "dump", target], timeout=TIMEOUT).decode("utf-8", "replace")


def read_lockspace_leader(name: str, path: str, offset: int, host_id: int = 1) -> dict[str, str]:
    """``sanlock direct read_leader -s``: one host's delta lease, as fields.

    (``sanlock direct dump`` lists only delta leases a host has held, so a
    new lockspace shows up there empty; reading a leader proves it exists.)
    """
    out = run([SANLOCK, "direct", "read_leader", "-s", f"{name}:{host_id}:{path}:{offset}"], timeout=TIMEOUT)
    fields = {}
    for line in out.decode("utf-8", "replace").splitlines():
        key, _, value = line.partition(" ")
        if value:
            fields[key] = value.strip()
    return fields
