"""Loop device primitives: find, attach, resize in place, detach.

Used to map LVs on kernels without device-mapper (see activation.py).
Resizing uses the kernel's ioctls directly: LOOP_SET_STATUS64 with a new
lo_sizelimit, then LOOP_SET_CAPACITY, which grows the device while it is
open (QEMU keeps its disk open across an extend; `losetup --set-capacity`
cannot change the size limit).

Existing devices are found through /sys/block/loopN/loop/{backing_file,
offset,sizelimit}, so a process that restarts finds the mappings it made.
A device is matched to its backing file by identity, not by name: the
kernel's LOOP_GET_STATUS64 reports the backing file's device number and
inode (or, for a block device, its device number), which stay the same
whatever path or mount namespace the mapping was made from. The name in
sysfs does not: a mapping made in another mount namespace shows
"/loop0" for /dev/loop0.
"""

from __future__ import annotations

import ctypes
import dataclasses
import fcntl
import glob
import logging
import os
import stat

from xtnd.common.cmd import run

log = logging.getLogger("xtnd.lvm")

# linux/loop.h and linux/fs.h
LOOP_SET_STATUS64 = 0x4C04
LOOP_GET_STATUS64 = 0x4C05
LOOP_SET_CAPACITY = 0x4C07
BLKGETSIZE64 = 0x80081272
LO_NAME_SIZE = 64
LO_KEY_SIZE = 32


class LoopInfo64(ctypes.Structure):
    """struct loop_info64 from linux/loop.h."""

    _fields_ = [
        ("lo_device", ctypes.c_uint64),
        ("lo_inode", ctypes.c_uint64),
        ("lo_rdevice", ctypes.c_uint64),
        ("lo_offset", ctypes.c_uint64),
        ("lo_sizelimit", ctypes.c_uint64),
        ("lo_number", ctypes.c_uint32),
        ("lo_encrypt_type", ctypes.c_uint32),
        ("lo_encrypt_key_size", ctypes.c_uint32),
        ("lo_flags", ctypes.c_uint32),
        ("lo_file_name", ctypes.c_uint8 * LO_NAME_SIZE),
        ("lo_crypt_name", ctypes.c_uint8 * LO_NAME_SIZE),
        ("lo_encrypt_key", ctypes.c_uint8 * LO_KEY_SIZE),
        ("lo_init", ctypes.c_uint64 * 2),
    ]


assert ctypes.sizeof(LoopInfo64) == 232


@dataclasses.dataclass(frozen=True)
class LoopDevice:
    path: str
    backing_file: str
    offset: int
    sizelimit: int
    # Identity of the backing file: ("blk", major, minor) for a block
    # device, ("file", major, minor, inode) otherwise; None if unknown.
    backing_id: tuple[str, int, int] | tuple[str, int, int, int] | None = None


def _decode_dev(dev: int) -> tuple[int, int]:
    # The kernel's new_decode_dev (huge_encode_dev in loop_get_status).
    return (dev & 0xFFF00) >> 8, (dev & 0xFF) | ((dev >> 12) & 0xFFF00)


def _status(device: str) -> LoopInfo64 | None:
    info = LoopInfo64()
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.ioctl(fd, LOOP_GET_STATUS64, info)
    except OSError:
        return None  # detached meanwhile
    finally:
        os.close(fd)
    return info


def identity(path: str) -> tuple[str, int, int] | tuple[str, int, int, int]:
    """The identity a loop device over path reports (see LoopDevice.backing_id)."""
    st = os.stat(path)
    if stat.S_ISBLK(st.st_mode):
        return ("blk", os.major(st.st_rdev), os.minor(st.st_rdev))
    return ("file", os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)


def _backing_id(info: LoopInfo64) -> tuple[str, int, int] | tuple[str, int, int, int]:
    if info.lo_rdevice:
        return ("blk", *_decode_dev(info.lo_rdevice))
    return ("file", *_decode_dev(info.lo_device), info.lo_inode)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def devices(offset: int | None = None) -> list[LoopDevice]:
    """Attached loop devices, from sysfs (a detached device has no loop/);
    only those at offset if given (checked first: the cheap test)."""
    found = []
    for sysdir in glob.glob("/sys/block/loop*/loop"):
        name = sysdir.split("/")[3]
        path = f"/dev/{name}"
        try:
            dev_offset = int(_read(f"{sysdir}/offset"))
            if offset is not None and dev_offset != offset:
                continue
            backing_file = _read(f"{sysdir}/backing_file")
            sizelimit = int(_read(f"{sysdir}/sizelimit"))
        except (OSError, ValueError):
            continue  # detached while we looked
        info = _status(path)
        backing_id = _backing_id(info) if info is not None else None
        found.append(LoopDevice(path, backing_file, dev_offset, sizelimit, backing_id))
    return found


