"""Reading an LV's size and segments straight from a PV's LVM metadata.

The HSM's refresh after an extend needs the LV's new size and segments
from storage; an ``lvs``, even through the LVM shell, costs 10-15 ms of
device scanning here. The same facts are in the VG metadata text that LVM
keeps in each PV's metadata area: two O_DIRECT reads (header, text) and a
parse cost well under a millisecond.

On-disk layout (LVM2 text format, all integers little-endian):

- label, in one of the PV's first four 512-byte sectors: ``LABELONE``,
  the sector number (u64), a CRC (u32) of the rest of the sector from the
  next field on, the offset of the PV header in the sector (u32) and
  ``LVM2 001``. The PV header: the PV uuid (32 chars), the device size
  (u64), then two lists of (offset u64, size u64) ending with a zero
  pair: data areas, then metadata areas.
- metadata area header, at the start of a metadata area (512 bytes): a
  CRC (u32) of the rest of the header, the magic `` LVM2 x[5A%r0N*>``,
  version 1 (u32), its own absolute offset and the area's size (u64
  each), then raw locations (offset u64 from the area's start, size u64,
  CRC u32, flags u32); the first is the committed metadata.
- the metadata text is a circular buffer after the header: a text running
  past the area's end continues right after the 512-byte header. Its CRC
  covers both parts, the terminating NUL included.

The CRC is LVM's: CRC-32 (the zlib polynomial) from the initial value
0xf597a6cf and without the final inversion.

The text is read again when its CRC does not match (an extend by the SPM
overwrote it meanwhile). Anything else unexpected (no label, an ignored
area, another VG, a segment type other than one linear stripe, a PV this
host does not know) raises Unavailable: the caller asks LVM instead.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import re
import struct
import threading
import time
import zlib
from collections.abc import Sequence
from typing import Any

from .lv import LVInfo, Segment

SECTOR = 512
ALIGN = 4096  # reads aligned for any logical sector size (O_DIRECT)
LABEL_ID = b"LABELONE"
LABEL_TYPE = b"LVM2 001"
MDA_MAGIC = b" LVM2 x[5A%r0N*>"
MDA_HEADER_SIZE = 512
INITIAL_CRC = 0xF597A6CF
RAW_LOCN_IGNORED = 0x1
READ_TRIES = 3
MAX_TEXT = 64 * 1024**2  # a metadata text this large is not one LVM wrote


class Unavailable(Exception):
    """The metadata cannot be read this way (ask LVM)."""


class UnknownPV(Unavailable):
    """The metadata names a PV whose label was not read (yet)."""


def crc(data: bytes | memoryview, value: int = INITIAL_CRC) -> int:
    """LVM's calc_crc: zlib's CRC-32 without its pre- and post-inversion."""
    return zlib.crc32(data, value ^ 0xFFFFFFFF) ^ 0xFFFFFFFF


@dataclasses.dataclass(frozen=True)
class Label:
    pv_uuid: str  # 32 characters, no dashes
    mdas: tuple[tuple[int, int], ...]  # (offset, size) of each metadata area


@dataclasses.dataclass
class Counters:
    reads: int = 0  # O_DIRECT reads
    lookups: int = 0  # lv_info calls answered from the metadata
    seconds: float = 0.0  # spent in those lookups
    retries: int = 0  # texts read again after a CRC mismatch


def read_direct(path: str, offset: int, length: int) -> bytes:
    """length bytes at offset, read with O_DIRECT (bypassing this host's cache
    of a PV other hosts write) through an aligned buffer."""
    start = offset - offset % ALIGN
    end = -(-(offset + length) // ALIGN) * ALIGN
    buf = mmap.mmap(-1, end - start)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
        try:
            got = os.preadv(fd, [buf], start)
        finally:
            os.close(fd)
        if got < offset + length - start:
            raise Unavailable(f"short read of {path}: {got} bytes at {start}")
        return bytes(buf[offset - start : offset - start + length])
    finally:
        buf.close()


def parse_label(head: bytes) -> Label:
    """The PV label in the first 2 KiB of a PV."""
    for sector in range(4):
        raw = head[sector * SECTOR : (sector + 1) * SECTOR]
        if raw[:8] != LABEL_ID:
            continue
        number, checksum, offset = struct.unpack_from("<QII", raw, 8)
        if number != sector or raw[24:32] != LABEL_TYPE or crc(raw[20:]) != checksum:
            raise Unavailable(f"bad LVM label in sector {sector}")
        if not 32 <= offset <= SECTOR - 56:
            raise Unavailable(f"bad PV header offset {offset}")
        pv_uuid = raw[offset : offset + 32].decode("ascii", "replace")
        pos = offset + 40
        lists: list[list[tuple[int, int]]] = [[], []]
        for areas in lists:
            while True:
                if pos + 16 > SECTOR:
                    raise Unavailable("PV header area list runs past its sector")
                area = struct.unpack_from("<QQ", raw, pos)
                pos += 16
                if area == (0, 0):
                    break
                areas.append(area)
        return Label(pv_uuid, tuple(lists[1]))
    raise Unavailable("no LVM label")


def parse_mda_header(raw: bytes, offset: int) -> tuple[int, int, int, int]:
    """(area size, text offset, text size, text CRC) of the committed metadata."""
    checksum = struct.unpack_from("<I", raw, 0)[0]
    if crc(raw[4:MDA_HEADER_SIZE]) != checksum:
        raise Unavailable(f"metadata area header at {offset}: bad checksum")
    if raw[4:20] != MDA_MAGIC:
        raise Unavailable(f"metadata area header at {offset}: bad magic")
    version, start, size = struct.unpack_from("<IQQ", raw, 20)
    if version != 1 or start != offset:
        raise Unavailable(f"metadata area header at {offset}: version {version} start {start}")
    text_offset, text_size, text_crc, flags = struct.unpack_from("<QQII", raw, 40)
    if flags & RAW_LOCN_IGNORED:
        raise Unavailable(f"metadata area at {offset} is ignored")
    if text_size == 0:
        raise Unavailable(f"metadata area at {offset} is empty")
    if not MDA_HEADER_SIZE <= text_offset < size or text_size > min(size - MDA_HEADER_SIZE, MAX_TEXT):
        raise Unavailable(f"metadata area at {offset}: text {text_offset}+{text_size} outside {size}")
    return size, text_offset, text_size, text_crc


# The LVM config syntax the metadata text is written in.
_TOKEN = re.compile(r'\s+|#[^\n]*|(?P<str>"(?:[^"\\]|\\.)*")|(?P<punct>[{}\[\]=,])|(?P<word>[^\s{}\[\]=,"#]+)', re.S)
_ESCAPE = re.compile(r"\\(.)", re.S)


def _tokens(text: str) -> list[str]:
    out = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise Unavailable(f"metadata text: cannot parse at {pos}")
        if m.lastgroup is not None:
            out.append(m.group())
        pos = m.end()
    return out


def parse_text(text: str) -> dict[str, Any]:
    """LVM's config text as nested dicts: sections, and values that are
    ints, strings or lists of them."""
    tokens = _tokens(text)
    pos = 0

    def value() -> Any:
        nonlocal pos
        tok = tokens[pos]
        pos += 1
        if tok.startswith('"'):
            return _ESCAPE.sub(r"\1", tok[1:-1])
        if tok == "[":
            items = []
            while tokens[pos] != "]":
                items.append(value())
                if tokens[pos] == ",":
                    pos += 1
            pos += 1
            return items
        try:
            return int(tok)
        except ValueError:
            try:
                return float(tok)
            except ValueError:
                raise Unavailable(f"metadata text: unexpected {tok!r}") from None

    def section(top: bool) -> dict[str, Any]:
        nonlocal pos
        out: dict[str, Any] = {}
        while pos < len(tokens):
            key = tokens[pos]
            if key == "}" and not top:
                pos += 1
                return out
            op = tokens[pos + 1]
            pos += 2
            if op == "=":
                out[key] = value()
            elif op == "{":
                out[key] = section(False)
            else:
                raise Unavailable(f"metadata text: unexpected {op!r} after {key!r}")
        if not top:
            raise Unavailable("metadata text: unterminated section")
        return out

    try:
        return section(True)
    except IndexError:
        raise Unavailable("metadata text: truncated") from None


def lv_from_metadata(meta: dict[str, Any], vg: str, lv: str, pv_paths: dict[str, str]) -> LVInfo:
    """vg/lv as lvs would report it; pv_paths: PV uuid (no dashes) -> device path."""
    vg_section = meta.get(vg)
    if not isinstance(vg_section, dict):
        raise Unavailable(f"metadata of another VG (not {vg})")
    try:
        extent_size = int(vg_section["extent_size"]) * SECTOR
        pvs = vg_section["physical_volumes"]
        section = vg_section["logical_volumes"][lv]
    except (KeyError, TypeError, ValueError) as e:
        raise Unavailable(f"{vg}/{lv} not in the metadata: {e!r}") from None
    try:
        count = int(section["segment_count"])
        segments = []
        for i in range(1, count + 1):
            seg = section[f"segment{i}"]
            stripes = seg["stripes"]
            if seg["type"] != "striped" or int(seg.get("stripe_count", 1)) != 1 or len(stripes) != 2:
                raise Unavailable(f"{vg}/{lv} segment {i} is not linear")
            pv_uuid = str(pvs[stripes[0]]["id"]).replace("-", "")
            path = pv_paths.get(pv_uuid)
            if path is None:
                raise UnknownPV(f"{vg}/{lv} segment {i}: PV {pv_uuid} is not a device here")
            segments.append(Segment(path, int(stripes[1]), int(seg["extent_count"]), int(seg["start_extent"])))
        tags = tuple(str(t) for t in section.get("tags", []))
    except (KeyError, TypeError, ValueError) as e:
        raise Unavailable(f"{vg}/{lv}: unexpected metadata: {e!r}") from None
    segments.sort(key=lambda s: s.start_le)
    return LVInfo(
        vg=vg,
        name=lv,
        size=sum(s.extents for s in segments) * extent_size,
        tags=tuple(sorted(tags)),  # as lvs reports them
        extent_size=extent_size,
        segments=tuple(segments),
    )


class Reader:
    """The committed VG metadata of devices, read directly; thread-safe.

    Labels (PV uuid, metadata areas) are read once per device and again
    when a PV named in the metadata is not among them.
    """

    def __init__(self, devices: Sequence[str]):
        self.devices = tuple(devices)
        self.counters = Counters()
        self._lock = threading.Lock()
        self._labels: dict[str, Label] = {}

    def _read(self, path: str, offset: int, length: int) -> bytes:
        data = read_direct(path, offset, length)
        with self._lock:
            self.counters.reads += 1
        return data

    def labels(self, again: bool = False) -> dict[str, Label]:
        with self._lock:
            known = dict(self._labels)
        if again or not known:
            known = {}
            for path in self.devices:
                try:
                    known[path] = parse_label(self._read(path, 0, 4 * SECTOR))
                except (OSError, Unavailable):
                    continue  # not a PV (yet), or unreadable: not ours to read from
            with self._lock:
                self._labels = known
        return known

    def text(self, path: str, mda_offset: int) -> str:
        """The committed metadata text of the metadata area at mda_offset of path."""
        for _ in range(READ_TRIES):
            header = self._read(path, mda_offset, MDA_HEADER_SIZE)
            size, offset, length, checksum = parse_mda_header(header, mda_offset)
            first = min(length, size - offset)
            data = self._read(path, mda_offset + offset, first)
            if first < length:  # wrapped round the circular buffer
                data += self._read(path, mda_offset + MDA_HEADER_SIZE, length - first)
            if crc(data) == checksum:
                if not data.endswith(b"\0"):
                    raise Unavailable(f"metadata text at {path}:{mda_offset + offset} is not terminated")
                return data[:-1].decode("utf-8", "replace")
            with self._lock:
                self.counters.retries += 1
        raise Unavailable(f"metadata text of {path} changed under {READ_TRIES} reads")

    def _metadata(self, labels: dict[str, Label], errors: list[str]) -> dict[str, Any] | None:
        """The parsed text of the first readable metadata area."""
        for path, label in labels.items():
            for mda_offset, _ in label.mdas:
                try:
                    return parse_text(self.text(path, mda_offset))
                except (OSError, Unavailable) as e:
                    errors.append(f"{path}@{mda_offset}: {e}")
        return None

    def lv_info(self, vg: str, lv: str) -> LVInfo:
        """vg/lv from the first readable metadata area; raises Unavailable."""
        errors: list[str] = []
        start = time.monotonic()
        for again in (False, True):
            # Labels read again: a PV added to the VG (or replaced) since.
            labels = self.labels(again)
            meta = self._metadata(labels, errors)
            if meta is None:
                continue
            try:
                info = lv_from_metadata(meta, vg, lv, {lab.pv_uuid: p for p, lab in labels.items()})
            except UnknownPV as e:
                errors.append(str(e))
                continue
            with self._lock:
                self.counters.lookups += 1
                self.counters.seconds += time.monotonic() - start
            return info
        raise Unavailable("; ".join(errors) or f"no metadata area on {', '.join(self.devices)}")
