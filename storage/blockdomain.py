"""Block storage domains: one LVM VG per domain, named by its UUID.

Layout (mailbox/PROTOCOL.md §3): special LVs ids, leases, inbox, outbox; volumes are LVs
named by the volume UUID. Domain metadata is kept in VG tags and volume
metadata in LV tags (constants.TAG_*), so one ``vgs``/``lvs`` answers every
question and no separate metadata area can disagree with LVM.

Only the SPM changes the VG (create/remove/extend); any host activates LVs
to use them. Activation goes through an xtnd.lvm Activator (device-mapper,
or loop devices on kernels without it).
"""

from __future__ import annotations

import logging
import uuid as uuidlib
from collections.abc import Callable, Sequence

from xtnd import lvm
from xtnd.lvm import loop
from xtnd.mailbox.directio import DirectFile

from . import constants as c
from . import qemuimg, sanlockdirect
from . import resize as resizing
from .errors import (
    DomainExists,
    DomainNotFound,
    InvalidArgument,
    NoSpace,
    StorageError,
    VolumeExists,
    VolumeNotFound,
)
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
    parse_uuid,
)
from .zero import zero_device

log = logging.getLogger("xtnd.storage")

Progress = Callable[[str], None]


def _no_progress(msg: str) -> None:
    pass


def _tag_value(tags: Sequence[str], prefix: str) -> str | None:
    for tag in tags:
        if tag.startswith(prefix):
            return tag[len(prefix) :]
    return None


def create_block_domain(
    uuid: uuidlib.UUID | str,
    pvs: Sequence[str],
    master: bool = False,
    max_hosts: int = c.DEFAULT_MAX_HOSTS,
    extent_size: int = c.DEFAULT_EXTENT_SIZE,
    progress: Progress = _no_progress,
    activation: str = "auto",
    driverloaded: bool | None = None,
    io_timeout: int = c.DEFAULT_IO_TIMEOUT,
    metadata_size: int = c.METADATA_SIZE,
) -> BlockDomain:
    """Make a VG on pvs with the special LVs, sanlock areas and empty mailbox.

    Each PV gets two LVM metadata areas of metadata_size (see constants);
    the VG is made with autoactivation off.

    The PVs are overwritten. On failure the VG is removed again, so the
    command can be retried on the same devices. io_timeout goes into the
    lockspace; the SPM's [lease] io_timeout must be the same.
    """
    uuid = parse_uuid(uuid)
    if not pvs:
        raise InvalidArgument("a block domain needs at least one PV")
    if not 1 <= max_hosts <= c.MAX_HOSTS_LIMIT:
        raise InvalidArgument(f"max_hosts must be in 1..{c.MAX_HOSTS_LIMIT}, not {max_hosts}")
    sanlockdirect.check_io_timeout(io_timeout)
    sector = loop.logical_block_size(pvs[0])
    align = sanlockdirect.alignment(sector, max_hosts)
    runner = lvm.Runner(pvs, driverloaded=driverloaded)
    vg = str(uuid)
    if vg in lvm.vgs(runner):
        raise DomainExists(uuid)
    progress(f"creating PVs on {', '.join(pvs)}")
    lvm.pvcreate(runner, *pvs, metadata_size=metadata_size, metadata_copies=c.METADATA_COPIES)
    tags = [
        c.TAG_DOMAIN,
        f"{c.TAG_VERSION}{c.DOMAIN_VERSION}",
        f"{c.TAG_MAX_HOSTS}{max_hosts}",
        f"{c.TAG_SECTOR}{sector}",
    ]
    if master:
        tags.append(c.TAG_MASTER)
    progress(f"creating volume group {vg} (extent size {extent_size // c.MiB} MiB)")
    # No autoactivation: a host maps a shared LV only when it runs it.
    lvm.vgcreate(runner, vg, list(pvs), extent_size, tuple(tags), autoactivation=False)
    domain = BlockDomain(uuid, runner, lvm.make_activator(runner, activation))
    try:
        for name, size in c.SPECIAL_SIZES.items():
            progress(f"creating special volume {name} ({size // c.MiB} MiB)")
            lvm.lvcreate(runner, vg, name, size, tags=(c.TAG_SPECIAL,))
        ids = domain.activator.activate(vg, c.IDS)
        progress(f"initializing sanlock lockspace {vg} on {c.IDS} (io_timeout {io_timeout} s)")
        sanlockdirect.init_lockspace(vg, ids, 0, sector, align, io_timeout=io_timeout)
        leases = domain.activator.activate(vg, c.LEASES)
        progress(f"initializing SPM lease {c.SPM_LEASE} at offset {align} on {c.LEASES}")
        sanlockdirect.init_resource(vg, c.SPM_LEASE, leases, align, sector, align)
        for name in (c.INBOX, c.OUTBOX):
            progress(f"clearing {name} for {max_hosts} hosts")
            _zero(domain.activator.activate(vg, name), (max_hosts + 1) * c.MAILBOX_BLOCK_SIZE)
    except BaseException:
        log.exception("creating domain failed, removing vg=%s", vg)
        domain.deactivate_special()
        try:
            lvm.vgremove(runner, vg)
        except lvm.LVMError as e:
            log.error("cannot remove vg=%s after failed create: %s", vg, e)
        raise
    domain.deactivate_special()
    progress(f"domain {vg} created")
    log.info(
        "block domain created uuid=%s pvs=%s master=%s max_hosts=%d io_timeout=%d",
        vg,
        list(pvs),
        master,
        max_hosts,
        io_timeout,
    )
    return domain


