"""The one way xtnd runs LVM commands.

Every command is built as an argv (no shell) and carries:

- ``--devices``: LVM looks only at the listed PVs. A shared SAN exposes many
  VGs to every host; scanning them all is slow and a host must never touch
  a VG that is not its domain's. It also keeps test VGs on one machine from
  seeing each other.
- a scan directory (sysdir.device_dir) holding links to exactly those PVs:
  with it LVM's device cache stats a handful of links instead of every node
  under /dev per command (--devices alone does not stop that). LVM is given
  the links' paths (in --devices and in arguments naming a device) and
  reports them; the runner maps them back to the device paths in reports.
- ``--driverloaded n`` when the kernel has no device-mapper: LVM then only
  reads and writes metadata (which is all the SPM needs) instead of failing
  on /dev/mapper/control. Detected at run time, can be forced either way.
- ``--config`` switching off udev synchronisation and device hints (no udev
  events happen without device-mapper; hints would go stale while other
  hosts change the VG), and metadata archives unless asked for.
- read-only locking on a read-only runner: only the SPM may write a shared
  VG's metadata, so every other path (HSM refresh and activation, CLI
  reports, volume prepare) gets a runner on which LVM itself refuses any
  metadata change ("Operation prohibited while --readonly is set"); a bug
  there fails instead of corrupting the VG. Reports, activation and
  refresh change no metadata and work. LVM 2.03 ignores
  ``global/metadata_read_only`` given with ``--config`` (lvcreate still
  writes); ``global/locking_type=4`` is still honoured there, as
  ``--sysinit --readonly``, with a deprecation warning on stderr.

Commands run as processes, or through a long-lived LVM shell (shell.py)
when the runner is given one: same argv, same errors, same history. Both
read LVM's configuration from xtnd's system directory (sysdir.py).

Reports are JSON in bytes. Failures raise typed errors (errors.py) and dump
the recent command history in the log.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Sequence
from typing import Any

from xtnd.common.cmd import CommandError, CommandTimeout, run

from . import sysdir
from .errors import LVMError, LVNotFound, VGNotFound
from .history import CommandHistory
from .shell import LvmShell, ShellError

log = logging.getLogger("xtnd.lvm")

LVM = "lvm"
DEFAULT_TIMEOUT = 120.0
# LVM's read-only locking (see the module doc).
READ_ONLY_LOCKING = 4

_VG_NOT_FOUND = re.compile(r'Volume group "([^"]+)" not found')
_LV_NOT_FOUND = (
    re.compile(r'Failed to find logical volume "([^"/]+)/([^"]+)"'),
    re.compile(r"Logical volume (\S+) not found in volume group (\S+?)\.?$", re.M),
)


def device_mapper_available() -> bool:
    """True when the kernel has device-mapper (module loaded or built in)."""
    if os.path.isdir("/sys/module/dm_mod"):
        return True
    try:
        with open("/proc/misc") as f:
            return any(line.split()[1:] == ["device-mapper"] for line in f)
    except OSError:
        return False


class Runner:
    """Runs LVM commands restricted to ``devices``.

    driverloaded: None detects device-mapper; False adds ``--driverloaded n``.
    read_only: LVM refuses every metadata change (see the module doc).
    backup: keep LVM's metadata backups and archives under /etc/lvm (off by
    default: every extend would write and fsync a file, and the SPM does
    thousands; with a shared VG whose SPM moves between hosts, each host's
    /etc/lvm would hold a stale, partial history of the VG, misleading for
    vgcfgrestore. The metadata is kept twice on every PV instead).
    shell: run commands through this LVM shell instead of one process each
    (it may be shared by several runners; set or cleared at any time).
    system_dir: LVM's system directory; None: xtnd's (sysdir.prepare()),
    "" the host's own /etc/lvm (plain LVM, for comparisons).
    """

    def __init__(
        self,
        devices: Sequence[str],
        driverloaded: bool | None = None,
        backup: bool = False,
        timeout: float = DEFAULT_TIMEOUT,
        history: CommandHistory | None = None,
        shell: LvmShell | None = None,
        system_dir: str | None = None,
        read_only: bool = False,
    ):
        if not devices:
            raise ValueError("an LVM runner needs at least one device")
        self.devices = tuple(devices)
        self.driverloaded = device_mapper_available() if driverloaded is None else driverloaded
        self.read_only = read_only
        self.backup = backup
        self.timeout = timeout
        self.history = history if history is not None else CommandHistory()
        self.shell = shell
        self._system_dir = system_dir
        self._shell_dir: str | None = None

    @property
    def system_dir(self) -> str:
        """LVM's system directory, xtnd's prepared at first use ("" = the host's)."""
        if self._system_dir is None:
            try:
                self._system_dir = sysdir.prepare()
            except OSError as e:
                log.warning("cannot prepare %s, using the host's LVM config: %s", sysdir.DEFAULT_DIR, e)
                self._system_dir = ""
        return self._system_dir

    def with_devices(self, devices: Sequence[str]) -> Runner:
        """A runner over other devices sharing settings, history and shell."""
        return Runner(
            devices,
            self.driverloaded,
            self.backup,
            self.timeout,
            self.history,
            self.shell,
            self._system_dir,
            self.read_only,
        )

    def _scan(self) -> tuple[str, tuple[str, ...]] | None:
        """The scan directory and the devices' links in it (None: the host's config)."""
        if not self.system_dir:
            return None
        return sysdir.device_dir(self.devices, self.system_dir)

    def _config(self, scan_dir: str | None) -> str:
        scan = f' scan=["{scan_dir}"]' if scan_dir else ""
        parts = [f'devices {{ hints="none" obtain_device_list_from_udev=0{scan} }}']
        if not self.driverloaded:
            # No device-mapper means no udev events to wait for.
            parts.append("activation { udev_sync=0 udev_rules=0 monitoring=0 }")
        if not self.backup:
            parts.append("backup { backup=0 archive=0 }")
        elif self.system_dir:
            # LVM puts them under its system directory by default.
            host = sysdir.HOST_DIR
            parts.append(f'backup {{ backup_dir="{host}/backup" archive_dir="{host}/archive" }}')
        if self.read_only:
            parts.append(f"global {{ locking_type={READ_ONLY_LOCKING} metadata_read_only=1 }}")
        return " ".join(parts)

    def argv(self, subcmd: str, *args: str) -> list[str]:
        """The command as a process runs it."""
        scan = self._scan()
        devices: Sequence[str] = self.devices
        if scan is not None:
            devices = scan[1]
            args = self._link_args(scan[1], args)
        cmd = [LVM, subcmd, "--devices", ",".join(devices), "--config", self._config(scan and scan[0])]
        if not self.driverloaded:
            cmd += ["--driverloaded", "n"]
        cmd += args
        return cmd

    def shell_argv(self, subcmd: str, *args: str) -> tuple[list[str], str | None]:
        """The command as the LVM shell runs it, and the system dir of the
        shell process to run it (None: the shell's own, with argv()).

        The settings and the scan directory are in the process's system dir
        (sysdir.variant), one process per set of them: no --config (it makes
        LVM reload its whole configuration every command) and no --devices
        (the scan directory holds only this runner's PVs; LVM 2.03.16 also
        crashes on the third shell command that has --devices but no
        --config). The line is short: libedit reads it one byte at a time.
        """
        scan = self._scan()
        if scan is None:
            return self.argv(subcmd, *args), None
        if self._shell_dir is None:
            # No devices file either: the scan directory is the restriction.
            config = self._config(scan[0]) + " devices { use_devicesfile=0 }"
            self._shell_dir = sysdir.variant(config, self.system_dir)
        cmd = [LVM, subcmd]
        if not self.driverloaded:
            cmd += ["--driverloaded", "n"]
        cmd += self._link_args(scan[1], args)
        return cmd, self._shell_dir

    def _device_numbers(self) -> tuple[int, ...]:
        """The devices' numbers now (0: missing), for the shell (LvmShell.execute)."""
        numbers = []
        for device in self.devices:
            try:
                numbers.append(os.stat(device).st_rdev)
            except OSError:
                numbers.append(0)
        return tuple(numbers)

    def _link_args(self, links: Sequence[str], args: Sequence[str]) -> tuple[str, ...]:
        """args with each of the runner's devices replaced by its link."""
        names = dict(zip(self.devices, links, strict=True))
        return tuple(names.get(a, a) for a in args)

    def _device_names(self, rows: list[dict[str, str]]) -> None:
        """Device paths for the scan directory's links in report rows."""
        if not self.system_dir:
            return
        _, links = sysdir.device_dir(self.devices, self.system_dir)
        names = dict(zip(links, self.devices, strict=True))
        for row in rows:
            name = row.get("pv_name")
            if name:
                row["pv_name"] = names.get(name, name)
            ranges = row.get("seg_pe_ranges")
            if ranges:
                parts = []
                for part in ranges.split():
                    pv, sep, pe = part.rpartition(":")
                    parts.append(f"{names.get(pv, pv)}{sep}{pe}" if sep else part)
                row["seg_pe_ranges"] = " ".join(parts)

    def run(self, subcmd: str, *args: str) -> str:
        """Run ``lvm subcmd args``; return stdout, raise a typed LVMError."""
        return self._execute(subcmd, args)[0]

    def report(self, subcmd: str, *args: str) -> list[dict[str, str]]:
        """Run a report command (vgs, lvs, pvs); return its rows."""
        args = ("--reportformat", "json", "--units", "b", "--nosuffix", *args)
        out, reports = self._execute(subcmd, args)
        if reports is None:
            try:
                reports = json.loads(out)["report"]
            except (ValueError, KeyError, TypeError) as e:
                raise LVMError([subcmd, *args], 0, out[-400:], f"cannot parse LVM report: {e}") from None
        rows: list[dict[str, str]] = []
        try:
            for report in reports:
                for key, value in report.items():
                    if key != "log":
                        rows.extend(value)
        except (AttributeError, TypeError) as e:
            raise LVMError([subcmd, *args], 0, str(reports)[-400:], f"cannot parse LVM report: {e}") from None
        self._device_names(rows)
        return rows

    def _execute(self, subcmd: str, args: Sequence[str]) -> tuple[str, list[Any] | None]:
        """stdout and (through a shell) the report documents of one command."""
        shell = self.shell
        shell_dir = None
        if shell is not None:
            cmd, shell_dir = self.shell_argv(subcmd, *args)
        else:
            cmd = self.argv(subcmd, *args)
        started = time.time()
        start = time.monotonic()
        reports: list[Any] | None = None
        try:
            if shell is not None:
                result = shell.execute(cmd[1:], self.timeout, shell_dir, self._device_numbers())
                if result.rc != 0:
                    raise CommandError(cmd, result.rc, result.out.encode(), result.err.encode())
                out, reports = result.out, result.report
            else:
                env = {**os.environ, "LVM_SYSTEM_DIR": self.system_dir} if self.system_dir else None
                out = run(cmd, timeout=self.timeout, env=env).decode("utf-8", "replace")
        except CommandTimeout as e:
            duration = time.monotonic() - start
            err = e.err.decode("utf-8", "replace")
            self.history.add(cmd, e.rc, duration, err, started)
            log.error(
                "lvm command timed out cmd=%s timeout=%.1f; recent lvm commands:\n%s",
                cmd,
                e.timeout,
                self.history.dump(),
            )
            raise LVMError(cmd, e.rc, err, f"LVM command timed out after {e.timeout:g}s and was killed") from None
        except CommandError as e:
            duration = time.monotonic() - start
            err = e.err.decode("utf-8", "replace")
            self.history.add(cmd, e.rc, duration, err, started)
            raise self._failed(cmd, e.rc, err) from None
        except ShellError as e:
            self.history.add(cmd, e.rc, time.monotonic() - start, e.msg, started)
            log.error("lvm shell failed cmd=%s: %s; recent lvm commands:\n%s", cmd, e.msg, self.history.dump())
            raise ShellError(cmd, e.rc, e.err, e.msg) from None
        duration = time.monotonic() - start
        self.history.add(cmd, 0, duration, "", started)
        log.debug("lvm cmd=%s duration=%.3f shell=%s", subcmd, duration, shell is not None)
        return out, reports

    def _failed(self, cmd: list[str], rc: int, err: str) -> LVMError:
        m = _VG_NOT_FOUND.search(err)
        if m:
            log.info("lvm vg not found vg=%s cmd=%s", m.group(1), cmd[1])
            return VGNotFound(m.group(1), cmd, rc, err)
        m = _LV_NOT_FOUND[0].search(err)
        if m:
            log.info("lvm lv not found vg=%s lv=%s cmd=%s", m.group(1), m.group(2), cmd[1])
            return LVNotFound(m.group(1), m.group(2), cmd, rc, err)
        m = _LV_NOT_FOUND[1].search(err)
        if m:
            log.info("lvm lv not found vg=%s lv=%s cmd=%s", m.group(2), m.group(1), cmd[1])
            return LVNotFound(m.group(2), m.group(1), cmd, rc, err)
        log.error(
            "lvm command failed cmd=%s rc=%d err=%r; recent lvm commands:\n%s",
            cmd,
            rc,
            err.strip()[-400:],
            self.history.dump(),
        )
        return LVMError(cmd, rc, err)
