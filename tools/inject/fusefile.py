"""A FUSE file system serving one backing file with faults set at run time.

This kernel has no device-mapper (no dm-delay, dm-flakey), so the harness
puts this layer under a host's storage instead: the mount shows the backing
file as ``disk``; a loop device with direct I/O over ``disk`` is the host's
PV. Each read and write of ``disk`` may be delayed, fail with EIO, or be
torn (only its first bytes written, success claimed), by rules that apply
to an operation (read, write or any) and an offset range.

The mount is made with ``direct_io``: the kernel's page cache keeps
nothing, so every O_DIRECT I/O a daemon issues on the loop device reaches
this process, and its counters prove it (``stats``).

Control is the file ``ctl`` in the mount: write a JSON object
``{"rules": [...], "seed": S}`` to replace the rules (an empty list clears
them); read it for the counters as JSON. A rule::

    {"op": "read"|"write"|"any", "start": 0, "end": 2**63,
     "delay": 0.3,          # seconds before the I/O
     "eio": 0.5,            # probability of EIO (1: always)
     "count": 10,           # at most this many EIOs or torn writes (-1: no limit)
     "torn": 2048}          # a write keeps only its first 2048 bytes

It runs as its own process (``python -m xtnd.tools.inject.fusefile``,
started by ``FaultFile``): libfuse takes over signal handling of the
process that serves.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import random
import stat
import subprocess
import sys
import threading
import time
from typing import Any

from xtnd.tools.rig.wait import wait_for

DISK = "disk"
CTL = "ctl"
# Per-rule counters and the totals kept in ``stats``.
COUNTERS = ("reads", "writes", "read_bytes", "write_bytes", "delayed", "eios", "torns")


class FuseMissing(Exception):
    """python3-fusepy (and libfuse2) are not installed."""


def _parse_rule(raw: dict[str, Any]) -> dict[str, Any]:
    op = str(raw.get("op", "any"))
    if op not in ("read", "write", "any"):
        raise ValueError(f"rule op must be read, write or any: {op!r}")
    rule = {
        "op": op,
        "start": int(raw.get("start", 0)),
        "end": int(raw.get("end", 2**63)),
        "delay": float(raw.get("delay", 0.0)),
        "eio": float(raw.get("eio", 0.0)),
        "count": int(raw.get("count", -1)),
        "torn": int(raw.get("torn", 0)),
    }
    for key in COUNTERS:
        rule[key] = 0
    return rule


class Faults:
    """The rules and counters (pure logic: no FUSE here)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.rules: list[dict[str, Any]] = []
        self.totals = dict.fromkeys(COUNTERS, 0)
        self.rng = random.Random(0)

    def set(self, raw: dict[str, Any]) -> None:
        rules = [_parse_rule(r) for r in raw.get("rules", [])]
        with self.lock:
            self.rules = rules
            self.rng = random.Random(raw.get("seed", 0))

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return {"totals": dict(self.totals), "rules": [dict(r) for r in self.rules]}

    def decide(self, op: str, offset: int, size: int) -> tuple[float, bool, int]:
        """(delay, eio, torn) for one I/O; counts it."""
        delay, eio, torn = 0.0, False, 0
        with self.lock:
            self.totals[op + "s"] += 1
            self.totals[op + "_bytes"] += size
            for rule in self.rules:
                if rule["op"] not in (op, "any") or offset >= rule["end"] or offset + size <= rule["start"]:
                    continue
                rule[op + "s"] += 1
                rule[op + "_bytes"] += size
                if rule["delay"] > 0:
                    delay = max(delay, rule["delay"])
                    rule["delayed"] += 1
                budget = rule["count"] != 0
                if budget and rule["eio"] > 0 and not eio and self.rng.random() < rule["eio"]:
                    eio = True
                    self._spend(rule, "eios")
                elif budget and op == "write" and 0 < rule["torn"] < size and not torn:
                    torn = rule["torn"]
                    self._spend(rule, "torns")
            if delay:
                self.totals["delayed"] += 1
        return delay, eio, torn

    def _spend(self, rule: dict[str, Any], key: str) -> None:
        if rule["count"] > 0:
            rule["count"] -= 1
        rule[key] += 1
        self.totals[key] += 1