def _zero(path: str, length: int) -> None:
    with DirectFile(path) as f:
        f.write(0, bytes(length))


def pv_location(lv: lvm.LVInfo, vg: lvm.VGInfo, offset: int, length: int) -> tuple[str, int]:
    """The PV and byte offset holding bytes [offset, offset + length) of lv.

    ``sanlock direct`` reads with O_DIRECT at any path and offset, so the
    sanlock areas can be read through the PV without activating the LV on
    this host: nothing is left mapped, and nothing races a daemon that
    activates or uses the same LV. The range must lie in one linear
    segment; sanlock areas are aligned to 1 MiB and extents are larger, so
    only a striped or mirrored LV (never made by xtnd) fails.
    """
    ext = lv.extent_size
    for seg in lv.segments:
        start = seg.start_le * ext
        if seg.first_pe >= 0 and start <= offset and offset + length <= start + seg.extents * ext:
            return seg.pv, vg.pv(seg.pv).pe_start + seg.first_pe * ext + offset - start
    raise StorageError(f"{lv.vg}/{lv.name} bytes {offset}+{length} are not on one linear segment")


class BlockDomain:
    kind = "block"

    def __init__(self, uuid: uuidlib.UUID, runner: lvm.Runner, activator: lvm.Activator):
        self.uuid = uuid
        self.vg = str(uuid)
        self.runner = runner
        self.activator = activator

    @classmethod
    def open(
        cls,
        uuid: uuidlib.UUID | str,
        pvs: Sequence[str],
        activation: str = "auto",
        driverloaded: bool | None = None,
        writable: bool = False,
        timeout: float = lvm.runner.DEFAULT_TIMEOUT,
    ) -> BlockDomain:
        """The domain on pvs; raises DomainNotFound if its VG is not there.

        LVM metadata is read-only unless writable (only the SPM, or a
        command holding the SPM lease, may change it). timeout bounds each
        LVM command, the opening one included.
        """
        uuid = parse_uuid(uuid)
        runner = lvm.Runner(pvs, driverloaded=driverloaded, read_only=not writable, timeout=timeout)
        domain = cls(uuid, runner, lvm.make_activator(runner, activation))
        domain._vg_info()
        return domain

    def _vg_info(self) -> lvm.VGInfo:
        try:
            info = lvm.vg_info(self.runner, self.vg)
        except lvm.VGNotFound:
            raise DomainNotFound(self.uuid, f"no VG on {', '.join(self.runner.devices)}") from None
        if c.TAG_DOMAIN not in info.tags:
            raise DomainNotFound(self.uuid, f"VG {self.vg} is not an xtnd domain")
        return info

    # Domain

    def info(self) -> DomainInfo:
        vg = self._vg_info()
        lvs = lvm.lvs(self.runner, self.vg)
        sector = int(_tag_value(vg.tags, c.TAG_SECTOR) or 512)
        max_hosts = int(_tag_value(vg.tags, c.TAG_MAX_HOSTS) or c.DEFAULT_MAX_HOSTS)
        active = self.activator.active_devices(self.vg)
        special = {lv.name: active.get(lv.name) for lv in lvs if lv.name in c.SPECIAL_NAMES}
        ids = next((lv for lv in lvs if lv.name == c.IDS), None)
        return DomainInfo(
            uuid=self.uuid,
            kind=self.kind,
            version=int(_tag_value(vg.tags, c.TAG_VERSION) or 0),
            master=c.TAG_MASTER in vg.tags,
            max_hosts=max_hosts,
            sector_size=sector,
            size=vg.size,
            free=vg.free,
            spm_lease_offset=sanlockdirect.alignment(sector, max_hosts),
            volumes=tuple(uuidlib.UUID(lv.name) for lv in lvs if c.TAG_VOLUME in lv.tags),
            pvs=tuple(pv.name for pv in vg.pvs),
            extent_size=vg.extent_size,
            free_extents=vg.free_extents,
            special=special,
            io_timeout=self._io_timeout(ids, vg, sector) if ids else None,
        )

    def _io_timeout(self, ids: lvm.LVInfo, vg: lvm.VGInfo, sector: int) -> int | None:
        """The lockspace's io_timeout, read through the PV; None if it
        cannot be read that way (info is read-only: it activates nothing)."""
        try:
            return sanlockdirect.lockspace_io_timeout(self.vg, *pv_location(ids, vg, 0, sector))
        except StorageError as e:
            log.warning("cannot read lockspace io_timeout vg=%s: %s", self.vg, e)
            return None

    def lockspace(self) -> LockspaceLocation:
        """The sanlock lockspace, activating ids if needed."""
        return LockspaceLocation(self.vg, self.activator.activate(self.vg, c.IDS), 0)

    def spm_lease(self) -> LeaseLocation:
        """The SPM lease, activating leases if needed."""
        info = self._vg_info()
        sector = int(_tag_value(info.tags, c.TAG_SECTOR) or 512)
        max_hosts = int(_tag_value(info.tags, c.TAG_MAX_HOSTS) or c.DEFAULT_MAX_HOSTS)
        path = self.activator.activate(self.vg, c.LEASES)
        return LeaseLocation(self.vg, c.SPM_LEASE, path, sanlockdirect.alignment(sector, max_hosts))

    def spm_lease_leader(self) -> sanlockdirect.ResourceLeader | None:
        """The SPM lease as stored now; None if this is not a master domain
        (or one without a leases volume).

        Read through the PV (see pv_location), so that any host can see
        whether another one is the SPM without activating anything.
        """
        info = self._vg_info()
        if c.TAG_MASTER not in info.tags:
            return None
        sector = int(_tag_value(info.tags, c.TAG_SECTOR) or 512)
        max_hosts = int(_tag_value(info.tags, c.TAG_MAX_HOSTS) or c.DEFAULT_MAX_HOSTS)
        align = sanlockdirect.alignment(sector, max_hosts)
        try:
            leases = lvm.lv_info(self.runner, self.vg, c.LEASES)
        except lvm.LVNotFound:
            log.warning("master domain without a %s volume vg=%s", c.LEASES, self.vg)
            return None
        return sanlockdirect.read_resource_leader(self.vg, c.SPM_LEASE, *pv_location(leases, info, align, align))

    def mailbox(self) -> MailboxLocation:
        """The inbox and outbox devices, activating them if needed."""
        info = self._vg_info()
        max_hosts = int(_tag_value(info.tags, c.TAG_MAX_HOSTS) or c.DEFAULT_MAX_HOSTS)
        return MailboxLocation(
            self.activator.activate(self.vg, c.INBOX), self.activator.activate(self.vg, c.OUTBOX), max_hosts
        )

    def deactivate_special(self) -> None:
        for name in c.SPECIAL_NAMES:
            try:
                self.activator.deactivate(self.vg, name)
            except (lvm.LVNotFound, lvm.LVMError, lvm.ActivationError) as e:
                log.warning("cannot deactivate vg=%s lv=%s: %s", self.vg, name, e)

    # Volumes

    def create_volume(
        self,
        uuid: uuidlib.UUID | str,
        capacity: int,
        fmt: Format | str = Format.QCOW2,
        initial_size: int = c.DEFAULT_CHUNK,
        image: uuidlib.UUID | str | None = None,
        fence: Fence = no_fence,
    ) -> VolumeInfo:
        """A new LV: qcow2 thin (initial_size, at most max_size) or raw (capacity).

        Through a temporary activation, a qcow2 volume gets its header and a
        raw one is zeroed (zero.py); the volume is left inactive like any
        volume this host does not run. fence() runs before every command
        that writes: lvcreate, activation, the header write (each zeroing
        chunk), deactivation, and lvremove when a step failed.
        """
        uuid = parse_uuid(uuid)
        fmt = Format(fmt)
        image_uuid = parse_uuid(image) if image else None
        if capacity <= 0:
            raise InvalidArgument(f"capacity must be positive, not {capacity}")
        if fmt is Format.QCOW2:
            if initial_size <= 0:
                raise InvalidArgument(f"initial size must be positive, not {initial_size}")
            size = min(initial_size, max_size(capacity))
        else:
            size = capacity
        name = str(uuid)
        existing = {lv.name for lv in lvm.lvs(self.runner, self.vg)}
        if name in existing:
            raise VolumeExists(self.uuid, uuid)
        tags = [c.TAG_VOLUME, f"{c.TAG_CAPACITY}{capacity}", f"{c.TAG_FORMAT}{fmt}"]
        if image_uuid:
            tags.append(f"{c.TAG_IMAGE}{image_uuid}")
        fence()
        try:
            lvm.lvcreate(self.runner, self.vg, name, size, tuple(tags))
        except lvm.LVMError:
            self._raise_if_no_space(size, fmt, initial_size)
            raise
        try:
            fence()
            path = self.activator.activate(self.vg, name)
            try:
                if fmt is Format.QCOW2:
                    fence()
                    qemuimg.create(path, str(fmt), capacity)
                else:
                    # Its extents may hold a removed volume's data.
                    zero_device(path, lvm.lv_info(self.runner, self.vg, name).size, fence)
            finally:
                fence()
                self.activator.deactivate(self.vg, name)
        except BaseException:
            log.exception("initializing volume failed, removing vg=%s lv=%s", self.vg, name)
            fence()
            lvm.lvremove(self.runner, self.vg, name)
            raise
        log.info("volume created domain=%s volume=%s format=%s capacity=%d", self.vg, name, fmt, capacity)
        return self.volume_info(uuid)

    def _raise_if_no_space(self, size: int, fmt: Format, initial_size: int) -> None:
        """After a failed lvcreate: NoSpace if the VG is too full for size."""
        try:
            vg = lvm.vg_info(self.runner, self.vg)
        except lvm.LVMError:
            return
        if vg.free_extents * vg.extent_size >= size:
            return
        if fmt is not Format.QCOW2:
            what = "a raw volume takes its whole capacity"
        elif initial_size == c.DEFAULT_CHUNK:
            what = "a qcow2 volume starts at one chunk"
        else:
            what = "a qcow2 volume starts at its initial size"
        raise NoSpace(self.uuid, vg.free_extents, vg.extent_size, size, what) from None

    def remove_volume(self, uuid: uuidlib.UUID | str, fence: Fence = no_fence) -> None:
        """Deactivate and remove the LV; fence() before each of the two commands."""
        lv = self._volume_lv(uuid)
        fence()
        self.activator.deactivate(self.vg, lv.name)
        fence()
        lvm.lvremove(self.runner, self.vg, lv.name)
        log.info("volume removed domain=%s volume=%s", self.vg, lv.name)

    def volume_info(self, uuid: uuidlib.UUID | str) -> VolumeInfo:
        lv = self._volume_lv(uuid)
        return self._volume(lv, self.activator.device(self.vg, lv.name))

    def list_volumes(self) -> list[VolumeInfo]:
        active = self.activator.active_devices(self.vg)
        return [
            self._volume(lv, active.get(lv.name)) for lv in lvm.lvs(self.runner, self.vg) if c.TAG_VOLUME in lv.tags
        ]

    def extend_volume(self, uuid: uuidlib.UUID | str, size: int, alloc: str | None = None) -> int:
        """Grow the LV's metadata to size bytes (SPM side); return its size.

        Validation of the request (max size, special volumes) is the
        caller's: this is the LVM step only.
        """
        uuid = parse_uuid(uuid)
        try:
            return lvm.extend(self.runner, self.vg, str(uuid), size, alloc=alloc)
        except lvm.LVNotFound:
            raise VolumeNotFound(self.uuid, uuid) from None

    def resize_volume(self, uuid: uuidlib.UUID | str, capacity: int, fence: Fence = no_fence) -> bool:
        """Record a larger capacity (SPM side); True if anything changed.

        A raw LV grows to it (lvextend), its new extents are zeroed through
        this host's mapping (a temporary activation when it is not mapped
        here), and the capacity tag is written last: a failure before
        leaves the old capacity, and running the resize again finishes it.
        A qcow2 volume only gets the tag (see resize.py). fence() runs
        before every command that writes.
        """
        lv = self._volume_lv(uuid)
        info = self._volume(lv, None)
        vg = lvm.vg_info(self.runner, self.vg)
        if not resizing.growth(info, capacity, vg.free_extents * vg.extent_size, vg.extent_size):
            return False
        if info.format is Format.RAW:
            fence()
            new_size = lvm.extend(self.runner, self.vg, lv.name, capacity)
            self._zero_grown(lv.name, min(info.capacity, lv.size) // 512 * 512, new_size, fence)
        fence()
        lvm.change_tags(
            self.runner,
            self.vg,
            lv.name,
            add=(f"{c.TAG_CAPACITY}{capacity}",),
            delete=(f"{c.TAG_CAPACITY}{info.capacity}",),
        )
        log.info(
            "volume resized domain=%s volume=%s format=%s from=%d to=%d", self.vg, lv.name, info.format,
            info.capacity, capacity,
        )  # fmt: skip
        return True

    def _zero_grown(self, name: str, start: int, end: int, fence: Fence) -> None:
        """Zero bytes [start, end) of a grown raw LV (its new extents may
        hold a removed volume's data)."""
        path = self.activator.device(self.vg, name)
        temporary = path is None
        fence()
        if temporary:
            path = self.activator.activate(self.vg, name)
        else:
            self.activator.refresh(self.vg, name)
        assert path is not None
        try:
            zero_device(path, end, fence, start=start)
        finally:
            if temporary:
                fence()
                self.activator.deactivate(self.vg, name)

    def prepare_volume(self, uuid: uuidlib.UUID | str) -> str:
        """Activate the volume on this host; return its device.

        A qcow2 image resized while no VM ran it gets its header grown to
        the recorded capacity here, before a VM opens it."""
        lv = self._volume_lv(uuid)
        path = self.activator.activate(self.vg, lv.name)
        resizing.catch_up_header(self._volume(lv, path), path)
        return path

    def refresh_volume(self, uuid: uuidlib.UUID | str, verified: Callable[[int], None] | None = None) -> int:
        """After an extend: grow this host's mapping; return the new size.
        verified: see lvm.Activator.refresh."""
        return self.activator.refresh(self.vg, str(parse_uuid(uuid)), verified)

    def teardown_volume(self, uuid: uuidlib.UUID | str) -> None:
        self.activator.deactivate(self.vg, self._volume_lv(uuid).name)

    def _volume_lv(self, uuid: uuidlib.UUID | str) -> lvm.LVInfo:
        uuid = parse_uuid(uuid)
        try:
            lv = lvm.lv_info(self.runner, self.vg, str(uuid))
        except lvm.VGNotFound:
            raise DomainNotFound(self.uuid) from None
        except lvm.LVNotFound:
            raise VolumeNotFound(self.uuid, uuid) from None
        if c.TAG_VOLUME not in lv.tags:
            raise VolumeNotFound(self.uuid, uuid)
        return lv

    def _volume(self, lv: lvm.LVInfo, path: str | None) -> VolumeInfo:
        image = _tag_value(lv.tags, c.TAG_IMAGE)
        return VolumeInfo(
            uuid=uuidlib.UUID(lv.name),
            domain=self.uuid,
            format=Format(_tag_value(lv.tags, c.TAG_FORMAT) or Format.RAW),
            capacity=int(_tag_value(lv.tags, c.TAG_CAPACITY) or lv.size),
            size=lv.size,
            image=uuidlib.UUID(image) if image else None,
            path=path,
        )
