"""The HSM daemon: the monitor, the mailbox and the libvirt connection, wired.

    xtnd hsm --config /etc/xtnd/hsm.conf

Start order: this host's id in the master domain's sanlock lockspace
(xtnd.storage.lockspace: checked against the domain's max_hosts, joined
with the io_timeout stored on disk, shared with the host's SPM, refused if
another live host holds it), then the master domain's mailbox (clears this
host's inbox block, so requests of a previous run are forgotten; the
monitor asks again for whatever is still short), the monitor's workers and
stats thread, then the libvirt connection, whose connected() makes the
monitor read every running VM. Stop: the monitor takes no new work, the
mailbox stops (pending requests fail at once, so no worker waits for the
SPM; the host block is cleared), the workers finish, then the connection
and the event loop end, and the host id is left (unless the SPM or another
user of this host still needs it).

If sanlock stops keeping the host id, the mailbox halts at once without
writing the block again (another host may own it soon) and the daemon
exits with EXIT_HOST_ID_LOST; systemd starts it again, and it joins anew.

SIGTERM and SIGINT stop the daemon; systemd is told READY=1 once libvirt
is connected (or after a short wait: a host whose libvirtd is down still
has an HSM that keeps trying) and STOPPING=1 on stop. run() also serves
the metrics ([metrics] listen), the control socket ([host]
control_socket: status, log_level) and the host API ([api]: xtnd.hsm.api), and pings systemd's watchdog from its
main loop while the monitor and mailbox threads run.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid as uuidlib
from collections.abc import Callable
from typing import Any

import libvirt
from xtnd import lvm
from xtnd.common import sdnotify, stopsignals
from xtnd.common.cmd import CommandError
from xtnd.common.promhttp import MetricsServer
from xtnd.common.watchdog import Watchdog
from xtnd.hsm import api, control
from xtnd.hsm.config import Config, ConfigError, read_token
from xtnd.hsm.growdisk import DiskGrower
from xtnd.hsm.libvirtconn import Connection, EventLoop
from xtnd.hsm.metrics import ExtendRecord, HsmMetrics, Sources
from xtnd.hsm.monitor import Monitor, MonitorConfig
from xtnd.hsm.replicate import Replicator
from xtnd.hsm.resize import ResizeWatcher
from xtnd.hsm.udevwatch import UdevWatcher
from xtnd.hsm.volumes import StorageVolumes
from xtnd.lvm.errors import ActivationError, LVMError
from xtnd.mailbox.directio import DirectFile
from xtnd.mailbox.hsm import HSMMailbox
from xtnd.storage import StorageError, lockspace

log = logging.getLogger("xtnd.hsm")

# Seconds without a round of the stats loop after which it counts as stuck
# (at least; 10 x stats_interval when that is longer).
STUCK_AFTER = 120.0

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CONFIG = 2  # a refusal that a restart cannot fix (systemd: RestartPreventExitStatus)
EXIT_HOST_ID_LOST = 3


class HSM:
    def __init__(
        self,
        config: Config,
        event_loop: EventLoop | None = None,
        on_extend: Callable[[ExtendRecord], None] | None = None,
        hold_host_id: bool = True,
        on_host_id_lost: Callable[[lockspace.MembershipLost], None] | None = None,
    ):
        """hold_host_id=False: run without joining the lockspace (tests and
        the bench, whose SPM is no sanlock user); a daemon always holds it."""
        config.validate()
        self.config = config
        self.metrics = HsmMetrics(config.host.host_id)
        self._on_extend = on_extend
        self._own_loop = event_loop is None
        self.event_loop = event_loop or EventLoop()
        shell = lvm.LvmShell("hsm-lvm") if config.lvm.shell else None
        self.volumes = StorageVolumes(config.host.storage_config, config.host.run_dir, shell)
        master = self.volumes.domain(uuidlib.UUID(config.host.master_domain))
        # Raises MembershipRefused (max_hosts) before anything else is set up.
        self.membership = (
            lockspace.membership_for(master, config.host.host_id, exclusive="hsm") if hold_host_id else None
        )
        self._on_host_id_lost = on_host_id_lost
        self.host_id_watch: lockspace.MembershipWatch | None = None
        location = master.mailbox()
        self._inbox = DirectFile(location.inbox)
        self._outbox = DirectFile(location.outbox)
        self.mailbox = HSMMailbox(self._inbox, self._outbox, config.host.host_id, config.mailbox_config())
        lv = config.libvirt
        self.connection = Connection(
            self,  # forwards to the monitor, which exists only after the connection
            uri=lv.uri,
            backoff_initial=lv.reconnect_initial,
            backoff_max=lv.reconnect_max,
            keepalive_interval=lv.keepalive_interval,
            keepalive_count=lv.keepalive_count,
        )
        self.monitor = Monitor(
            self.connection,
            self.mailbox,
            self.volumes,
            MonitorConfig(
                sizing=config.sizing(),
                run_dir=config.host.run_dir,
                workers=config.host.workers,
                stats_interval=config.monitor.stats_interval,
                extend_timeout=config.monitor.extend_timeout,
                backoff_initial=config.retry.backoff_initial,
                backoff_max=config.retry.backoff_max,
            ),
            on_extend=self._extended,
        )
        # Grows guests' disks after their storage grew (the host API, udev).
        self.grower = DiskGrower(self.connection, self.volumes, self.monitor, config.host.run_dir)
        self.replicator = Replicator(
            self.connection,
            self.mailbox,
            self.volumes,
            self.monitor,
            config.sizing(),
            extend_timeout=config.monitor.extend_timeout,
        )
        self.monitor.before_extend = self.replicator.before_source_extend
        # Its own reader of the outbox: a DirectFile's buffer is not shared across threads.
        self._notices = DirectFile(location.outbox, readonly=True)
        self.resizes = ResizeWatcher(
            self._notices,
            self.volumes,
            self.monitor,
            self.grower,
            config.monitor.stats_interval,
        )
        monitor = self.monitor
        self.metrics.sources = Sources(
            counters=lambda: dict(monitor.counters),
            drive_states=lambda: [d.state.value for vm in monitor.snapshot().values() for d in vm.values()],
            in_flight=lambda: self.mailbox.in_flight,
            drive_sizing=monitor.drive_sizing,
            extend_latency=monitor.extend_latency,
            io={
                "mailbox": lambda: dict(self.mailbox.stats),
                "inbox": self._inbox.counters.snapshot,
                "outbox": self._outbox.counters.snapshot,
            },
        )

    def _extended(self, record: ExtendRecord) -> None:
        self.metrics.record(record)
        if self._on_extend is not None:
            self._on_extend(record)

    # Listener: the connection calls these; the monitor does the work.

    def connected(self, conn: Any) -> None:
        # Copies running since before this start first: the monitor's
        # first extend of their source then goes destination first.
        try:
            self.replicator.adopt(conn, self.config.host.run_dir)
        except libvirt.libvirtError as e:
            log.warning("cannot look for copies in progress: %s", e)
        self.monitor.connected(conn)

    def disconnected(self) -> None:
        self.monitor.disconnected()

    def lifecycle(self, dom: Any, event: int, detail: int) -> None:
        self.monitor.lifecycle(dom, event, detail)

    def block_threshold(self, dom: Any, dev: str, path: str, threshold: int, excess: int) -> None:
        if self.replicator.block_threshold(dom, dev):
            return  # a copy destination's: not the source drive's
        self.monitor.block_threshold(dom, dev, path, threshold, excess)

    def io_error(self, dom: Any, src_path: str, dev_alias: str, action: int, reason: str) -> None:
        self.monitor.io_error(dom, src_path, dev_alias, action, reason)

    def block_job(self, dom: Any, disk: str, job_type: int, status: int) -> None:
        self.replicator.block_job(dom, disk, job_type, status)

    # Life cycle

    def start(self, cancel: threading.Event | None = None) -> None:
        """Raises lockspace.MembershipError if the host id cannot be held."""
        if self.membership is not None:
            self.membership.join(cancel)
            self.host_id_watch = lockspace.MembershipWatch(self.membership, self._host_id_lost, name="hsm-host-id")
            self.host_id_watch.start()
        if self._own_loop:
            self.event_loop.start()
        self.mailbox.start()
        self.monitor.start()
        self.replicator.start()
        self.connection.start()
        self.resizes.start()
        log.info(
            "hsm started host_id=%d master=%s chunk_mb=%d utilization_percent=%d",
            self.config.host.host_id, self.config.host.master_domain,
            self.config.thin.chunk_mb, self.config.thin.utilization_percent,
        )  # fmt: skip

    def _host_id_lost(self, error: lockspace.MembershipLost) -> None:
        self.mailbox.halt()
        if self._on_host_id_lost is not None:
            self._on_host_id_lost(error)

    def health(self) -> tuple[bool, str]:
        """For the systemd watchdog: do the threads doing the work still run,
        and has the stats loop gone round lately? A pass waits at most
        stats_interval between rounds; a libvirt call in it is bounded by
        libvirt's keepalive and job timeouts (tens of seconds)."""
        watch = self.host_id_watch
        if watch is not None and watch.lost is None and not watch.alive:
            return False, "the host id watch thread is gone"
        if not self.monitor.alive:
            return False, "the monitor's stats thread is gone"
        if not self.mailbox.alive:
            return False, "the mailbox thread is gone"
        if not self.resizes.alive:
            return False, "the resize watcher thread is gone"
        age = self.monitor.clock() - self.monitor.heartbeat
        limit = max(STUCK_AFTER, 10 * self.config.monitor.stats_interval)
        if age > limit:
            return False, f"the stats loop has not gone round for {age:.0f}s"
        return True, ""

    @property
    def mailbox_files(self) -> tuple[DirectFile, DirectFile]:
        """Inbox and outbox (their I/O counters, for benchmarks)."""
        return self._inbox, self._outbox

    def stop(self) -> None:
        log.info("hsm stopping")
        # Jobs end before the connection they use closes: no new ones, then
        # the mailbox fails pending requests at once, then the workers finish.
        self.resizes.stop()
        self.monitor.stop_scheduling()
        self.replicator.stop()
        self.mailbox.stop()
        self.monitor.join()
        self.connection.stop()
        if self._own_loop:
            self.event_loop.stop()
        self._inbox.close()
        self._outbox.close()
        self._notices.close()
        if self.volumes.shell is not None:
            self.volumes.shell.close()
        if self.host_id_watch is not None:
            self.host_id_watch.stop()
        if self.membership is not None:
            self.membership.leave()
        log.info("hsm stopped")


