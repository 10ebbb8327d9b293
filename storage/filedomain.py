"""File storage domains (NFS/POSIX style): a directory per domain.

Layout, under ROOT/<domain uuid>/:

    dom_md/metadata          json: uuid, version, master, max_hosts, sector size
    dom_md/ids               sanlock lockspace
    dom_md/leases            sanlock resources (SPM lease SDM)
    dom_md/inbox, outbox     mailbox
    volumes/<uuid>           volume data (qcow2 or raw, sparse)
    volumes/<uuid>.meta      json: capacity, format, image

File volumes grow by themselves: extend_volume() succeeds without doing
anything (mailbox/PROTOCOL.md §3) and there is nothing to activate.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid as uuidlib
from collections.abc import Callable
from typing import Any

from xtnd.mailbox.directio import DirectFile

from . import constants as c
from . import qemuimg, sanlockdirect
from . import resize as resizing
from .errors import DomainExists, DomainNotFound, InvalidArgument, LeaseAreaError, VolumeExists, VolumeNotFound
from .model import (
    DomainInfo,
    Fence,
    Format,
    LeaseLocation,
    LockspaceLocation,
    MailboxLocation,
    VolumeInfo,
    no_fence,
    parse_uuid,
)

log = logging.getLogger("xtnd.storage")

# Files on a file system: 512-byte sanlock sectors (what vdsm uses on NFS).
FILE_SECTOR_SIZE = 512


def _no_progress(msg: str) -> None:
    pass


def _write_json(path: str, data: dict[str, Any]) -> None:
    # Write then rename: a crash leaves the old file or the new one.
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)


def create_file_domain(
    uuid: uuidlib.UUID | str,
    root: str,
    master: bool = False,
    max_hosts: int = c.DEFAULT_MAX_HOSTS,
    progress: Callable[[str], None] = _no_progress,
    io_timeout: int = c.DEFAULT_IO_TIMEOUT,
) -> FileDomain:
    """Make ROOT/<uuid> with its sanlock areas and empty mailbox.

    io_timeout goes into the lockspace; the SPM's [lease] io_timeout must
    be the same.
    """
    uuid = parse_uuid(uuid)
    if not 1 <= max_hosts <= c.MAX_HOSTS_LIMIT:
        raise InvalidArgument(f"max_hosts must be in 1..{c.MAX_HOSTS_LIMIT}, not {max_hosts}")
    sanlockdirect.check_io_timeout(io_timeout)
    path = os.path.join(root, str(uuid))
    if os.path.exists(path):
        raise DomainExists(uuid)
    align = sanlockdirect.alignment(FILE_SECTOR_SIZE, max_hosts)
    progress(f"creating {path}")
    os.makedirs(os.path.join(path, c.DOM_MD))
    os.makedirs(os.path.join(path, c.VOLUMES_DIR))
    try:
        for name, size in c.SPECIAL_SIZES.items():
            with open(os.path.join(path, c.DOM_MD, name), "wb") as f:
                f.truncate(size)
        domain = FileDomain(uuid, path)
        progress(f"initializing sanlock lockspace {uuid} on {c.IDS} (io_timeout {io_timeout} s)")
        sanlockdirect.init_lockspace(str(uuid), domain._md(c.IDS), 0, FILE_SECTOR_SIZE, align, io_timeout=io_timeout)
        progress(f"initializing SPM lease {c.SPM_LEASE} at offset {align} on {c.LEASES}")
        sanlockdirect.init_resource(str(uuid), c.SPM_LEASE, domain._md(c.LEASES), align, FILE_SECTOR_SIZE, align)
        for name in (c.INBOX, c.OUTBOX):
            # Fresh sparse files read as zeros already; write anyway so the
            # blocks exist on storage that does not do holes (some NFS).
            with DirectFile(domain._md(name)) as f:
                f.write(0, bytes((max_hosts + 1) * c.MAILBOX_BLOCK_SIZE))
        # The metadata file last: its presence marks a complete domain.
        _write_json(
            domain._md(c.METADATA),
            {
                "uuid": str(uuid),
                "kind": "file",
                "version": c.DOMAIN_VERSION,
                "master": master,
                "max_hosts": max_hosts,
                "sector_size": FILE_SECTOR_SIZE,
            },
        )
    except BaseException:
        log.exception("creating file domain failed, removing %s", path)
        shutil.rmtree(path, ignore_errors=True)
        raise
    progress(f"domain {uuid} created")
    log.info(
        "file domain created uuid=%s path=%s master=%s max_hosts=%d io_timeout=%d",
        uuid,
        path,
        master,
        max_hosts,
        io_timeout,
    )
    return domain


class FileDomain:
    kind = "file"

    def __init__(self, uuid: uuidlib.UUID, path: str):
        self.uuid = uuid
        self.path = path

    @classmethod
    def open(cls, uuid: uuidlib.UUID | str, root: str) -> FileDomain:
        uuid = parse_uuid(uuid)
        domain = cls(uuid, os.path.join(root, str(uuid)))
        domain._metadata()
        return domain

    def _md(self, name: str) -> str:
        return os.path.join(self.path, c.DOM_MD, name)

    def _metadata(self) -> dict[str, Any]:
        try:
            with open(self._md(c.METADATA)) as f:
                data: dict[str, Any] = json.load(f)
        except FileNotFoundError:
            raise DomainNotFound(self.uuid, f"no {self._md(c.METADATA)}") from None
        return data

    # Domain

    def info(self) -> DomainInfo:
        md = self._metadata()
        st = os.statvfs(self.path)
        return DomainInfo(
            uuid=self.uuid,
            kind=self.kind,
            version=md["version"],
            master=md["master"],
            max_hosts=md["max_hosts"],
            sector_size=md["sector_size"],
            size=st.f_blocks * st.f_frsize,
            free=st.f_bavail * st.f_frsize,
            spm_lease_offset=sanlockdirect.alignment(md["sector_size"], md["max_hosts"]),
            volumes=tuple(v.uuid for v in self.list_volumes()),
            path=self.path,
            special={name: self._md(name) for name in c.SPECIAL_NAMES},
            io_timeout=self._io_timeout(),
        )

    def _io_timeout(self) -> int | None:
        try:
            return sanlockdirect.lockspace_io_timeout(str(self.uuid), self._md(c.IDS))
        except LeaseAreaError as e:
            log.warning("cannot read lockspace io_timeout domain=%s: %s", self.uuid, e)
            return None

    def lockspace(self) -> LockspaceLocation:
        return LockspaceLocation(str(self.uuid), self._md(c.IDS), 0)

    def spm_lease(self) -> LeaseLocation:
        md = self._metadata()
        offset = sanlockdirect.alignment(md["sector_size"], md["max_hosts"])
        return LeaseLocation(str(self.uuid), c.SPM_LEASE, self._md(c.LEASES), offset)

    def mailbox(self) -> MailboxLocation:
        return MailboxLocation(self._md(c.INBOX), self._md(c.OUTBOX), self._metadata()["max_hosts"])

    def deactivate_special(self) -> None:
        pass

    # Volumes

    def _volume_path(self, uuid: uuidlib.UUID) -> str:
        return os.path.join(self.path, c.VOLUMES_DIR, str(uuid))

    def create_volume(
        self,
        uuid: uuidlib.UUID | str,
        capacity: int,
        fmt: Format | str = Format.QCOW2,
        initial_size: int = c.DEFAULT_CHUNK,
        image: uuidlib.UUID | str | None = None,
        fence: Fence = no_fence,
    ) -> VolumeInfo:
        """A sparse file; initial_size is ignored (file volumes grow by themselves)."""
        uuid = parse_uuid(uuid)
        fmt = Format(fmt)
        image_uuid = parse_uuid(image) if image else None
        if capacity <= 0:
            raise InvalidArgument(f"capacity must be positive, not {capacity}")
        path = self._volume_path(uuid)
        if os.path.exists(path + c.VOLUME_META_SUFFIX):
            raise VolumeExists(self.uuid, uuid)
        try:
            fence()
            qemuimg.create(path, str(fmt), capacity)
            meta = {"capacity": capacity, "format": str(fmt), "image": str(image_uuid) if image_uuid else None}
            # The .meta file last: its presence marks a complete volume.
            _write_json(path + c.VOLUME_META_SUFFIX, meta)
        except BaseException:
            for p in (path, path + c.VOLUME_META_SUFFIX):
                if os.path.exists(p):
                    os.unlink(p)
            raise
        log.info("volume created domain=%s volume=%s format=%s capacity=%d", self.uuid, uuid, fmt, capacity)
        return self.volume_info(uuid)

    def remove_volume(self, uuid: uuidlib.UUID | str, fence: Fence = no_fence) -> None:
        uuid = parse_uuid(uuid)
        path = self._volume_path(uuid)
        fence()
        try:
            os.unlink(path + c.VOLUME_META_SUFFIX)
        except FileNotFoundError:
            raise VolumeNotFound(self.uuid, uuid) from None
        if os.path.exists(path):
            os.unlink(path)
        log.info("volume removed domain=%s volume=%s", self.uuid, uuid)

    def volume_info(self, uuid: uuidlib.UUID | str) -> VolumeInfo:
        uuid = parse_uuid(uuid)
        path = self._volume_path(uuid)
        try:
            with open(path + c.VOLUME_META_SUFFIX) as f:
                meta = json.load(f)
            size = os.stat(path).st_size
        except FileNotFoundError:
            raise VolumeNotFound(self.uuid, uuid) from None
        return VolumeInfo(
            uuid=uuid,
            domain=self.uuid,
            format=Format(meta["format"]),
            capacity=meta["capacity"],
            size=size,
            image=uuidlib.UUID(meta["image"]) if meta.get("image") else None,
            path=path,
        )

    def list_volumes(self) -> list[VolumeInfo]:
        volumes = []
        for name in sorted(os.listdir(os.path.join(self.path, c.VOLUMES_DIR))):
            if name.endswith(c.VOLUME_META_SUFFIX):
                try:
                    volumes.append(self.volume_info(name[: -len(c.VOLUME_META_SUFFIX)]))
                except VolumeNotFound:
                    continue  # removed while listing
        return volumes

    def extend_volume(self, uuid: uuidlib.UUID | str, size: int, alloc: str | None = None) -> int:
        """Nothing to do for a file: it grows as it is written.

        Answers with the size asked for (or the file size if larger), so a
        caller comparing granted >= requested sees a success.
        """
        return max(size, self.volume_info(uuid).size)

    def resize_volume(self, uuid: uuidlib.UUID | str, capacity: int, fence: Fence = no_fence) -> bool:
        """Record a larger capacity; True if anything changed. A raw file is
        extended (sparse: it reads zeros); a qcow2 image only gets the new
        capacity in its .meta (see resize.py). The .meta is written last."""
        info = self.volume_info(uuid)
        st = os.statvfs(self.path)
        if not resizing.growth(info, capacity, st.f_bavail * st.f_frsize):
            return False
        path = self._volume_path(info.uuid)
        fence()
        if info.format is Format.RAW and os.stat(path).st_size < capacity:
            os.truncate(path, capacity)
        with open(path + c.VOLUME_META_SUFFIX) as f:
            meta = json.load(f)
        meta["capacity"] = capacity
        _write_json(path + c.VOLUME_META_SUFFIX, meta)
        log.info(
            "volume resized domain=%s volume=%s format=%s from=%d to=%d", self.uuid, info.uuid, info.format,
            info.capacity, capacity,
        )  # fmt: skip
        return True

    def prepare_volume(self, uuid: uuidlib.UUID | str) -> str:
        """The volume's file; a qcow2 image resized while no VM ran it gets
        its header grown to the recorded capacity first."""
        info = self.volume_info(uuid)
        assert info.path is not None
        resizing.catch_up_header(info, info.path)
        return info.path

    def refresh_volume(self, uuid: uuidlib.UUID | str) -> int:
        return self.volume_info(uuid).size

    def teardown_volume(self, uuid: uuidlib.UUID | str) -> None:
        self.volume_info(uuid)