class Backing:
    """A backing file's identity, read once, to test many devices against."""

    def __init__(self, path: str):
        self.real = os.path.realpath(path)
        try:
            self.id: tuple[str, int, int] | tuple[str, int, int, int] | None = identity(path)
        except OSError:
            self.id = None

    def under(self, dev: LoopDevice) -> bool:
        """Is dev a loop device over this file (any offset)?"""
        if dev.backing_id is not None:
            return dev.backing_id == self.id
        return dev.backing_file == self.real


def over(dev: LoopDevice, backing_file: str) -> bool:
    """Is dev a loop device over backing_file (any offset)?"""
    return Backing(backing_file).under(dev)


def still(device: str, backing_file: str, offset: int) -> bool:
    """Is device still a loop device over backing_file at offset?

    One LOOP_GET_STATUS64: the check of a device found earlier, instead of
    find()'s walk over every loop device in sysfs (~3 ms with 50 of them).
    """
    info = _status(device)
    if info is None or info.lo_offset != offset:
        return False
    try:
        return _backing_id(info) == identity(backing_file)
    except OSError:
        return False


def find(backing_file: str, offset: int) -> list[LoopDevice]:
    """Loop devices over backing_file at offset (normally zero or one)."""
    backing = Backing(backing_file)
    if backing.id is None:
        return []
    return [d for d in devices(offset) if backing.under(d)]


def logical_block_size(device: str) -> int:
    name = os.path.basename(os.path.realpath(device))
    try:
        return int(_read(f"/sys/class/block/{name}/queue/logical_block_size"))
    except (OSError, ValueError):
        return 512


def attach(backing_file: str, offset: int, sizelimit: int) -> str:
    """Attach a new loop device; return its path.

    Same logical sector size as the backing device (sanlock and QEMU see the
    storage's real sector size) and direct I/O to it, so reads through the
    loop device are not served from this host's page cache of the PV while
    other hosts write the LV.
    """
    sector = logical_block_size(backing_file)
    out = run(
        [
            "losetup",
            "--find",
            "--show",
            "--offset",
            str(offset),
            "--sizelimit",
            str(sizelimit),
            "--sector-size",
            str(sector),
            "--direct-io=on",
            backing_file,
        ]
    )
    path = out.decode().strip()
    log.info("loop attached device=%s backing=%s offset=%d size=%d", path, backing_file, offset, sizelimit)
    return path


def detach(device: str) -> None:
    # If the device is still open the kernel detaches it on last close.
    run(["losetup", "--detach", device])
    log.info("loop detached device=%s", device)


def size(device: str) -> int:
    """The block device's size in bytes (BLKGETSIZE64)."""
    fd = os.open(device, os.O_RDONLY)
    try:
        buf = bytearray(8)
        fcntl.ioctl(fd, BLKGETSIZE64, buf)
        return int.from_bytes(buf, "little")
    finally:
        os.close(fd)


def set_sizelimit(device: str, sizelimit: int) -> int:
    """Change a loop device's size limit in place; return its new size.

    LOOP_SET_STATUS64 freezes the device's queue (the kernel drains its
    I/O before changing the limit: most of the cost), and since Linux 5.x
    sets the new capacity itself. LOOP_SET_CAPACITY, which older kernels
    need for that, only when the size did not follow: on newer kernels it
    would just send another change uevent.
    """
    fd = os.open(device, os.O_RDONLY)
    try:
        info = LoopInfo64()
        fcntl.ioctl(fd, LOOP_GET_STATUS64, info)
        if info.lo_sizelimit != sizelimit:
            info.lo_sizelimit = sizelimit
            fcntl.ioctl(fd, LOOP_SET_STATUS64, info)
        buf = bytearray(8)
        fcntl.ioctl(fd, BLKGETSIZE64, buf)
        size = int.from_bytes(buf, "little")
        if size != sizelimit:
            fcntl.ioctl(fd, LOOP_SET_CAPACITY, 0)
            fcntl.ioctl(fd, BLKGETSIZE64, buf)
            size = int.from_bytes(buf, "little")
        return size
    finally:
        os.close(fd)
