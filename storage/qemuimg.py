"""The few qemu-img subcommands volume creation needs."""

from __future__ import annotations

import json
from typing import Any

from xtnd.common.cmd import run

QEMU_IMG = "qemu-img"
TIMEOUT = 120.0


def create(path: str, fmt: str, size: int) -> None:
    """Write a new image header (qcow2) on a file or block device."""
    # compat=1.1 (qcow2 v3) is what current QEMU and libvirt expect; no
    # preallocation: a thin volume grows by extends, not by qemu-img.
    opts = ["-o", "compat=1.1"] if fmt == "qcow2" else []
    run([QEMU_IMG, "create", "-q", "-f", fmt, *opts, path, str(size)], timeout=TIMEOUT)


def info(path: str) -> dict[str, Any]:
    out = run([QEMU_IMG, "info", "--output", "json", "-U", path], timeout=TIMEOUT)
    result: dict[str, Any] = json.loads(out)
    return result


def resize(path: str, fmt: str, size: int) -> None:
    """Grow the image's virtual size to size bytes (never shrinks: no --shrink).

    qemu-img takes the image's lock: it fails on an image a QEMU of this
    host has open, which then must grow it itself (libvirt blockResize)."""
    run([QEMU_IMG, "resize", "-q", "-f", fmt, path, str(size)], timeout=TIMEOUT)
