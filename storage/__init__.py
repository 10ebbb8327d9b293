"""Storage domains (block: an LVM VG; file: a directory) and their volumes.

    create_block_domain / create_file_domain   make a domain
    open_domain / HostConfig.open              open one (Domain interface)
    Domain.create_volume / remove_volume / volume_info / list_volumes
    Domain.extend_volume (SPM), prepare/refresh/teardown_volume (HSM)
    Domain.lockspace / spm_lease / mailbox     where sanlock and the mailbox live
    BlockDomain.spm_lease_leader               who holds the SPM lease (read from storage)
    check_no_other_spm                         refuse LVM changes while another host is the SPM
    sanlockdirect                              format and read sanlock areas (no daemon)

Everything here is plain functions and objects so that the SPM daemon can
call them directly; the CLI (xtnd.tools.domain_cli) is a thin shell over it.
"""

from .blockdomain import BlockDomain, create_block_domain
from .domain import Domain, open_domain
from .errors import (
    DomainExists,
    DomainNotFound,
    InvalidArgument,
    LeaseAreaError,
    NoSpace,
    NoSpaceToGrow,
    ShrinkRefused,
    SpmLeaseHeld,
    StorageConfigError,
    StorageError,
    VolumeExists,
    VolumeNotFound,
)
from .filedomain import FileDomain, create_file_domain
from .hostconfig import HostConfig
from .model import (
    DomainInfo,
    Fence,
    Format,
    LeaseLocation,
    LockspaceLocation,
    MailboxLocation,
    VolumeInfo,
    max_size,
    no_fence,
)
from .spmowner import check_no_other_spm, find_master

__all__ = [
    "BlockDomain",
    "Domain",
    "DomainExists",
    "DomainInfo",
    "DomainNotFound",
    "Fence",
    "FileDomain",
    "Format",
    "HostConfig",
    "InvalidArgument",
    "LeaseAreaError",
    "LeaseLocation",
    "LockspaceLocation",
    "MailboxLocation",
    "NoSpace",
    "NoSpaceToGrow",
    "ShrinkRefused",
    "SpmLeaseHeld",
    "StorageConfigError",
    "StorageError",
    "VolumeExists",
    "VolumeInfo",
    "VolumeNotFound",
    "check_no_other_spm",
    "create_block_domain",
    "create_file_domain",
    "find_master",
    "max_size",
    "no_fence",
    "open_domain",
]
