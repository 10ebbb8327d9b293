"""Configuration of the SPM daemon: /etc/xtnd/spm.conf (INI).

Typed sections with defaults; every option is documented where it is
declared. The effective configuration is the defaults, then the main file,
then every ``*.conf`` of the drop-in directory in name order (``FILE.d/``
next to the main file, e.g. /etc/xtnd/spm.conf.d/). Later files win per
option. ``xtnd spm --config FILE --show-config`` prints the result.

Managed domains: the master domain always, plus ``[spm] domains`` (UUIDs
looked up in the host storage config, or ``*`` for all of them), plus one
``[domain UUID]`` section per domain with its own ``pvs`` or ``path``
(wins over the host storage config).

Example:

    [spm]
    host_id = 1
    master_domain = 8adbc85e-e554-4ae0-b318-8a5465fe5fe1
    domains = *

    [lease]
    io_timeout = 10

    [domain 8adbc85e-e554-4ae0-b318-8a5465fe5fe1]
    pvs = /dev/mapper/36001405a
"""

from __future__ import annotations

import configparser
import dataclasses
import glob
import io
import os
import uuid as uuidlib
from typing import Any

from xtnd.common import promhttp

DEFAULT_PATH = "/etc/xtnd/spm.conf"
DOMAIN_PREFIX = "domain "


class ConfigError(ValueError):
    """The configuration cannot be used as written."""


@dataclasses.dataclass
class SpmSection:
    # This host's id in the master domain's lockspace: its mailbox host id
    # (1..max_hosts of the master domain).
    host_id: int = 0
    # UUID of the pool's master domain (holds the mailbox and the SPM lease).
    master_domain: str = ""
    # Other managed domains: UUIDs separated by spaces, looked up in the host
    # storage config, or "*" for every domain listed there.
    domains: str = ""
    # Host storage config (domain UUID -> PVs or directory); empty: the
    # default ($XTND_STORAGE_CONFIG or /etc/xtnd/storage.json).
    storage_config: str = ""
    # Unix socket for volume commands (root only); empty disables it.
    control_socket: str = "/run/xtnd/spm.sock"
    # On SIGTERM, seconds to let extends in flight finish before the lease is
    # released; keep systemd's TimeoutStopSec above this.
    shutdown_grace: float = 30.0
    # Seconds between "stats" log lines (latency, counters); 0 disables.
    stats_interval: float = 300.0


@dataclasses.dataclass
class LeaseSection:
    # sanlock io timeout for the lockspace (seconds). Must match what the
    # lockspace was formatted with, or joining waits for the longer one.
    io_timeout: int = 10
    # Seconds between lease checks by the watchdog; 0: min(1, io_timeout/2).
    check_interval: float = 0.0
    # While another host holds the lease, seconds between acquire attempts.
    acquire_interval: float = 5.0
    # A lease check (a request to the local sanlock daemon) still running
    # after this many seconds counts as a lost lease; 0: 2 x io_timeout.
    stall_timeout: float = 0.0


@dataclasses.dataclass
class MailboxSection:
    # Event block poll interval while mail is flowing (seconds).
    event_interval: float = 0.002
    # Event block poll interval when idle (seconds): idle I/O and CPU bound.
    idle_event_interval: float = 0.025
    # Seconds after the last mail during which polling stays fast.
    active_window: float = 3.0
    # Full inbox scan even without a new event (seconds; vdsm HSMs of old
    # versions write no event).
    scan_interval: float = 2.0
    # Threads running extends: extends of different volumes run in parallel
    # up to this many; one volume is always extended by one thread at a time.
    workers: int = 8


@dataclasses.dataclass
class LvmSection:
    # Seconds an LVM command may run before it is killed. Keep it below
    # shutdown_grace so a shutdown never abandons a running lvextend.
    command_timeout: float = 20.0
    # lvextend allocation policy ("" = LVM's default; "contiguous" keeps LVs
    # single-segment, needed where LVs are mapped with loop devices).
    alloc: str = ""
    # The SPM is the only writer of LVM metadata, so it keeps the volume
    # list (size, capacity, tags) in memory instead of running lvs before
    # every lvextend; seconds before a domain's list is read again anyway.
    volume_cache_ttl: float = 60.0


@dataclasses.dataclass
class MetricsSection:
    # HOST:PORT serving Prometheus metrics at /metrics (plain HTTP, no
    # authentication: keep it on localhost or a management network); empty
    # disables. The HSM's default port is 9711, so both run on one host.
    listen: str = "127.0.0.1:9710"


@dataclasses.dataclass
class DomainSection:
    """[domain UUID]: where to find one domain (pvs or path, not both)."""

    uuid: str
    # The domain's PVs, separated by spaces.
    pvs: str = ""
    # Root directory of a file domain.
    path: str = ""

    @property
    def pv_list(self) -> list[str]:
        return self.pvs.split()


