"""The SPM daemon: hold the SPM lease, serve extend mail, exit when it is lost.

Start-up order (nothing is served before the lease is held):

1. open the master domain (activating ids, leases, inbox, outbox);
2. join its lockspace with our host id (the local sanlock daemon then
   renews our delta lease), after checking the id against the domain's
   max_hosts and [lease] io_timeout against the lockspace's; this host's
   HSM shares the membership (xtnd.storage.lockspace);
3. acquire the SPM lease through a registered sanlock connection, retrying
   every acquire_interval while another host holds it (a standby SPM waits
   here: after the holder dies its lease is free at once if its sanlock
   daemon lives on, or after sanlock's host_dead_seconds if the host died);
4. start the lease watchdog, then the mailbox with the extend handler;
   log "serving started"; enable volume commands on the control socket
   (it exists from the start, answering "not the SPM" until now, so that
   `xtnd volume create` on a standby host never runs LVM itself); tell
   systemd READY=1.

Lease loss (watchdog, or fence() before an LVM command): mailbox writes are
shut off and no new command starts at once; every LVM child still running
is killed, and the process exits with EXIT_LEASE_LOST once they are all
dead (exits.reap_children), from whichever thread saw the loss. Until then
the sanlock registration stays open, so the lease is not handed to another
host while a killed command may still write.

SIGTERM/SIGINT: refuse volume commands, stop taking mail (new requests are
parked unanswered for the next SPM), let running extends and volume
commands finish within shutdown_grace, stop the mailbox, release the
lease, exit 0. The config keeps [lvm] command_timeout below shutdown_grace,
so every LVM command ends (or is killed) within the grace period. If work
is still running after it anyway, its children are killed and the process
exits with EXIT_ABANDONED once they are dead, not before. Any other way out
(a fatal error) also reaps the children before the lease is released.

Operations: metrics at [metrics] listen from the start (lease_held 0 on a
standby); status and log_level on the control socket; with WatchdogSec=
systemd gets WATCHDOG=1 from the main loop, while serving only as long as
the lease checks succeed and the mailbox thread makes progress
(ServingHealth).

"serving started/stopped" lines carry CLOCK_MONOTONIC (shared by all
processes of a machine) and wall time, so tests and operators can prove two
SPMs never served at once.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid as uuidlib
from typing import Any

from xtnd import lvm, storage
from xtnd.common import cmd, history, stopsignals
from xtnd.common.control import set_log_level
from xtnd.common.promhttp import MetricsServer
from xtnd.common.sdnotify import notify as sd_notify
from xtnd.common.watchdog import Watchdog
from xtnd.mailbox import codec
from xtnd.mailbox.directio import DirectFile
from xtnd.mailbox.spm import SPMConfig, SPMMailbox
from xtnd.storage.lockspace import MembershipError, MembershipRefused, membership_for

from . import lease as spm_lease
from .config import Config
from .control import ControlServer, Op
from .domains import DomainRegistry
from .exits import GatedStorage, reap_children
from .extend import ExtendService
from .forecast import Forecast
from .forecast import Settings as ForecastSettings
from .metrics import Metrics
from .ops import VolumeOps

log = logging.getLogger("xtnd.spm.daemon")

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CONFIG = 2  # a refusal that a restart cannot fix (systemd: RestartPreventExitStatus)
EXIT_LEASE_LOST = 3
EXIT_ABANDONED = 4

# After the running extends are done, the most to wait for the mailbox
# thread to write their replies (it is woken by each reply; normally a few
# ms). A reply lost here is not lost for the HSM: the next SPM serves every
# pending request again.
REPLY_FLUSH_TIMEOUT = 5.0
# At start, how long to wait for the managed domains to open before serving
# the ones that did (the others go on opening in the background).
OPEN_ALL_WAIT = 2.0


def _flush_logs() -> None:
    for handler in logging.getLogger().handlers:
        handler.flush()


def _stamp() -> str:
    return f"mono={time.monotonic():.6f} wall={time.time():.6f}"


def _generation(lease: spm_lease.SpmLease, host_id: int) -> int:
    """Our lease generation as sanlock's owners show it (history only)."""
    owners = lease._owners()  # one read, only when recording a history
    return next((o.generation for o in owners if o.host_id == host_id), 0)


