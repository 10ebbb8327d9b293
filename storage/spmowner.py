"""Is another host the SPM? Read from storage, for hosts without an SPM daemon.

Only the holder of the pool's SPM lease (resource SDM in the master
domain's ``leases`` volume) may change LVM metadata of the pool's block
domains: lvcreate or lvremove run on any other host while an SPM serves
would change the VG behind its back (its volume cache, a concurrent
lvextend). The lease is read with ``sanlock direct`` through the PV (no
sanlock daemon, nothing activated); see sanlockdirect for what a free, a
held and a released lease look like on disk.

A lease whose holder host died still reads as held until a standby SPM
takes it over (sanlock's host_dead_seconds, 8 x io_timeout + 60 s after
the host's last renewal); callers wanting to act anyway must skip this
check on purpose.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from xtnd import lvm

from .blockdomain import BlockDomain
from .domain import Domain
from .errors import SpmLeaseHeld, StorageError
from .hostconfig import HostConfig

log = logging.getLogger("xtnd.storage")


def check_no_other_spm(domain: Domain, config: HostConfig) -> None:
    """Raise SpmLeaseHeld if some host holds the SPM lease of domain's pool.

    The pool's master: domain itself if it is a master domain, else the
    master domains among the block domains of config (all of them are
    checked). A file domain, or a block domain with no master in sight,
    passes.
    """
    if not isinstance(domain, BlockDomain):
        return
    checked = 0
    for master in _candidates(domain, config):
        leader = master.spm_lease_leader()
        if leader is None:
            continue
        checked += 1
        if leader.held:
            log.info(
                "SPM lease held domain=%s master=%s owner_host_id=%d owner_generation=%d",
                domain.uuid,
                master.uuid,
                leader.owner_id,
                leader.owner_generation,
            )
            raise SpmLeaseHeld(master.uuid, leader.owner_id, leader.owner_generation)
        log.info("SPM lease free domain=%s master=%s", domain.uuid, master.uuid)
        if master is domain:
            return  # its own pool's master
    if not checked:
        log.info("no master domain found, nothing to check domain=%s", domain.uuid)


def find_master(domain: BlockDomain, config: HostConfig) -> BlockDomain | None:
    """The master domain of domain's pool: domain itself, else the first
    master domain among the block domains of config; None if none is."""
    for candidate in _candidates(domain, config):
        if candidate.spm_lease_leader() is not None:
            return candidate
    return None


def _candidates(domain: BlockDomain, config: HostConfig) -> Iterator[BlockDomain]:
    """domain, then the other block domains of config
    (spm_lease_leader() is None for a non-master)."""
    yield domain
    for uuid, entry in config.domains.items():
        if uuid == str(domain.uuid) or not entry.get("pvs"):
            continue
        try:
            other = config.open(uuid)
        except (StorageError, lvm.LVMError) as e:
            log.info("skipping domain %s while looking for the master: %s", uuid, e)
            continue
        if isinstance(other, BlockDomain):
            yield other
