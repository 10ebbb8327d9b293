"""The HSM daemon's configuration: typed sections with defaults, drop-ins.

    xtnd hsm --config /etc/xtnd/hsm.conf [--show-config]

The file is INI. Every option has a default and a comment here (the
dataclass field's ``doc``); ``--show-config`` prints the effective values
with those comments. Drop-ins in ``<config>.d/*.conf`` (e.g.
/etc/xtnd/hsm.conf.d/50-local.conf) are read after the file, in name
order; later files win per option. Unknown sections or options are
errors: a misspelled option silently ignored is worse than a refusal.
"""

from __future__ import annotations

import configparser
import dataclasses
import glob
import io
import os
from typing import Any

from xtnd.common import promhttp
from xtnd.hsm import links
from xtnd.hsm.sizing import SizingConfig
from xtnd.mailbox.hsm import HSMConfig


class ConfigError(Exception):
    """The configuration cannot be used; the message says where and why."""


def _opt(default: Any, doc: str) -> Any:
    return dataclasses.field(default=default, metadata={"doc": doc})


@dataclasses.dataclass
class HostSection:
    host_id: int = _opt(0, "This host's mailbox host id (1..max_hosts of the master domain). Required.")
    master_domain: str = _opt("", "UUID of the pool's master domain, which holds the mailbox. Required.")
    storage_config: str = _opt("/etc/xtnd/storage.json", "Where this host finds its storage domains (PVs, roots).")
    run_dir: str = _opt(links.RUN_DIR, "Folder of prepared volume links: drives under it are monitored.")
    workers: int = _opt(4, "Threads running extends (each waits on the SPM, then refreshes and resumes).")
    control_socket: str = _opt(
        "/run/xtnd/hsm.sock", "Unix socket for `xtnd status` and log levels (root only); empty disables."
    )


@dataclasses.dataclass
class ThinSection:
    chunk_mb: int = _opt(2560, "Size of one extend in MiB (doubled while a disk is replicated).")
    utilization_percent: int = _opt(20, "Extend when less than (100 - this)% of a chunk is free.")


@dataclasses.dataclass
class MonitorSection:
    stats_interval: float = _opt(2.0, "Seconds between bulk stats passes (one libvirt call for all VMs).")
    extend_timeout: float = _opt(120.0, "Seconds to wait for the SPM's reply before counting a failure.")


@dataclasses.dataclass
class RetrySection:
    backoff_initial: float = _opt(1.0, "Seconds before the first retry of a failed extend.")
    backoff_max: float = _opt(60.0, "Retries back off by doubling up to this many seconds, then keep going.")


@dataclasses.dataclass
class MailboxSection:
    poll_min: float = _opt(HSMConfig.poll_min, "Seconds before the first outbox read after a request.")
    poll_growth: float = _opt(HSMConfig.poll_growth, "Poll delay as a fraction of the time waited so far.")
    poll_max: float = _opt(HSMConfig.poll_max, "Longest delay between outbox reads while waiting.")
    reoffer_timeout: float = _opt(HSMConfig.reoffer_timeout, "Re-offer a request unanswered this long (seconds).")
    clean_timeout: float = _opt(HSMConfig.clean_timeout, "Free a slot whose clean message is not echoed (seconds).")
    error_backoff: float = _opt(HSMConfig.error_backoff, "Seconds between retries after a storage error.")


@dataclasses.dataclass
class LibvirtSection:
    uri: str = _opt("qemu:///system", "libvirt connection URI.")
    reconnect_initial: float = _opt(0.1, "Seconds before the first reconnect attempt after libvirtd went away.")
    reconnect_max: float = _opt(5.0, "Reconnect attempts back off up to this many seconds.")
    keepalive_interval: int = _opt(5, "Seconds between keepalive probes.")
    keepalive_count: int = _opt(3, "Unanswered probes before the connection counts as dead.")


