"""Formatting and reading sanlock areas with ``sanlock direct`` (no daemon needed).

A new domain's ``ids`` volume gets an empty lockspace named by the domain
UUID and its ``leases`` volume the SPM resource. Both depend on the
storage's sector size and the lease alignment, which sanlock ties to the
number of hosts: with 512-byte sectors a 1 MiB alignment serves 2000
hosts; with 4 KiB sectors 1 MiB serves 250, 2 MiB 500, 4 MiB 1000 and
8 MiB 2000 (``sanlock help``).

The lockspace also stores its io_timeout (``init -o``): a host joining
with a shorter one waits for the stored one, and sanlock derives every
lease timeout from it (renewal every 2 x io_timeout, a host dead after
8 x io_timeout + 60 s). ``-o 0`` means sanlock's default, 10 s.

A resource leader (``read_leader -r``) as sanlock 3.8 writes it:

    never acquired     owner_id 0, timestamp 0
    held               owner_id N, owner_generation G, timestamp T
    released           owner_id N kept, timestamp 0
    holder host died   as held, until another host acquires it

T is when the lease was acquired, in whole seconds of the owner host's
CLOCK_MONOTONIC; it is not renewed while the lease is held (the owner's
liveness is its delta lease in the lockspace) and means nothing on other
hosts. A holder process that exits is released by its daemon, so a
non-zero timestamp means a live holder, or a host that died holding it.

sanlock splits LOCKSPACE and RESOURCE arguments on ':'; a ':' in a path
must be written ``\\:``.
"""

from __future__ import annotations

import dataclasses
import logging

from xtnd.common.cmd import CommandError, run

from .constants import DEFAULT_IO_TIMEOUT, MAX_IO_TIMEOUT, MiB
from .errors import InvalidArgument, LeaseAreaError

log = logging.getLogger("xtnd.storage")

SANLOCK = "sanlock"
TIMEOUT = 60.0
SECTOR_SIZES = (512, 4096)
ALIGNMENTS = (1 * MiB, 2 * MiB, 4 * MiB, 8 * MiB)

# read_leader magic numbers (sanlock's leader.h).
DELTA_MAGIC = "0x12212010"
PAXOS_MAGIC = "0x6152010"


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


def check_io_timeout(io_timeout: int) -> int:
    """io_timeout if sanlock can use it; 0 would silently mean 10."""
    if not 1 <= io_timeout <= MAX_IO_TIMEOUT:
        raise InvalidArgument(f"sanlock io_timeout must be 1..{MAX_IO_TIMEOUT} seconds, not {io_timeout}")
    return io_timeout


def escape(path: str) -> str:
    return path.replace(":", "\\:")


def _geometry(sector_size: int, align: int) -> list[str]:
    if sector_size not in SECTOR_SIZES:
        raise InvalidArgument(f"unsupported sector size {sector_size}")
    if align not in ALIGNMENTS:
        raise InvalidArgument(f"sanlock alignment must be 1, 2, 4 or 8 MiB, not {align}")
    return ["-Z", str(sector_size), "-A", f"{align // MiB}M"]


def init_lockspace(
    name: str,
    path: str,
    offset: int = 0,
    sector_size: int = 512,
    align: int = MiB,
    io_timeout: int = DEFAULT_IO_TIMEOUT,
) -> None:
    """Format a lockspace (the ``ids`` area) for every host id, unowned."""
    check_io_timeout(io_timeout)
    arg = f"{name}:0:{escape(path)}:{offset}"
    run([SANLOCK, "direct", "init", "-o", str(io_timeout), *_geometry(sector_size, align), "-s", arg], timeout=TIMEOUT)
    log.info(
        "sanlock lockspace initialized lockspace=%s path=%s offset=%d io_timeout=%d", name, path, offset, io_timeout
    )


def init_resource(lockspace: str, name: str, path: str, offset: int, sector_size: int = 512, align: int = MiB) -> None:
    """Format one resource lease (e.g. SDM in the ``leases`` area), unowned."""
    arg = f"{lockspace}:{name}:{escape(path)}:{offset}"
    run([SANLOCK, "direct", "init", *_geometry(sector_size, align), "-r", arg], timeout=TIMEOUT)
    log.info("sanlock resource initialized lockspace=%s resource=%s path=%s offset=%d", lockspace, name, path, offset)


