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

import dataclasses
import io

from xtnd.common import ini
from xtnd.common.ini import ConfigError, option
from xtnd.hsm import links
from xtnd.hsm.sizing import POLICIES, SizingConfig
from xtnd.mailbox.hsm import HSMConfig

__all__ = ["ConfigError", "Config", "load", "show"]


@dataclasses.dataclass
class HostSection:
    host_id: int = option(
        0, "This host's mailbox host id (1..max_hosts of the master domain).", ini.in_range(1, 2000), required=True
    )
    master_domain: str = option(
        "", "UUID of the pool's master domain, which holds the mailbox.", ini.uuid, required=True
    )
    storage_config: str = option("/etc/xtnd/storage.json", "Where this host finds its storage domains (PVs, roots).")
    run_dir: str = option(links.RUN_DIR, "Folder of prepared volume links: drives under it are monitored.")
    workers: int = option(
        4, "Threads running extends (each waits on the SPM, then refreshes and resumes).", ini.in_range(1, 256)
    )
    control_socket: str = option(
        "/run/xtnd/hsm.sock", "Unix socket for `xtnd status` and log levels (root only); empty disables."
    )


@dataclasses.dataclass
class ThinSection:
    chunk_mb: int = option(2560, "Size of one extend in MiB (doubled while a disk is replicated).", ini.at_least(1))
    utilization_percent: int = option(
        20, "Extend when less than (100 - this)% of a chunk is free.", ini.in_range(0, 100)
    )
    policy: str = option(
        "adaptive",
        "fixed: every extend is chunk_mb; adaptive: chunk_mb is the floor, and the chunk and the free space "
        "kept ahead grow to write rate x extend latency (p99) x safety_factor for a fast writer.",
        ini.choice(*POLICIES),
    )
    max_chunk_mb: int = option(
        10240, "Cap of the adaptive chunk in MiB (never below chunk_mb; replication doubles it).", ini.at_least(1)
    )
    safety_factor: float = option(
        2.0, "Adaptive: free space kept ahead = write rate x extend latency x this.", ini.at_least(1)
    )


@dataclasses.dataclass
class MonitorSection:
    stats_interval: float = option(
        2.0, "Seconds between bulk stats passes (one libvirt call for all VMs).", ini.positive
    )
    extend_timeout: float = option(
        120.0, "Seconds to wait for the SPM's reply before counting a failure.", ini.positive
    )


@dataclasses.dataclass
class RetrySection:
    backoff_initial: float = option(1.0, "Seconds before the first retry of a failed extend.", ini.positive)
    backoff_max: float = option(
        60.0, "Retries back off by doubling up to this many seconds, then keep going.", ini.positive
    )


@dataclasses.dataclass
class MailboxSection:
    poll_min: float = option(HSMConfig.poll_min, "Seconds before the first outbox read after a request.", ini.positive)
    poll_growth: float = option(
        HSMConfig.poll_growth, "Poll delay as a fraction of the time waited so far.", ini.non_negative
    )
    poll_max: float = option(HSMConfig.poll_max, "Longest delay between outbox reads while waiting.", ini.positive)
    reoffer_timeout: float = option(
        HSMConfig.reoffer_timeout, "Re-offer a request unanswered this long (seconds).", ini.positive
    )
    clean_timeout: float = option(
        HSMConfig.clean_timeout, "Free a slot whose clean message is not echoed (seconds).", ini.positive
    )
    error_backoff: float = option(
        HSMConfig.error_backoff, "Seconds between retries after a storage error.", ini.positive
    )


@dataclasses.dataclass
class LibvirtSection:
    uri: str = option("qemu:///system", "libvirt connection URI.")
    reconnect_initial: float = option(
        0.1, "Seconds before the first reconnect attempt after libvirtd went away.", ini.positive
    )
    reconnect_max: float = option(5.0, "Reconnect attempts back off up to this many seconds.", ini.positive)
    keepalive_interval: int = option(5, "Seconds between keepalive probes.", ini.at_least(1))
    keepalive_count: int = option(3, "Unanswered probes before the connection counts as dead.", ini.at_least(1))


@dataclasses.dataclass
class LvmSection:
    shell: bool = option(
        True, "Run LVM (refresh reads) through one long-lived lvm shell process (false: one process per command)."
    )


