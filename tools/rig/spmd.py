"""A pool (master block domain on loop PVs) and real ``xtnd spm`` daemons.

Pool: a master domain on a loop PV with 4 MiB extents whose lockspace has
io_timeout=1 (sanlock's default of 10 s would make every join wait ~20 s),
a host storage config file, and a helper writing SPM configs.

SpmProcess runs ``xtnd spm --config FILE`` inside a simulated host's mount
namespace (SanlockDaemon.popen), logging to a file the caller reads:
wait_log() waits for a line, serving() parses the "serving started/stopped"
lines (CLOCK_MONOTONIC, shared by every process on the machine).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid as uuidlib
from collections.abc import Iterator
from typing import Any

from xtnd import lvm, storage
from xtnd.mailbox.directio import DirectFile
from xtnd.mailbox.hsm import HSMConfig, HSMMailbox
from xtnd.storage import constants as c
from xtnd.tools.rig.sanlockd import SanlockDaemon
from xtnd.tools.rig.wait import wait_for

MiB = 1024**2
EXTENT = 4 * MiB
IO_TIMEOUT = 1
XTND = os.path.join(os.path.dirname(sys.executable), "xtnd")

_SERVING = re.compile(r"serving (started|stopped) host_id=(\d+) .*?mono=([\d.]+) wall=([\d.]+)")


class Pool:
    """A master block domain with a few thin volumes, ready for an SPM."""

    def __init__(self, workdir: str, pvs: list[str], max_hosts: int = 10):
        self.workdir = workdir
        self.pvs = pvs
        self.domain = storage.create_block_domain(
            uuidlib.uuid4(),
            pvs,
            master=True,
            max_hosts=max_hosts,
            extent_size=EXTENT,
            io_timeout=IO_TIMEOUT,
            activation="loop",
        )
        self.uuid = self.domain.uuid
        self.storage_config = os.path.join(workdir, "storage.json")
        hostcfg = storage.HostConfig(self.storage_config, activation="loop")
        hostcfg.add_block(self.uuid, pvs)
        hostcfg.save()
        self._handles: list[DirectFile] = []

    def create_volume(self, capacity: int = 100 * MiB, size: int = 8 * MiB) -> uuidlib.UUID:
        """A thin volume's LV and tags (no qcow2 header: the SPM never reads it)."""
        vol = uuidlib.uuid4()
        tags = (c.TAG_VOLUME, f"{c.TAG_CAPACITY}{capacity}", f"{c.TAG_FORMAT}qcow2")
        lvm.lvcreate(self.domain.runner, self.domain.vg, str(vol), size, tags)
        return vol

    def lv_size(self, name: uuidlib.UUID | str) -> int:
        """The LV size as lvs reports it now."""
        return lvm.lv_info(self.domain.runner, self.domain.vg, str(name)).size

    def free_extents(self) -> int:
        return lvm.vg_info(self.domain.runner, self.domain.vg).free_extents

    def hsm(self, host_id: int = 1, **config: Any) -> HSMMailbox:
        mbx = self.domain.mailbox()
        inbox, outbox = DirectFile(mbx.inbox), DirectFile(mbx.outbox)
        self._handles += [inbox, outbox]
        return HSMMailbox(inbox, outbox, host_id, HSMConfig(**config))

    def spm_config(self, host_id: int, name: str | None = None, pvs: list[str] | None = None, **extra: str) -> str:
        """Write an SPM config for host_id; extra: "section.option" -> value."""
        sections: dict[str, dict[str, str]] = {
            "spm": {
                "host_id": str(host_id),
                "master_domain": str(self.uuid),
                "storage_config": self.storage_config,
                "control_socket": os.path.join(self.workdir, f"spm{host_id}.sock"),
                "shutdown_grace": "10",
                "stats_interval": "0",
            },
            "lease": {"io_timeout": str(IO_TIMEOUT), "acquire_interval": "0.2", "check_interval": "0.2"},
            "lvm": {"command_timeout": "8"},
            # Tests run several daemons at once: no fixed metrics port.
            "metrics": {"listen": ""},
        }
        if pvs:
            sections[f"domain {self.uuid}"] = {"pvs": " ".join(pvs)}
        for key, value in extra.items():
            section, _, option = key.partition(".")
            sections.setdefault(section, {})[option] = value
        path = os.path.join(self.workdir, name or f"spm{host_id}.conf")
        with open(path, "w") as f:
            for section, options in sections.items():
                f.write(f"[{section}]\n")
                f.writelines(f"{k} = {v}\n" for k, v in options.items())
        return path

    def close(self) -> None:
        for h in self._handles:
            h.close()
        self.domain.deactivate_special()

    def remove(self) -> None:
        """close(), then remove the VG (gone already is fine): the pool's end."""
        self.close()
        with contextlib.suppress(lvm.LVMError):
            lvm.vgremove(self.domain.runner, self.domain.vg)