@dataclasses.dataclass
class MetricsSection:
    listen: str = _opt(
        "127.0.0.1:9711",
        "HOST:PORT serving Prometheus metrics at /metrics (plain HTTP: keep it local); empty disables.",
    )


@dataclasses.dataclass
class Config:
    host: HostSection = dataclasses.field(default_factory=HostSection)
    thin: ThinSection = dataclasses.field(default_factory=ThinSection)
    monitor: MonitorSection = dataclasses.field(default_factory=MonitorSection)
    retry: RetrySection = dataclasses.field(default_factory=RetrySection)
    mailbox: MailboxSection = dataclasses.field(default_factory=MailboxSection)
    libvirt: LibvirtSection = dataclasses.field(default_factory=LibvirtSection)
    metrics: MetricsSection = dataclasses.field(default_factory=MetricsSection)

    def sizing(self) -> SizingConfig:
        return SizingConfig(chunk_mb=self.thin.chunk_mb, utilization_percent=self.thin.utilization_percent)

    def mailbox_config(self) -> HSMConfig:
        return HSMConfig(**dataclasses.asdict(self.mailbox))

    def validate(self) -> None:
        """Raise ConfigError unless a daemon can run with this."""
        if self.host.host_id < 1:
            raise ConfigError("[host] host_id is required (1..max_hosts)")
        if not self.host.master_domain:
            raise ConfigError("[host] master_domain is required")
        if self.host.workers < 1:
            raise ConfigError("[host] workers must be at least 1")
        try:
            self.sizing()
        except ValueError as e:
            raise ConfigError(f"[thin] {e}") from None
        if not 0 < self.retry.backoff_initial <= self.retry.backoff_max:
            raise ConfigError("[retry] need 0 < backoff_initial <= backoff_max")
        if self.monitor.stats_interval <= 0:
            raise ConfigError("[monitor] stats_interval must be positive")
        try:
            promhttp.parse_listen(self.metrics.listen)
        except promhttp.ListenError as e:
            raise ConfigError(f"[metrics] listen: {e}") from None


def _convert(section: str, name: str, kind: Any, text: str) -> Any:
    try:
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
        if kind == "bool":
            return configparser.ConfigParser.BOOLEAN_STATES[text.lower()]
        return text
    except (ValueError, KeyError):
        raise ConfigError(f"[{section}] {name}: not a {kind}: {text!r}") from None


def files(path: str) -> list[str]:
    """The file and its drop-ins, in the order they are read."""
    return [path, *sorted(glob.glob(os.path.join(path + ".d", "*.conf")))]


def load(path: str | None) -> Config:
    """Defaults, then the file (which must exist if given), then drop-ins."""
    config = Config()
    if path is None:
        return config
    if not os.path.exists(path):
        raise ConfigError(f"no such config file: {path}")
    sections = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    for name in files(path):
        parser = configparser.ConfigParser(interpolation=None)
        try:
            with open(name) as f:
                parser.read_file(f, name)
        except (OSError, configparser.Error) as e:
            raise ConfigError(f"cannot read {name}: {e}") from None
        for section in parser.sections():
            target = sections.get(section)
            if target is None:
                raise ConfigError(f"{name}: unknown section [{section}]")
            fields = {f.name: f for f in dataclasses.fields(target)}
            for option, text in parser.items(section):
                field = fields.get(option)
                if field is None:
                    raise ConfigError(f"{name}: unknown option {option} in [{section}]")
                setattr(target, option, _convert(section, option, field.type, text))
    return config


def show(config: Config) -> str:
    """The effective configuration as INI, each option with its comment."""
    out = io.StringIO()
    for i, sf in enumerate(dataclasses.fields(config)):
        section = getattr(config, sf.name)
        if i:
            out.write("\n")
        out.write(f"[{sf.name}]\n")
        for f in dataclasses.fields(section):
            out.write(f"# {f.metadata['doc']}\n{f.name} = {getattr(section, f.name)}\n")
    return out.getvalue()
