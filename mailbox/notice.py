"""Resize notices: how the lease holder tells every host that a volume grew.

``xtnd volume resize`` runs where the SPM lease is held; the VM using the
volume may run on any host, and hosts share no network path, only the
master domain's storage. So the notice travels like extend replies do:
through the outbox, in its block 0, which belongs to no host (codec.py
has the layout). The lease holder writes one block per resize (the last
resize and a fresh id); every xtnd HSM that runs VMs reads that block on
its stats pass (one 4 KiB O_DIRECT read per pass, none while it runs no
VM) and, when the id changed, checks its VMs' disks against the recorded
capacities. The notice names the last volume only as a hint: the HSM
compares every disk, so two resizes between two of its reads lose
nothing. An SPM that starts zeroes the outbox, which reads as a change
too (a check that finds nothing to do).

Why not the inbox event block (block 0 of the inbox): HSMs write it and
the SPM reads it; the direction is the wrong one. Why not a new message in
each host's outbox block: the SPM does not know which host runs a VM, and
a vdsm HSM would meet an opcode it does not know. Outbox block 0 is
invisible to vdsm (it reads and writes only its own host's block), so the
mailbox stays byte-compatible.
"""

from __future__ import annotations

import logging
import uuid

from . import codec
from .directio import Storage

log = logging.getLogger("xtnd.mailbox")

NOTICE_OFFSET = 0  # outbox block 0


def announce(outbox: Storage, domain: uuid.UUID, volume: uuid.UUID, capacity: int) -> codec.ResizeNotice:
    """Write a new notice (one aligned 4 KiB write). Only the lease holder
    writes the outbox, so the caller must hold the SPM lease."""
    notice = codec.ResizeNotice(uuid.uuid4(), domain, volume, capacity)
    outbox.write(NOTICE_OFFSET, codec.encode_notice(notice))
    log.info("resize announced domain=%s volume=%s capacity=%d notice=%s", domain, volume, capacity, notice.id)
    return notice


def read(outbox: Storage) -> codec.ResizeNotice | None:
    """The notice in the outbox now; None when there is none (or it cannot
    be decoded: logged, and read as none)."""
    raw = outbox.read(NOTICE_OFFSET, codec.BLOCK_SIZE)
    try:
        return codec.decode_notice(raw)
    except codec.BlockError as e:
        log.warning("outbox block 0 holds no resize notice: %s", e)
        return None