class SpmProcess:
    """``xtnd spm --config FILE`` in a host's namespace, logging to a file."""

    def __init__(self, host: SanlockDaemon, config: str, logfile: str, env: dict[str, str] | None = None):
        self.host = host
        self.logfile = logfile
        with open(logfile, "ab") as log:
            # "xtnd spm" with only the spm command loaded (xtnd.tools.spm_cli.main).
            argv = [sys.executable, "-m", "xtnd.tools.spm_cli", "--config", config]
            self.proc = host.popen(argv, env={**os.environ, **(env or {})}, stdout=log, stderr=log)

    def log(self) -> str:
        with open(self.logfile, errors="replace") as f:
            return f.read()

    def wait_log(self, pattern: str, timeout: float = 60.0) -> re.Match[str]:
        regex = re.compile(pattern)

        def found() -> re.Match[str] | None:
            m = regex.search(self.log())
            if m is None and self.proc.poll() is not None:
                raise AssertionError(f"spm exited rc={self.proc.returncode} before {pattern!r}:\n{self.log()[-3000:]}")
            return m

        return wait_for(found, timeout=timeout, interval=0.05, what=f"{pattern!r} in {self.logfile}")

    def wait_serving(self, timeout: float = 60.0) -> float:
        return float(self.wait_log(r"serving started .*mono=([\d.]+)", timeout).group(1))

    def serving(self) -> list[tuple[str, int, float]]:
        """(started|stopped, host_id, monotonic time) in log order."""
        return [(m.group(1), int(m.group(2)), float(m.group(3))) for m in _SERVING.finditer(self.log())]

    def kill(self) -> float:
        """SIGKILL; return the monotonic time the process was gone."""
        self.proc.kill()
        self.proc.wait()
        return time.monotonic()

    def terminate(self, timeout: float = 60.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def wait(self, timeout: float = 60.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"spm still running after {timeout}s:\n{self.log()[-3000:]}") from None


def intervals(*procs: tuple[SpmProcess, float | None]) -> list[tuple[float, float, int]]:
    """(start, end, host_id) serving intervals.

    A killed daemon logs no stop: its interval ends when it was killed; one
    still serving has an open interval (end = inf).
    """
    result = []
    for proc, killed in procs:
        start: tuple[float, int] | None = None
        for what, host_id, t in proc.serving():
            if what == "started":
                assert start is None, "started twice without a stop"
                start = (t, host_id)
            else:
                assert start is not None, "stopped without a start"
                result.append((start[0], t, host_id))
                start = None
        if start is not None:
            result.append((start[0], killed if killed is not None else float("inf"), start[1]))
    return sorted(result)


def assert_never_both(spans: list[tuple[float, float, int]]) -> None:
    for first, second in zip(spans, spans[1:], strict=False):
        assert first[1] < second[0], f"host {first[2]} until {first[1]:.6f}, host {second[2]} from {second[0]:.6f}"


def write_json(path: str, data: Any) -> None:
    with open(path, "w") as f:
        json.dump(data, f)


LVM_LOCK_DIR = "/run/lock/lvm"


@contextlib.contextmanager
def vg_locked(vg: str, shared: bool = False) -> Iterator[None]:
    """Hold LVM's own lock of vg (flock on its lock file): every LVM command
    that writes vg metadata waits until the block ends (and, unless shared,
    every one that reads it). Lets a test keep extends in flight for as
    long as it needs, without sleeping."""
    os.makedirs(LVM_LOCK_DIR, exist_ok=True)
    fd = os.open(os.path.join(LVM_LOCK_DIR, f"V_{vg}"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def lvm_commands(subcmd: str, vg: str) -> list[int]:
    """Pids of running `lvm SUBCMD` processes naming vg in their arguments."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if len(argv) > 2 and os.path.basename(argv[0]) == b"lvm" and argv[1] == subcmd.encode():
            if any(vg.encode() in a for a in argv):
                pids.append(int(entry))
    return pids