@dataclasses.dataclass
class MetricsSection:
    listen: str = option(
        "127.0.0.1:9711",
        "HOST:PORT serving Prometheus metrics at /metrics (plain HTTP: keep it local); empty disables.",
        ini.listen,
    )


@dataclasses.dataclass
class ApiSection:
    socket: str = option(
        "/run/xtnd/hsm-api.sock",
        "Unix socket of the host API (HTTP/JSON for orchestrators; mode 0600, root only); empty disables.",
    )
    listen: str = option(
        "",
        "HOST:PORT serving the host API over TCP too; every request then needs the token of token_file. "
        "Empty: the unix socket only.",
        ini.listen,
    )
    token_file: str = option("", "File holding the bearer token of [api] listen (required with it; keep it mode 0600).")
    udev: bool = option(
        False,
        "Watch udev: when a block device under one of this host's VMs grows, grow the guest's disk (no API call).",
    )


@dataclasses.dataclass
class Config:
    host: HostSection = dataclasses.field(default_factory=HostSection)
    thin: ThinSection = dataclasses.field(default_factory=ThinSection)
    monitor: MonitorSection = dataclasses.field(default_factory=MonitorSection)
    retry: RetrySection = dataclasses.field(default_factory=RetrySection)
    mailbox: MailboxSection = dataclasses.field(default_factory=MailboxSection)
    libvirt: LibvirtSection = dataclasses.field(default_factory=LibvirtSection)
    lvm: LvmSection = dataclasses.field(default_factory=LvmSection)
    metrics: MetricsSection = dataclasses.field(default_factory=MetricsSection)
    api: ApiSection = dataclasses.field(default_factory=ApiSection)
    # Files read, in order (not an option).
    sources: list[str] = dataclasses.field(default_factory=list, compare=False)

    def sizing(self) -> SizingConfig:
        return SizingConfig(
            chunk_mb=self.thin.chunk_mb,
            utilization_percent=self.thin.utilization_percent,
            policy=self.thin.policy,
            max_chunk_mb=self.thin.max_chunk_mb,
            safety_factor=self.thin.safety_factor,
        )

    def mailbox_config(self) -> HSMConfig:
        return HSMConfig(**dataclasses.asdict(self.mailbox))

    def validate(self) -> None:
        """Raise ConfigError unless a daemon can run with this."""
        file = self.sources[0] if self.sources else ""
        for f in dataclasses.fields(self):
            if f.name != "sources":
                ini.check_section(getattr(self, f.name), file=file, section=f.name)
        if not self.retry.backoff_initial <= self.retry.backoff_max:
            raise ConfigError(
                f"must not exceed backoff_max ({self.retry.backoff_max:g})",
                file=file,
                section="retry",
                key="backoff_initial",
                value=f"{self.retry.backoff_initial:g}",
            )
        if self.api.listen and not self.api.token_file:
            raise ConfigError(
                "a TCP listener needs token_file", file=file, section="api", key="listen", value=self.api.listen
            )
        if self.api.token_file:
            read_token(self.api.token_file, file)


def read_token(path: str, file: str = "") -> str:
    """The bearer token in path (surrounding white space dropped); ConfigError if unusable."""
    try:
        with open(path) as f:
            token = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ConfigError(
            f"cannot read the token: {reason}", file=file, section="api", key="token_file", value=path
        ) from None
    if not token:
        raise ConfigError("the token file is empty", file=file, section="api", key="token_file", value=path)
    return token


def files(path: str) -> list[str]:
    """The file and its drop-ins, in the order they are read."""
    return ini.files(path)


def load(path: str | None) -> Config:
    """Defaults, then the file (which must exist if given), then drop-ins.

    Every option is checked here; ``Config.validate`` adds what needs the
    whole file (required options, relations).
    """
    config = Config()
    if path is None:
        return config
    sections = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name != "sources"}
    for name, parser in ini.read(path):
        for section in parser.sections():
            target = sections.get(section)
            if target is None:
                raise ConfigError("unknown section", file=name, section=section)
            ini.apply(target, dict(parser.items(section)), file=name, section=section)
        config.sources.append(name)
    return config


def show(config: Config) -> str:
    """The effective configuration as INI, each option with its comment."""
    out = io.StringIO()
    for i, sf in enumerate(f for f in dataclasses.fields(config) if f.name != "sources"):
        if i:
            out.write("\n")
        ini.show_section(out, sf.name, getattr(config, sf.name))
    return out.getvalue()
