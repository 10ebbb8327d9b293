"""Configuration of the SPM daemon: /etc/xtnd/spm.conf (INI).

Typed sections with defaults (xtnd.common.ini); every option is documented
and validated where it is declared. The effective configuration is the
defaults, then the main file, then every ``*.conf`` of the drop-in
directory in name order (``FILE.d/``, e.g. /etc/xtnd/spm.conf.d/). Later
files win per option. ``xtnd spm --config FILE --show-config`` prints the
result; ``--check-config`` only validates it.

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

import dataclasses
import io
import uuid as uuidlib

from xtnd.common import ini
from xtnd.common.ini import ConfigError, option
from xtnd.mailbox.spm import SPMConfig

__all__ = ["ConfigError", "Config", "load", "show"]

DEFAULT_PATH = "/etc/xtnd/spm.conf"
DOMAIN_PREFIX = "domain "


@dataclasses.dataclass
class SpmSection:
    host_id: int = option(
        0,
        "This host's id in the master domain's lockspace (1..2000, at most max_hosts).",
        ini.in_range(1, 2000),
        required=True,
    )
    master_domain: str = option(
        "", "UUID of the pool's master domain (holds the mailbox and the SPM lease).", ini.uuid, required=True
    )
    domains: str = option(
        "",
        "Other managed domains: UUIDs separated by spaces (looked up in the host storage config), or *.",
        ini.uuids_or_star,
    )
    storage_config: str = option(
        "", "Host storage config (domain -> PVs or directory); empty: $XTND_STORAGE_CONFIG or /etc/xtnd/storage.json."
    )
    control_socket: str = option("/run/xtnd/spm.sock", "Unix socket for volume commands (root only); empty disables.")
    shutdown_grace: float = option(
        30.0,
        "On SIGTERM, seconds extends in flight may take before the lease is released (< TimeoutStopSec).",
        ini.positive,
    )
    stats_interval: float = option(300.0, "Seconds between stats log lines; 0 disables.", ini.non_negative)
    full_warning: float = option(
        3600.0,
        "Warn when a domain's forecast time to full drops below this many seconds; 0 disables.",
        ini.non_negative,
    )
    full_warning_interval: float = option(
        600.0, "The most often the full warning is logged per domain (seconds).", ini.positive
    )
    forecast_interval: float = option(
        10.0, "Seconds between reads of each domain's free space (VG free, file system free).", ini.positive
    )
    forecast_window: float = option(
        900.0, "Seconds of free-space history the consumption rate is fitted over.", ini.positive
    )
    forecast_min_span: float = option(
        60.0, "No forecast before the history spans this many seconds (one extend makes none).", ini.non_negative
    )


@dataclasses.dataclass
class LeaseSection:
    io_timeout: int = option(
        10,
        "sanlock io timeout of the lockspace (seconds); must match what it was formatted with.",
        ini.in_range(1, 300),
    )
    check_interval: float = option(0.0, "Seconds between lease checks; 0: min(1, io_timeout/2).", ini.non_negative)
    acquire_interval: float = option(5.0, "While another host holds the lease, seconds between attempts.", ini.positive)
    stall_timeout: float = option(
        0.0, "A lease check running this long counts as a lost lease; 0: 2 x io_timeout.", ini.non_negative
    )


@dataclasses.dataclass
class MailboxSection:
    event_interval: float = option(
        SPMConfig.event_interval, "Event block poll interval while mail is flowing (seconds).", ini.positive
    )
    idle_event_interval: float = option(
        SPMConfig.idle_event_interval, "Event block poll interval when idle (seconds).", ini.positive
    )
    active_window: float = option(
        SPMConfig.active_window, "Seconds after the last mail during which polling stays fast.", ini.non_negative
    )
    scan_interval: float = option(
        SPMConfig.scan_interval, "Full inbox scan even without a new event (seconds).", ini.positive
    )
    workers: int = option(
        SPMConfig.workers,
        "Threads running extends (one volume is extended by one thread at a time).",
        ini.in_range(1, 256),
    )


@dataclasses.dataclass
class LvmSection:
    command_timeout: float = option(
        20.0, "Seconds an LVM command may run before it is killed (below [spm] shutdown_grace).", ini.positive
    )
    alloc: str = option(
        "",
        "lvextend --alloc policy; empty: LVM's default. contiguous keeps LVs single-segment (loop activation).",
        ini.choice("", "contiguous", "cling", "cling_by_tags", "normal", "anywhere", "inherit"),
    )
    volume_cache_ttl: float = option(
        60.0, "Seconds before a domain's in-memory volume list is read from LVM again.", ini.non_negative
    )
    shell: bool = option(
        True, "Run LVM through one long-lived lvm shell process (false: one process per command)."
    )
    open_retry_interval: float = option(
        10.0,
        "Seconds before a domain that could not be opened (PV missing or hung) is tried again; "
        "its requests fail meanwhile, the other domains are served.",
        ini.positive,
    )


@dataclasses.dataclass
class MetricsSection:
    listen: str = option(
        "127.0.0.1:9710",
        "HOST:PORT serving Prometheus metrics at /metrics (plain HTTP: keep it local); empty disables.",
        ini.listen,
    )


@dataclasses.dataclass
class DomainSection:
    """[domain UUID]: where to find one domain (pvs or path, not both)."""

    uuid: str
    pvs: str = option("", "The domain's PVs, separated by spaces.")
    path: str = option("", "Root directory of a file domain.")

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
    sources: list[str] = dataclasses.field(default_factory=list, compare=False)

    @property
    def master_uuid(self) -> uuidlib.UUID:
        return uuidlib.UUID(self.spm.master_domain)

    def validate(self) -> None:
        """What no single option can check: required options, relations."""
        file = self.sources[0] if self.sources else ""
        for name in _SECTIONS:
            ini.check_section(getattr(self, name), file=file, section=name)
        if not self.lvm.command_timeout < self.spm.shutdown_grace:
            # A shutdown must never leave an LVM command running past the lease.
            raise ConfigError(
                f"must be below [spm] shutdown_grace ({self.spm.shutdown_grace:g})",
                file=file,
                section="lvm",
                key="command_timeout",
                value=f"{self.lvm.command_timeout:g}",
            )
        if self.spm.forecast_min_span > self.spm.forecast_window:
            raise ConfigError(
                f"must not be above [spm] forecast_window ({self.spm.forecast_window:g})",
                file=file,
                section="spm",
                key="forecast_min_span",
                value=f"{self.spm.forecast_min_span:g}",
            )
        for section in self.domain.values():
            if bool(section.pvs) == bool(section.path):
                raise ConfigError("needs exactly one of pvs, path", file=file, section=DOMAIN_PREFIX + section.uuid)


_SECTIONS = ("spm", "lease", "mailbox", "lvm", "metrics")


def drop_in_dir(path: str) -> str:
    return path + ".d"


def load(path: str = DEFAULT_PATH) -> Config:
    """Defaults, then path (must exist), then path.d/*.conf in name order."""
    config = Config()
    for name, parser in ini.read(path):
        for section in parser.sections():
            items = dict(parser.items(section))
            if section in _SECTIONS:
                ini.apply(getattr(config, section), items, file=name, section=section)
            elif section.startswith(DOMAIN_PREFIX):
                raw = section[len(DOMAIN_PREFIX) :].strip()
                try:
                    key = str(uuidlib.UUID(raw))
                except ValueError:
                    raise ConfigError("section name: not a UUID", file=name, section=section) from None
                dom = config.domain.setdefault(key, DomainSection(key))
                ini.apply(dom, items, file=name, section=section, skip=("uuid",))
            else:
                raise ConfigError("unknown section", file=name, section=section)
        config.sources.append(name)
    config.validate()
    return config


def show(config: Config) -> str:
    """The effective configuration as an INI file (with where it came from)."""
    out = io.StringIO()
    out.write("".join(f"# from {name}\n" for name in config.sources))
    for i, section in enumerate(_SECTIONS):
        if i:
            out.write("\n")
        ini.show_section(out, section, getattr(config, section))
    for key, dom in sorted(config.domain.items()):
        out.write(f"\n[{DOMAIN_PREFIX}{key}]\npvs = {dom.pvs}\npath = {dom.path}\n")
    return out.getvalue()
