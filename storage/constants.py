"""Storage domain layout and sizing constants (mailbox/PROTOCOL.md §3, §4), in one place."""

from __future__ import annotations

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

# Domain format version written into VG tags / file metadata.
DOMAIN_VERSION = 1

# Hosts: ids 1..max_hosts; sanlock allows up to 2000.
DEFAULT_MAX_HOSTS = 250
MAX_HOSTS_LIMIT = 2000

# Special volumes (LVs of a block domain, files in dom_md/ of a file domain).
IDS = "ids"  # sanlock lockspace, named by the domain UUID
LEASES = "leases"  # sanlock resources; the SPM lease SDM
INBOX = "inbox"  # mailbox, written by HSMs
OUTBOX = "outbox"  # mailbox, written by the SPM
SPECIAL_SIZES = {
    IDS: 8 * MiB,
    LEASES: 16 * MiB,
    INBOX: 16 * MiB,
    OUTBOX: 16 * MiB,
}
SPECIAL_NAMES = tuple(SPECIAL_SIZES)

# The SPM lease resource in the leases volume: one lease alignment unit in
# (1 MiB for 512-byte sectors).
SPM_LEASE = "SDM"

# sanlock io_timeout written into a new lockspace (seconds): sanlock's own
# default. Every host joining must use the same ([lease] io_timeout of the
# SPM config). At most 60: a dead SPM's lease is free only after
# 8 x io_timeout + 60 s, already 9 minutes at 60.
DEFAULT_IO_TIMEOUT = 10
MAX_IO_TIMEOUT = 60

# Mailbox: one 4 KiB block per host id plus block 0 (the event block).
MAILBOX_BLOCK_SIZE = 4096

# Block domains: vdsm's extent size (thin volumes grow in chunks of 2.5 GiB).
DEFAULT_EXTENT_SIZE = 128 * MiB
# LVM metadata areas of a block domain's PVs, as vdsm makes them: 128 MiB,
# two copies per PV (start and end). LVM's default, one 1 MiB area, fills
# up after a few hundred LVs with tags; every LV of the pool and the
# history of its changes must fit, and one damaged copy must not lose it.
METADATA_SIZE = 128 * MiB
METADATA_COPIES = 2

# Thin qcow2 volumes start at one chunk (mailbox/PROTOCOL.md §4, vdsm default chunk_mb).
DEFAULT_CHUNK = 2560 * MiB
# Room for qcow2 metadata on top of the virtual size.
QCOW2_OVERHEAD_PERCENT = 10

# LVM tags (characters allowed in LVM tags: A-Z a-z 0-9 _ + . - / = ! : # &).
TAG_DOMAIN = "xtnd_domain"
TAG_MASTER = "xtnd_master"
TAG_VERSION = "xtnd_version="
TAG_MAX_HOSTS = "xtnd_max_hosts="
TAG_SECTOR = "xtnd_sector="
TAG_SPECIAL = "xtnd_special"
TAG_VOLUME = "xtnd_volume"
TAG_CAPACITY = "xtnd_cap="
TAG_FORMAT = "xtnd_fmt="
TAG_IMAGE = "xtnd_image="

# File domains.
DOM_MD = "dom_md"
METADATA = "metadata"  # json, in dom_md/
VOLUMES_DIR = "volumes"
VOLUME_META_SUFFIX = ".meta"
