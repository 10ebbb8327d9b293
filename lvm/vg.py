"""Physical volumes and volume groups: one small function per subcommand."""

from __future__ import annotations

import dataclasses
import logging

from .runner import Runner

log = logging.getLogger("xtnd.lvm")


@dataclasses.dataclass(frozen=True)
class PVInfo:
    name: str
    pe_start: int  # bytes from the start of the PV to its first extent


@dataclasses.dataclass(frozen=True)
class VGInfo:
    name: str
    uuid: str
    extent_size: int
    extent_count: int
    free_extents: int
    tags: tuple[str, ...]
    pvs: tuple[PVInfo, ...]
    autoactivation: bool = True
    mda_size: int = 0  # the smallest metadata area, bytes
    mda_count: int = 0  # metadata areas of all PVs
    mda_free: int = 0  # free bytes in the fullest metadata area

    @property
    def size(self) -> int:
        return self.extent_count * self.extent_size

    @property
    def free(self) -> int:
        return self.free_extents * self.extent_size

    def pv(self, name: str) -> PVInfo:
        for pv in self.pvs:
            if pv.name == name:
                return pv
        raise KeyError(f"{name} is not a PV of {self.name}")


def split_tags(value: str) -> tuple[str, ...]:
    return tuple(t for t in value.split(",") if t)


def pvcreate(runner: Runner, *devices: str, metadata_size: int = 0, metadata_copies: int = 0) -> None:
    """metadata_size (bytes) and metadata_copies (1 or 2 per PV): 0 keeps
    LVM's defaults (1 MiB, one copy)."""
    args = ["--yes"]
    if metadata_size:
        args += ["--metadatasize", f"{metadata_size}b"]
    if metadata_copies:
        args += ["--pvmetadatacopies", str(metadata_copies)]
    runner.run("pvcreate", *args, *devices)
    log.info("pvcreate devices=%s metadata_size=%d metadata_copies=%d", list(devices), metadata_size, metadata_copies)


def vgcreate(
    runner: Runner,
    vg: str,
    devices: list[str],
    extent_size: int,
    tags: tuple[str, ...] = (),
    autoactivation: bool = True,
) -> None:
    """autoactivation=False: no host activates the VG's LVs at boot or when
    the PVs appear (event-based autoactivation); they are mapped on demand."""
    args = ["--autobackup", "n", "--physicalextentsize", f"{extent_size}b"]
    if not autoactivation:
        args += ["--setautoactivation", "n"]
    for tag in tags:
        args += ["--addtag", tag]
    runner.run("vgcreate", *args, vg, *devices)
    log.info("vgcreate vg=%s devices=%s extent_size=%d", vg, devices, extent_size)


def vgextend(runner: Runner, vg: str, *devices: str) -> None:
    runner.run("vgextend", "--autobackup", "n", vg, *devices)
    log.info("vgextend vg=%s devices=%s", vg, list(devices))


def vgremove(runner: Runner, vg: str) -> None:
    runner.run("vgremove", "--force", vg)
    log.info("vgremove vg=%s", vg)


def vg_change_tags(runner: Runner, vg: str, add: tuple[str, ...] = (), delete: tuple[str, ...] = ()) -> None:
    args: list[str] = ["--autobackup", "n"]
    for tag in add:
        args += ["--addtag", tag]
    for tag in delete:
        args += ["--deltag", tag]
    runner.run("vgchange", *args, vg)


def vg_info(runner: Runner, vg: str) -> VGInfo:
    """Extent size, free extents, tags and PVs of one VG (raises VGNotFound)."""
    fields = (
        "vg_name,vg_uuid,vg_extent_size,vg_extent_count,vg_free_count,vg_tags,pv_name,pe_start,"
        "vg_autoactivation,vg_mda_size,vg_mda_count,vg_mda_free"
    )
    rows = runner.report("vgs", "-o", fields, vg)
    first = rows[0]
    return VGInfo(
        autoactivation=first.get("vg_autoactivation", "enabled") == "enabled",
        mda_size=int(first.get("vg_mda_size") or 0),
        mda_count=int(first.get("vg_mda_count") or 0),
        mda_free=int(first.get("vg_mda_free") or 0),
        name=first["vg_name"],
        uuid=first["vg_uuid"],
        extent_size=int(first["vg_extent_size"]),
        extent_count=int(first["vg_extent_count"]),
        free_extents=int(first["vg_free_count"]),
        tags=split_tags(first["vg_tags"]),
        pvs=tuple(PVInfo(r["pv_name"], int(r["pe_start"])) for r in rows if r["pv_name"]),
    )


def vgs(runner: Runner) -> list[str]:
    """Names of the VGs on the runner's devices."""
    return sorted({r["vg_name"] for r in runner.report("vgs", "-o", "vg_name")})