def start_api(config: Config, hsm: HSM) -> api.ApiServer | None:
    """The host API of [api], listening; None when it has no socket nor listener."""
    section = config.api
    if not (section.socket or section.listen):
        return None
    token = read_token(section.token_file) if section.listen else ""
    server = api.ApiServer(hsm.grower, section.socket, section.listen, token)
    server.start()
    return server


def services_health(hsm: HSM, host_api: api.ApiServer | None, udev: UdevWatcher | None) -> tuple[bool, str]:
    """hsm.health(), and the host API's and udev watcher's threads still run."""
    if host_api is not None and not host_api.alive:
        return False, "the host api thread is gone"
    if udev is not None and not udev.alive:
        return False, "the udev watcher thread is gone"
    return hsm.health()


def run(config: Config, ready_timeout: float = 10.0) -> int:
    """Run until SIGTERM or SIGINT; the exit code."""
    stop = threading.Event()
    lost: list[lockspace.MembershipLost] = []

    def on_signal(name: str) -> None:
        log.info("signal %s received", name)
        stop.set()

    def on_lost(error: lockspace.MembershipLost) -> None:
        lost.append(error)
        stop.set()

    # Not Event.set() in a signal handler: see common/stopsignals.py.
    signals = stopsignals.install(on_signal)
    try:
        return _run(config, ready_timeout, stop, lost, on_lost)
    finally:
        signals.close()