def managed_domains(config: Config, hostcfg: storage.HostConfig) -> list[uuidlib.UUID]:
    names = [config.spm.master_domain]
    for name in config.spm.domains.split():
        names.extend(hostcfg.domains if name == "*" else [name])
    names.extend(config.domain)
    return list(dict.fromkeys(uuidlib.UUID(n) for n in names))


class Opener:
    """Opens a domain from its [domain UUID] section, else the host storage config."""

    def __init__(self, config: Config, hostcfg: storage.HostConfig):
        self.config = config
        self.hostcfg = hostcfg
        # One LVM shell for every block domain ([lvm] shell), started at the first command.
        self.shell = lvm.LvmShell("spm-lvm") if config.lvm.shell else None

    def __call__(self, uuid: uuidlib.UUID) -> storage.Domain:
        """The SPM's domain: writable LVM metadata, every command (the
        opening one included) bounded by [lvm] command_timeout."""
        timeout = self.config.lvm.command_timeout
        section = self.config.domain.get(str(uuid))
        if section is not None:
            domain = storage.open_domain(
                uuid,
                pvs=section.pv_list,
                root=section.path or None,
                activation=self.hostcfg.activation,
                writable=True,
                timeout=timeout,
            )
        else:
            domain = self.hostcfg.open(uuid, writable=True, timeout=timeout)
        if isinstance(domain, storage.BlockDomain):
            domain.runner.shell = self.shell
        return domain


def mailbox_config(config: Config) -> SPMConfig:
    m = config.mailbox
    return SPMConfig(
        event_interval=m.event_interval,
        idle_event_interval=m.idle_event_interval,
        active_window=m.active_window,
        scan_interval=m.scan_interval,
        workers=m.workers,
    )


VOLUME_OPS = ("volume_create", "volume_remove", "volume_resize", "volume_info", "volume_list")


class NotSpm(Exception):
    """A volume command reached a daemon that does not hold the lease (yet)."""


def _not_spm(args: dict[str, Any]) -> Any:
    raise NotSpm("this host is not the SPM now (waiting for the lease, or stopping)")


class ServingHealth:
    """For the systemd watchdog while serving: healthy while lease checks
    succeed and the mailbox thread makes progress (reads, scans or errors)."""

    def __init__(self, watchdog: spm_lease.LeaseWatchdog, mailbox_stats: dict[str, int]):
        self.watchdog = watchdog
        self.stats = mailbox_stats
        self._progress = -1

    def __call__(self) -> tuple[bool, str]:
        if self.watchdog.lost is not None:
            return False, f"lease lost: {self.watchdog.lost}"
        age = time.monotonic() - self.watchdog.last_ok
        if age > self.watchdog.stall_timeout:
            return False, f"no successful lease check for {age:.1f}s"
        progress = self.stats["event_reads"] + self.stats["scans"] + self.stats["errors"]
        if progress == self._progress:
            return False, "the mailbox thread made no progress since the last ping"
        self._progress = progress
        return True, ""