@dataclasses.dataclass
class Config:
    spm: SpmSection = dataclasses.field(default_factory=SpmSection)
    lease: LeaseSection = dataclasses.field(default_factory=LeaseSection)
    mailbox: MailboxSection = dataclasses.field(default_factory=MailboxSection)
    lvm: LvmSection = dataclasses.field(default_factory=LvmSection)
    metrics: MetricsSection = dataclasses.field(default_factory=MetricsSection)
    domain: dict[str, DomainSection] = dataclasses.field(default_factory=dict)
    # Files read, in order (not an option).
    sources: list[str] = dataclasses.field(default_factory=list)

    @property
    def master_uuid(self) -> uuidlib.UUID:
        return uuidlib.UUID(self.spm.master_domain)

    def validate(self) -> None:
        if not self.spm.master_domain:
            raise ConfigError("[spm] master_domain is required")
        try:
            uuidlib.UUID(self.spm.master_domain)
            for name in self.spm.domains.split():
                if name != "*":
                    uuidlib.UUID(name)
        except ValueError as e:
            raise ConfigError(f"[spm] bad domain UUID: {e}") from None
        if self.spm.host_id < 1:
            raise ConfigError("[spm] host_id must be >= 1")
        if self.lease.io_timeout < 1:
            raise ConfigError("[lease] io_timeout must be >= 1")
        if self.lease.stall_timeout < 0:
            raise ConfigError("[lease] stall_timeout must be >= 0")
        if self.mailbox.workers < 1:
            raise ConfigError("[mailbox] workers must be >= 1")
        if self.spm.shutdown_grace <= 0:
            raise ConfigError("[spm] shutdown_grace must be > 0")
        if not 0 < self.lvm.command_timeout < self.spm.shutdown_grace:
            # A shutdown must never leave an LVM command running past the lease.
            raise ConfigError("[lvm] command_timeout must be > 0 and below [spm] shutdown_grace")
        try:
            promhttp.parse_listen(self.metrics.listen)
        except promhttp.ListenError as e:
            raise ConfigError(f"[metrics] listen: {e}") from None
        for section in self.domain.values():
            if bool(section.pvs) == bool(section.path):
                raise ConfigError(f"[domain {section.uuid}] needs exactly one of pvs, path")


_SECTIONS = ("spm", "lease", "mailbox", "lvm", "metrics")


def _convert(section: str, name: str, value: str, kind: Any) -> Any:
    try:
        if kind in (int, "int"):
            return int(value)
        if kind in (float, "float"):
            return float(value)
    except ValueError:
        raise ConfigError(f"[{section}] {name}: not a number: {value!r}") from None
    return value


def _apply(obj: Any, section: str, items: dict[str, str]) -> None:
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for name, value in items.items():
        if name not in fields or name == "uuid":
            raise ConfigError(f"[{section}] unknown option {name!r}")
        setattr(obj, name, _convert(section, name, value, fields[name].type))


def drop_in_dir(path: str) -> str:
    return path + ".d"


def load(path: str = DEFAULT_PATH) -> Config:
    """Defaults, then path (must exist), then path.d/*.conf in name order."""
    if not os.path.exists(path):
        raise ConfigError(f"no such config file: {path}")
    files = [path, *sorted(glob.glob(os.path.join(drop_in_dir(path), "*.conf")))]
    config = Config()
    for name in files:
        parser = configparser.ConfigParser(interpolation=None)
        try:
            with open(name) as f:
                parser.read_file(f, name)
        except configparser.Error as e:
            raise ConfigError(f"{name}: {e}") from None
        for section in parser.sections():
            items = dict(parser.items(section))
            if section in _SECTIONS:
                _apply(getattr(config, section), section, items)
            elif section.startswith(DOMAIN_PREFIX):
                raw = section[len(DOMAIN_PREFIX) :].strip()
                try:
                    key = str(uuidlib.UUID(raw))
                except ValueError:
                    raise ConfigError(f"{name}: [{section}]: not a UUID") from None
                dom = config.domain.setdefault(key, DomainSection(key))
                _apply(dom, section, items)
            else:
                raise ConfigError(f"{name}: unknown section [{section}]")
        config.sources.append(name)
    config.validate()
    return config


def show(config: Config) -> str:
    """The effective configuration as an INI file (with where it came from)."""
    parser = configparser.ConfigParser(interpolation=None)
    for section in _SECTIONS:
        parser[section] = {k: str(v) for k, v in dataclasses.asdict(getattr(config, section)).items()}
    for key, dom in sorted(config.domain.items()):
        parser[DOMAIN_PREFIX + key] = {"pvs": dom.pvs, "path": dom.path}
    out = io.StringIO()
    out.write("".join(f"# from {name}\n" for name in config.sources))
    parser.write(out)
    return out.getvalue()