def _run(config: Config, ready_timeout: float, stop: threading.Event, lost: list[lockspace.MembershipLost],
         on_lost: Callable[[lockspace.MembershipLost], None]) -> int:
    watchdog = Watchdog(sdnotify.notify)
    try:
        hsm = HSM(config, on_host_id_lost=on_lost)
        with watchdog.covering("join"):
            hsm.start(cancel=stop)  # nothing else runs if the join fails
    except lockspace.MembershipRefused as e:
        log.error("refusing to start: %s", e)
        return EXIT_CONFIG
    except (StorageError, LVMError, ActivationError, CommandError) as e:
        log.error("cannot start: %s", e)
        return EXIT_ERROR
    metrics = MetricsServer(config.metrics.listen, hsm.metrics.registry, "xtnd-hsm-metrics")
    sock = config.host.control_socket
    server = control.ControlServer(sock, control.ops(hsm), name="xtnd-hsm-control") if sock else None
    metrics.start()
    if server is not None:
        server.start()
    host_api: api.ApiServer | None = None
    udev: UdevWatcher | None = None
    try:
        host_api = start_api(config, hsm)
        if config.api.udev:
            udev = UdevWatcher(hsm.grower)
            udev.start()
    except (api.ApiStartError, ConfigError, OSError) as e:
        log.error("cannot start: %s", e)
        _stop_services(host_api, server, metrics, hsm)
        return EXIT_ERROR
    try:
        with watchdog.covering("start"):
            # Short waits: a stop (signal, lost host id) must not wait for libvirt.
            deadline = time.monotonic() + ready_timeout
            connected = False
            while not (connected or stop.is_set()) and time.monotonic() < deadline:
                connected = hsm.connection.wait_connected(min(0.2, ready_timeout))
        if not connected and not stop.is_set():
            log.warning("not connected to libvirt after %.0f s; still trying", ready_timeout)
        sdnotify.notify("READY=1")
        # Event.wait with no timeout would block signal handlers until it
        # returns; a timeout lets the main thread run them.
        while not stop.wait(watchdog.wait_time(1.0)):
            watchdog.ping(*services_health(hsm, host_api, udev))
    finally:
        sdnotify.notify("STOPPING=1")
        with watchdog.covering("stop"):  # bounded: jobs end once the mailbox stops
            if udev is not None:
                udev.stop()
            _stop_services(host_api, server, metrics, hsm)
    if lost:
        log.error("exiting: %s", lost[0])
        return EXIT_HOST_ID_LOST
    return EXIT_OK


def _stop_services(
    host_api: api.ApiServer | None, server: control.ControlServer | None, metrics: MetricsServer, hsm: HSM
) -> None:
    """Stop what _run started, last started first (the HSM itself last)."""
    if host_api is not None:
        host_api.stop()
    if server is not None:
        server.stop()
    metrics.stop()
    hsm.stop()