class SpmDaemon:
    def __init__(self, config: Config):
        self.config = config
        self.hostcfg = storage.HostConfig.load(config.spm.storage_config or None)
        self.opener = Opener(config, self.hostcfg)
        self.metrics = Metrics()
        self.metrics.lease.host_id = config.spm.host_id
        self.metrics.lease.set(False)
        self._stop = threading.Event()
        self._stop_reason = ""
        # Taken by whichever path gives the lease up (release or exit), and
        # never released: a second one waits here until the first exits.
        self._leaving = threading.Lock()
        self._lost: str | None = None
        self._outbox: GatedStorage | None = None
        self.lease: spm_lease.SpmLease | None = None
        self.mailbox: SPMMailbox | None = None
        self.forecast: Forecast | None = None
        # Control socket ops: volume commands only while serving.
        self.role = "starting"
        self.watchdog = Watchdog(sd_notify)
        self.ops: dict[str, Op] = {
            "ping": lambda args: "pong",
            "stats": lambda args: self.stats(),
            "status": lambda args: self.status(),
            "log_level": set_log_level,
        }
        self.ops.update(dict.fromkeys(VOLUME_OPS, _not_spm))

    # Signals and loss

    def request_stop(self, reason: str) -> None:
        self._stop_reason = reason
        self._stop.set()


    def _on_lost(self, reason: str) -> None:
        """Lease gone: no further reply or LVM command; exit once our
        children are dead (see the module doc), from any thread."""
        if self._lost is None:
            self._lost = reason
        if self._outbox is not None:
            self._outbox.shut("the SPM lease is lost")
        cmd.CHILDREN.close("the SPM lease is lost")
        log.critical("lease lost, exiting reason=%r", reason)
        if not self._leaving.acquire(blocking=False):
            return  # another thread is leaving already
        reap_children("lease lost")
        log.info("serving stopped host_id=%d reason=lease-lost %s", self.config.spm.host_id, _stamp())
        history.record("stopped", host=self.config.spm.host_id, reason="lease-lost")
        _flush_logs()
        os._exit(EXIT_LEASE_LOST)

    def _give_up(self, lease: spm_lease.SpmLease) -> None:
        """Every other way out: children dead first, then release."""
        if self._outbox is not None:
            self._outbox.shut("the SPM is stopping")
        reap_children("the SPM is stopping")
        # A lease-loss exit in progress ends the process while we wait here.
        self._leaving.acquire()
        lease.close()
        self.metrics.lease.set(False)

    # Life cycle

    def run(self) -> int:
        missing = cmd.pdeathsig_missing()
        if missing:
            log.error("refusing to start: %s", missing)
            return EXIT_ERROR
        # Not Event.set() in a signal handler: see common/stopsignals.py.
        signals = stopsignals.install(self.request_stop)
        try:
            return self._run()
        finally:
            signals.close()

    def _run(self) -> int:
        cfg = self.config
        master = self.opener(cfg.master_uuid)
        lockspace = master.lockspace()
        lease_loc = master.spm_lease()
        mbx = master.mailbox()
        try:
            # max_hosts and io_timeout as stored in the master domain.
            membership = membership_for(master, cfg.spm.host_id, io_timeout=cfg.lease.io_timeout)
        except MembershipError as e:
            refused = isinstance(e, MembershipRefused)
            log.error("%s: %s", "refusing to start" if refused else "cannot start", e)
            if self.opener.shell is not None:
                self.opener.shell.close()
            return EXIT_CONFIG if refused else EXIT_ERROR
        self.lease = lease = spm_lease.SpmLease(
            lockspace.name,
            cfg.spm.host_id,
            lockspace.path,
            lease_loc.path,
            offset=lease_loc.offset,
            resource=lease_loc.resource,
            io_timeout=cfg.lease.io_timeout,
        )
        # The socket exists from the start: on a standby host, volume
        # commands get "not the SPM" instead of running LVM locally.
        control = ControlServer(cfg.spm.control_socket, self.ops) if cfg.spm.control_socket else None
        if control:
            control.start()
        metrics = MetricsServer(cfg.metrics.listen, self.metrics.registry, "spm-metrics")
        metrics.start()
        rc = EXIT_ERROR
        try:
            log.info("joining lockspace lockspace=%s host_id=%d", lockspace.name, cfg.spm.host_id)
            sd_notify("STATUS=joining lockspace")
            with self.watchdog.covering("join"):
                # Shared with this host's HSM (xtnd.storage.lockspace).
                membership.join(self._stop)
            if not self._acquire(lease):
                log.info("stopped before acquiring the lease reason=%s", self._stop_reason)
                rc = EXIT_OK
            else:
                rc = self._serve(lease, mbx)
        except MembershipRefused as e:
            log.error("refusing to start: %s", e)
            rc = EXIT_CONFIG
        except MembershipError as e:
            log.error("cannot join the lockspace: %s", e)
            rc = EXIT_ERROR
        finally:
            metrics.stop()
            if control:
                control.stop()
            self._give_up(lease)
            if self.opener.shell is not None:
                self.opener.shell.close()
            # After the lease is released: this host's HSM may keep it.
            membership.leave()
        return EXIT_LEASE_LOST if self._lost is not None else rc

    def _acquire(self, lease: spm_lease.SpmLease) -> bool:
        self.role = "standby"
        sd_notify("STATUS=waiting for the SPM lease")
        attempts = 0
        while not self._stop.is_set():
            attempts += 1
            try:
                lease.acquire()
                self.metrics.lease.set(True)
                return True
            except spm_lease.LeaseBusy as e:
                self.metrics.lease.seen_holder(e.owners[0].host_id if e.owners else 0)
                owners = ",".join(f"{o.host_id}/{o.generation}" for o in e.owners) or "unknown"
                level = logging.INFO if attempts == 1 else logging.DEBUG
                log.log(level, "SPM lease busy, waiting owners=%s attempts=%d", owners, attempts)
            self.watchdog.ping()
            self._stop.wait(self.watchdog.wait_time(self.config.lease.acquire_interval))
        return False

    def _serve(self, lease: spm_lease.SpmLease, mbx: storage.MailboxLocation) -> int:
        cfg = self.config
        watchdog = spm_lease.LeaseWatchdog(
            lease, self._on_lost, cfg.lease.check_interval or None, cfg.lease.stall_timeout or None
        )
        watchdog.start()
        registry = DomainRegistry(
            self.opener,
            managed_domains(cfg, self.hostcfg),
            cfg.lvm.volume_cache_ttl,
            retry_interval=cfg.lvm.open_retry_interval,
        )
        # A domain whose storage hangs holds up neither the start nor the others.
        registry.open_all(wait=min(OPEN_ALL_WAIT, cfg.lvm.command_timeout))
        service = ExtendService(registry, lease.fence, self._on_lost, self.metrics, alloc=cfg.lvm.alloc)
        self.forecast = forecast = self._start_forecast(registry)
        service.on_extended = forecast.extended
        inbox = DirectFile(mbx.inbox)
        self._outbox = outbox = GatedStorage(DirectFile(mbx.outbox))
        self.mailbox = mailbox = SPMMailbox(inbox, outbox, mbx.max_hosts, mailbox_config(cfg))
        mailbox.on_scan = self.metrics.scanned
        self.metrics.watch("mailbox", lambda: mailbox.stats)
        self.metrics.watch("inbox", inbox.counters.snapshot)
        self.metrics.watch("outbox", outbox.counters.snapshot)
        mailbox.register(codec.EXTEND_OPCODE, service.handle)
        lease.fence()
        if history.enabled():
            history.record("serving", host=cfg.spm.host_id, generation=_generation(lease, cfg.spm.host_id))
        log.info("serving started host_id=%d lockspace=%s %s", cfg.spm.host_id, lease.lockspace, _stamp())
        mailbox.start()
        self.role = "serving"
        self.ops.update(VolumeOps(registry, service, self.stats, outbox).table())
        sd_notify(f"READY=1\nSTATUS=serving as SPM host_id={cfg.spm.host_id}\nMAINPID={os.getpid()}")
        self._wait_for_stop(ServingHealth(watchdog, mailbox.stats))
        self.role = "stopping"
        log.info("stopping reason=%s", self._stop_reason)
        sd_notify("STOPPING=1\nSTATUS=stopping")
        for name in VOLUME_OPS:
            self.ops[name] = _not_spm
        mailbox.quiesce()
        # Bounded by shutdown_grace and REPLY_FLUSH_TIMEOUT.
        with self.watchdog.covering("stop"):
            drained = service.drain(cfg.spm.shutdown_grace)
            if drained and not mailbox.flush(REPLY_FLUSH_TIMEOUT):
                log.warning("replies not written within %.1fs; the next SPM serves them", REPLY_FLUSH_TIMEOUT)
        mailbox.stop(timeout=1.0)
        outbox.shut("the SPM stopped")
        if not drained:
            # Still running: kill their commands, and keep the registration
            # (the lease) until those are dead; the workers themselves may
            # run on, but can start no command any more.
            log.error("extends still running after shutdown_grace=%.1fs, killing them", cfg.spm.shutdown_grace)
            self._leaving.acquire()
            reap_children("shutdown_grace passed")
            log.info("serving stopped host_id=%d reason=%s %s", cfg.spm.host_id, self._stop_reason, _stamp())
            history.record("stopped", host=cfg.spm.host_id, reason="abandoned")
            _flush_logs()
            os._exit(EXIT_ABANDONED)
        log.info("serving stopped host_id=%d reason=%s %s", cfg.spm.host_id, self._stop_reason, _stamp())
        history.record("stopped", host=cfg.spm.host_id, reason=self._stop_reason)
        log.info("stats %s mailbox=%s", self.metrics.summary(), mailbox.stats)
        watchdog.stop(timeout=10)
        forecast.stop()
        inbox.close()
        outbox.close()
        return EXIT_OK

    def _start_forecast(self, registry: DomainRegistry) -> Forecast:
        s = self.config.spm
        settings = ForecastSettings(
            interval=s.forecast_interval,
            window=s.forecast_window,
            min_span=s.forecast_min_span,
            full_warning=s.full_warning,
            warning_interval=s.full_warning_interval,
        )
        forecast = Forecast(registry, settings)
        forecast.register(self.metrics.registry)
        forecast.start()
        return forecast

    def _wait_for_stop(self, health: ServingHealth) -> None:
        """The main loop while serving: stats lines and systemd watchdog pings."""
        interval = self.config.spm.stats_interval or None
        next_stats = time.monotonic() + interval if interval else None
        while True:
            left = None if next_stats is None else max(0.0, next_stats - time.monotonic())
            if self._stop.wait(self.watchdog.wait_time(left)):
                return
            self.watchdog.ping(*health())
            if next_stats is not None and time.monotonic() >= next_stats:
                log.info("stats %s", self.metrics.summary())
                next_stats = time.monotonic() + (interval or 0)

    def status(self) -> dict[str, Any]:
        """For `xtnd status`: role, lease holder, requests in flight."""
        lease = self.metrics.lease
        return {
            "role": self.role,
            "host_id": self.config.spm.host_id,
            "master_domain": self.config.spm.master_domain,
            "lease_held": lease.held,
            "lease_holder": lease.holder or None,
            "lease_holder_since": round(lease.holder_since, 3) if lease.holder else None,
            "lease_acquisitions": lease.acquisitions,
            "in_flight": self.metrics.snapshot()["in_flight"],
            "results": self.metrics.snapshot()["results"],
            "domains": self.forecast.snapshot() if self.forecast is not None else [],
        }

    def stats(self) -> dict[str, Any]:
        lease = self.lease
        return {
            "host_id": self.config.spm.host_id,
            "master_domain": self.config.spm.master_domain,
            "lease_held": bool(lease and lease.held),
            "extends": self.metrics.snapshot(),
            "mailbox": dict(self.mailbox.stats) if self.mailbox else {},
        }