def serve(mountpoint: str, backing: str) -> None:
    """Mount and serve until unmounted (runs in the foreground)."""
    try:
        # Debian installs fusepy as the module ``fusepy``; pip as ``fuse``.
        import fusepy as fuse  # type: ignore[import-untyped,import-not-found,unused-ignore]
    except (ImportError, OSError) as e:
        raise FuseMissing(f"FUSE layer needs python3-fusepy and libfuse2: {e}") from e

    faults = Faults()
    fd = os.open(backing, os.O_RDWR)
    started = time.time()

    class FS(fuse.Operations):  # type: ignore[misc]
        def getattr(self, path: str, fh: Any = None) -> dict[str, Any]:
            base = {"st_uid": 0, "st_gid": 0, "st_atime": started, "st_mtime": started, "st_ctime": started}
            if path == "/":
                return {**base, "st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2}
            if path == "/" + DISK:
                return {**base, "st_mode": stat.S_IFREG | 0o600, "st_nlink": 1, "st_size": os.fstat(fd).st_size}
            if path == "/" + CTL:
                return {**base, "st_mode": stat.S_IFREG | 0o600, "st_nlink": 1, "st_size": 0}
            raise fuse.FuseOSError(errno.ENOENT)

        def readdir(self, path: str, fh: Any) -> list[str]:
            return [".", "..", DISK, CTL]

        def open(self, path: str, flags: int) -> int:
            if path not in ("/" + DISK, "/" + CTL):
                raise fuse.FuseOSError(errno.ENOENT)
            return 0

        def truncate(self, path: str, length: int, fh: Any = None) -> None:
            if path != "/" + CTL:
                raise fuse.FuseOSError(errno.EPERM)

        def read(self, path: str, size: int, offset: int, fh: Any) -> bytes:
            if path == "/" + CTL:
                return json.dumps(faults.stats()).encode()[offset : offset + size]
            delay, eio, _ = faults.decide("read", offset, size)
            if delay:
                time.sleep(delay)
            if eio:
                raise fuse.FuseOSError(errno.EIO)
            return os.pread(fd, size, offset)

        def write(self, path: str, data: bytes, offset: int, fh: Any) -> int:
            if path == "/" + CTL:
                try:
                    faults.set(json.loads(data))
                except (ValueError, TypeError, AttributeError) as e:
                    print(f"fusefile: bad control write: {e}", file=sys.stderr, flush=True)
                    raise fuse.FuseOSError(errno.EINVAL) from None
                return len(data)
            delay, eio, torn = faults.decide("write", offset, len(data))
            if delay:
                time.sleep(delay)
            if eio:
                raise fuse.FuseOSError(errno.EIO)
            os.pwrite(fd, data[:torn] if torn else data, offset)
            return len(data)

        def flush(self, path: str, fh: Any) -> None:
            return None

        def fsync(self, path: str, datasync: int, fh: Any) -> None:
            os.fdatasync(fd)

    fuse.FUSE(FS(), mountpoint, foreground=True, nothreads=False, direct_io=True, default_permissions=True)


class FaultFile:
    """A running FUSE layer (its own process) over ``backing`` at ``mountpoint``."""

    def __init__(self, backing: str, mountpoint: str, log: str):
        os.makedirs(mountpoint, exist_ok=True)
        self.mountpoint = mountpoint
        self.disk = os.path.join(mountpoint, DISK)
        self.ctl = os.path.join(mountpoint, CTL)
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "xtnd.tools.inject.fusefile", mountpoint, backing],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for(lambda: os.path.ismount(mountpoint) or self.proc.poll() is not None, timeout=30,
                     interval=0.05, what="the FUSE layer to mount")
            if self.proc.poll() is not None:
                with open(log, errors="replace") as f:
                    tail = f.read()[-300:].strip().replace("\n", " | ")
                raise FuseMissing(f"FUSE layer exited rc={self.proc.returncode}: {tail}")
        except BaseException:
            self.close()
            raise

    def set(self, rules: list[dict[str, Any]], seed: int = 0) -> None:
        """Replace the rules (an empty list: no faults)."""
        with open(self.ctl, "w") as f:
            f.write(json.dumps({"rules": rules, "seed": seed}))

    def stats(self) -> dict[str, Any]:
        with open(self.ctl) as f:
            data: dict[str, Any] = json.loads(f.read())
        return data

    def close(self) -> None:
        """Unmount and end the process (loop devices over ``disk`` first detached by the caller)."""
        if os.path.ismount(self.mountpoint):
            subprocess.run(["umount", self.mountpoint], check=False, capture_output=True)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            subprocess.run(["umount", "-l", self.mountpoint], check=False, capture_output=True)
            self.proc.kill()
            self.proc.wait()


def unmount_under(path: str) -> list[str]:
    """Unmount FUSE layers left under ``path`` by a harness that died (their
    processes end with the mount). Loop devices over them go first."""
    found = []
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 2 and fields[2].startswith("fuse") and fields[1].startswith(path.rstrip("/") + "/"):
                found.append(fields[1])
    for mountpoint in found:
        if subprocess.run(["umount", mountpoint], check=False, capture_output=True).returncode:
            subprocess.run(["umount", "-l", mountpoint], check=False, capture_output=True)
    return found


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fusefile", description="serve a backing file with injectable faults")
    ap.add_argument("mountpoint")
    ap.add_argument("backing")
    args = ap.parse_args(argv)
    try:
        serve(args.mountpoint, args.backing)
    except (FuseMissing, RuntimeError, OSError) as e:
        print(f"fusefile: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
