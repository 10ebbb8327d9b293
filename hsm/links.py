"""Stable paths of prepared volumes: /run/xtnd/<domain>/<volume>.

A volume's device changes from host to host and from one activation to
the next (/dev/VG/LV with device-mapper, /dev/loopN without it), so VM
definitions never name it. `xtnd volume prepare` activates the volume and
points a symlink at the device; VMs use the symlink. libvirt keeps the
path as written in the domain XML (it does not resolve links), so the HSM
finds (domain, volume) of a disk from its source path alone.

The link is replaced atomically (rename over the old one), so a prepare
that races with a reader never shows a missing path.
"""

from __future__ import annotations

import contextlib
import os
import uuid as uuidlib

RUN_DIR = "/run/xtnd"


def link_path(domain: uuidlib.UUID | str, volume: uuidlib.UUID | str, run_dir: str = RUN_DIR) -> str:
    return os.path.join(run_dir, str(domain), str(volume))


def parse(path: str, run_dir: str = RUN_DIR) -> tuple[uuidlib.UUID, uuidlib.UUID] | None:
    """(domain, volume) if path is a volume link under run_dir, else None."""
    rel = os.path.relpath(os.path.normpath(path), os.path.normpath(run_dir))
    parts = rel.split(os.sep)
    if len(parts) != 2:
        return None
    try:
        return uuidlib.UUID(parts[0]), uuidlib.UUID(parts[1])
    except ValueError:
        return None


def create(domain: uuidlib.UUID | str, volume: uuidlib.UUID | str, device: str, run_dir: str = RUN_DIR) -> str:
    """Point the volume's link at device; return the link path."""
    path = link_path(domain, volume, run_dir)
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    os.symlink(device, tmp)
    os.rename(tmp, path)
    return path


def remove(domain: uuidlib.UUID | str, volume: uuidlib.UUID | str, run_dir: str = RUN_DIR) -> None:
    """Remove the link (and the domain folder once empty); fine if absent."""
    path = link_path(domain, volume, run_dir)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    with contextlib.suppress(OSError):
        os.rmdir(os.path.dirname(path))