def dump(path: str, offset: int = 0, size: int = 0) -> str:
    """``sanlock direct dump``: the leases found in path, as text."""
    target = f"{escape(path)}:{offset}:{size}" if size else f"{escape(path)}:{offset}"
    return run([SANLOCK, "direct", "dump", target], timeout=TIMEOUT).decode("utf-8", "replace")


def _read_leader(option: str, arg: str, what: str, path: str, offset: int) -> dict[str, str]:
    try:
        out = run([SANLOCK, "direct", "read_leader", option, arg], timeout=TIMEOUT)
    except CommandError as e:
        # sanlock checks the leader it read and exits 1 after printing it
        # anyway: "read_leader done -223" for no leader (bad magic), -227 or
        # -226 for another resource or lockspace name.
        text = e.out.decode("utf-8", "replace")
        found = _fields(text)
        reason = text.partition("\n")[0] or str(e)
        if found.get("magic", "0x0") != "0x0":
            reason += f" (found {found.get('space_name', '')}:{found.get('resource_name', '')})"
        raise LeaseAreaError(what, path, offset, reason, e.out) from e
    return _fields(out.decode("utf-8", "replace"))


def _fields(text: str) -> dict[str, str]:
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if value:
            fields[key] = value.strip()
    return fields


def read_lockspace_leader(name: str, path: str, offset: int = 0, host_id: int = 1) -> dict[str, str]:
    """``sanlock direct read_leader -s``: one host's delta lease, as fields.

    (``sanlock direct dump`` lists only delta leases a host has held, so a
    new lockspace shows up there empty; reading a leader proves it exists.)
    """
    arg = f"{name}:{host_id}:{escape(path)}:{offset}"
    return _read_leader("-s", arg, f"lockspace {name}", path, offset)


def lockspace_io_timeout(name: str, path: str, offset: int = 0) -> int:
    """The io_timeout the lockspace was formatted with."""
    fields = read_lockspace_leader(name, path, offset)
    what, raw = f"lockspace {name}", repr(fields).encode()
    if fields.get("magic") != DELTA_MAGIC or fields.get("space_name") != name:
        raise LeaseAreaError(what, path, offset, "no delta lease of this lockspace", raw)
    try:
        return int(fields["io_timeout"])
    except (KeyError, ValueError):
        raise LeaseAreaError(what, path, offset, "no io_timeout", raw) from None


@dataclasses.dataclass(frozen=True)
class ResourceLeader:
    """A resource lease as stored now (see the module doc for the states)."""

    lockspace: str
    resource: str
    owner_id: int
    owner_generation: int
    timestamp: int
    lver: int

    @property
    def held(self) -> bool:
        """Acquired and not released: by a live host, or one that died holding it."""
        return self.owner_id != 0 and self.timestamp != 0


def read_resource_leader(lockspace: str, resource: str, path: str, offset: int) -> ResourceLeader:
    """``sanlock direct read_leader -r``; raise LeaseAreaError unless the
    area holds exactly this resource of this lockspace."""
    what = f"resource {lockspace}:{resource}"
    fields = _read_leader("-r", f"{lockspace}:{resource}:{escape(path)}:{offset}", what, path, offset)
    found = (fields.get("magic"), fields.get("space_name"), fields.get("resource_name"))
    if found != (PAXOS_MAGIC, lockspace, resource):
        raise LeaseAreaError(what, path, offset, f"found magic/lockspace/resource {found}", repr(fields).encode())
    try:
        return ResourceLeader(
            lockspace,
            resource,
            owner_id=int(fields["owner_id"]),
            owner_generation=int(fields["owner_generation"]),
            timestamp=int(fields["timestamp"]),
            lver=int(fields["lver"]),
        )
    except (KeyError, ValueError) as e:
        raise LeaseAreaError(what, path, offset, f"unexpected leader {e!r}", repr(fields).encode()) from None
