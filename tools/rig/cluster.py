"""A simulated cluster on one machine: shared storage, hosts and their daemons.

    with Cluster(ClusterSpec(hosts=3), workdir) as cluster:
        cluster.start()                      # storage, sanlock, SPMs, HSMs
        link = cluster.hosts[2].volumes[0]   # a prepared thin volume of host 3
        ...
    # everything removed, even when the block raised

Storage: one sparse file on a loop device per block domain (all hosts see
the same devices, as hosts see the same LUNs). Domain 1 is the pool's master
(lockspace, SPM lease, mailbox); the others are plain block domains. They
are made by the real CLI, ``xtnd domain create`` and ``xtnd volume create``
in subprocesses, and recorded in one storage.json that every host uses.
Volumes are made before any SPM runs (no lease held yet), one per host, each
alone in its own domain: without device-mapper an LV is mapped by a loop
device, which can only map a contiguous LV, so a volume may only grow while
it is the last LV of its VG.

Hosts: host i (1-based) has its own sanlock daemon in its own mount
namespace (rig.sanlockd) and a folder under the work directory with its
configs, logs, control sockets and volume links. The first ``spm_hosts``
run ``xtnd spm`` (host 1 serves, the others stand by); every host runs
``xtnd hsm``. Both daemons run in the host's namespace as real processes
(DaemonProcess) with generated configs; their metrics listeners are off.
Every host's HSM uses the machine's libvirtd; a host only watches drives
under its own run folder, so hosts never touch each other's guests.

stop() (also on leaving the with block) removes what start() made, in
reverse order, and keeps going past errors; sweep() removes what a killed
earlier run left under the same base folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator
from typing import Any

from xtnd import lvm, storage
from xtnd.hsm import config as hsm_config
from xtnd.hsm import links
from xtnd.storage import constants as c
from xtnd.storage import sanlockdirect
from xtnd.storage.blockdomain import pv_location
from xtnd.tools.rig import loops
from xtnd.tools.rig.sanlockd import SanlockDaemon
from xtnd.tools.rig.wait import wait_for

log = logging.getLogger("xtnd.rig.cluster")

MiB = 1024**2
GiB = 1024**3

_SERVING = re.compile(r"serving (started|stopped) host_id=(\d+) .*?mono=([\d.]+)")


class ClusterError(Exception):
    """The cluster cannot be set up (the message says what and why)."""


@dataclasses.dataclass
class ClusterSpec:
    hosts: int = 3
    spm_hosts: int = 2
    # One extend adds this much; also the volumes' first allocation.
    chunk_mb: int = 8
    extent_mb: int = 4
    # sanlock io timeout of the lockspace: 1 s makes joining take ~3 s.
    io_timeout: int = 1
    pv_size: int = 2 * GiB
    capacity: int = 1 * GiB
    max_hosts: int = 10
    # host id -> [thin] utilization_percent of that host's HSM (default 20).
    utilization: dict[int, int] = dataclasses.field(default_factory=dict)
    stats_interval: float = 1.0


class DaemonProcess:
    """``xtnd spm|hsm --config FILE`` in a host's mount namespace, logging to a file."""

    def __init__(self, host: SanlockDaemon, command: str, config: str, logfile: str):
        self.command = command
        self.config = config
        self.logfile = logfile
        argv = [sys.executable, "-m", "xtnd.tools.cli", command, "--config", config]
        with open(logfile, "ab") as out:
            self.proc: subprocess.Popen[bytes] = host.popen(argv, env=dict(os.environ), stdout=out, stderr=out)
        self.killed_at: float | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        with open(self.logfile, errors="replace") as f:
            return f.read()

    def wait_log(self, pattern: str, timeout: float = 60.0) -> re.Match[str]:
        regex = re.compile(pattern)

        def found() -> re.Match[str] | None:
            m = regex.search(self.log())
            if m is None and self.proc.poll() is not None:
                raise ClusterError(
                    f"xtnd {self.command} exited rc={self.proc.returncode} before {pattern!r}, see {self.logfile}"
                )
            return m

        return wait_for(found, timeout=timeout, interval=0.05, what=f"{pattern!r} in {self.logfile}")

    def serving(self) -> list[tuple[str, int, float]]:
        """SPM only: (started|stopped, host_id, monotonic time) in log order."""
        return [(m.group(1), int(m.group(2)), float(m.group(3))) for m in _SERVING.finditer(self.log())]

    def kill(self) -> float:
        """SIGKILL; the monotonic time it was gone."""
        self.proc.kill()
        self.proc.wait()
        self.killed_at = time.monotonic()
        return self.killed_at

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL if it does not exit in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("xtnd %s pid=%d ignored SIGTERM for %.0fs, killing", self.command, self.pid, timeout)
                self.proc.kill()
                self.proc.wait()


@dataclasses.dataclass
class Host:
    host_id: int
    dir: str
    sanlock: SanlockDaemon
    hsm_config: str
    spm_config: str | None = None
    spm: DaemonProcess | None = None
    hsm: DaemonProcess | None = None
    # Prepared volume links under run_dir, for this host's guests.
    volumes: list[str] = dataclasses.field(default_factory=list)

    @property
    def run_dir(self) -> str:
        return os.path.join(self.dir, "run")

    @property
    def hsm_socket(self) -> str:
        return os.path.join(self.dir, "hsm.sock")

    @property
    def spm_socket(self) -> str:
        return os.path.join(self.dir, "spm.sock")


@dataclasses.dataclass
class DomainRig:
    uuid: uuidlib.UUID
    master: bool
    pv: str  # loop device
    volumes: list[uuidlib.UUID] = dataclasses.field(default_factory=list)


class Cluster:
    def __init__(self, spec: ClusterSpec, workdir: str, progress: Callable[[str], None] | None = None):
        if spec.hosts < 1 or not 1 <= spec.spm_hosts <= spec.hosts:
            raise ClusterError(f"need 1 <= spm_hosts ({spec.spm_hosts}) <= hosts ({spec.hosts})")
        if spec.hosts > spec.max_hosts:
            raise ClusterError(f"at most {spec.max_hosts} hosts")
        self.spec = spec
        self.workdir = workdir
        self.progress = progress or (lambda msg: log.info("%s", msg))
        self.storage_config = os.path.join(workdir, "storage.json")
        self.domains: list[DomainRig] = []
        self.hosts: list[Host] = []
        self._pv_files: list[str] = []
        self._lease_at: tuple[str, int] | None = None

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def master(self) -> DomainRig:
        return self.domains[0]

    # Set up

    def start(self) -> None:
        """Storage, then per host: sanlock, the SPMs (host 1 serving first), the HSMs."""
        self.make_storage()
        self.start_hosts()

    def _xtnd(self, *args: str) -> str:
        """Run the real CLI; its stdout, or ClusterError with its stderr."""
        # Never talk to an SPM of the machine: volume commands go local.
        env = dict(os.environ, XTND_SPM_SOCKET=os.path.join(self.workdir, "no-spm.sock"))
        cmd = [sys.executable, "-m", "xtnd.tools.cli", *args, "--storage-config", self.storage_config]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        with open(os.path.join(self.workdir, "cli.log"), "a") as f:
            f.write(f"$ xtnd {' '.join(args)}\n{proc.stdout}{proc.stderr}rc={proc.returncode}\n")
        if proc.returncode != 0:
            raise ClusterError(f"xtnd {' '.join(args[:2])} failed: {proc.stderr.strip()}")
        return proc.stdout

    def make_storage(self) -> None:
        """One block domain per host (the first is the master), one thin volume in each."""
        spec = self.spec
        for i in range(spec.hosts):
            path = loops.make_file(os.path.join(self.workdir, f"pv{i + 1}"), spec.pv_size)
            self._pv_files.append(path)
            device = loops.losetup(path)
            sd = DomainRig(uuidlib.uuid4(), master=i == 0, pv=device)
            self.domains.append(sd)
            args = ["domain", "create", "--uuid", str(sd.uuid), "--pv", device]
            args += ["--max-hosts", str(spec.max_hosts), "--extent-size", f"{spec.extent_mb}M"]
            args += ["--io-timeout", str(spec.io_timeout)]
            if sd.master:
                args.append("--master")
            self.progress(f"xtnd domain create {'--master ' if sd.master else ''}{sd.uuid} on {device}")
            self._xtnd(*args)
        for sd in self.domains:
            vol = uuidlib.uuid4()
            self._xtnd(
                "volume", "create", "--domain", str(sd.uuid), "--uuid", str(vol),
                "--capacity", str(spec.capacity), "--initial-size", f"{spec.chunk_mb}M",
                # The storage was made a moment ago by this rig and no sanlock
                # daemon or SPM runs on it yet: nobody else can write the VG.
                "--local",
            )  # fmt: skip
            sd.volumes.append(vol)
        self.progress(f"{len(self.domains)} thin qcow2 volumes of {spec.capacity // GiB} GiB, {spec.chunk_mb} MiB each")

    def _write_spm_config(self, host: Host) -> str:
        spec = self.spec
        sections: dict[str, dict[str, str]] = {
            "spm": {
                "host_id": str(host.host_id),
                "master_domain": str(self.master.uuid),
                # Every domain of the pool (all listed in storage.json).
                "domains": "*",
                "storage_config": self.storage_config,
                "control_socket": host.spm_socket,
                "shutdown_grace": "10",
                "stats_interval": "0",
            },
            "lease": {"io_timeout": str(spec.io_timeout), "acquire_interval": "0.2", "check_interval": "0.2"},
            # Without device-mapper LVs are loop-mapped: keep them one segment.
            "lvm": {"command_timeout": "8", "alloc": "contiguous"},
            # Several daemons on one machine: no metrics port.
            "metrics": {"listen": ""},
        }
        path = os.path.join(host.dir, "spm.conf")
        with open(path, "w") as f:
            for section, options in sections.items():
                f.write(f"[{section}]\n")
                f.writelines(f"{k} = {v}\n" for k, v in options.items())
        return path

    def _write_hsm_config(self, host: Host) -> str:
        c = hsm_config.Config()
        c.host.host_id = host.host_id
        c.host.master_domain = str(self.master.uuid)
        c.host.storage_config = self.storage_config
        c.host.run_dir = host.run_dir
        c.host.control_socket = host.hsm_socket
        c.api.socket = os.path.join(host.dir, "hsm-api.sock")
        c.metrics.listen = ""
        c.thin.chunk_mb = self.spec.chunk_mb
        c.thin.utilization_percent = self.spec.utilization.get(host.host_id, c.thin.utilization_percent)
        c.monitor.stats_interval = self.spec.stats_interval
        c.monitor.extend_timeout = 30.0
        c.retry.backoff_initial = 0.25
        c.retry.backoff_max = 2.0
        path = os.path.join(host.dir, "hsm.conf")
        with open(path, "w") as f:
            f.write(hsm_config.show(c))
        return path

    def start_hosts(self) -> None:
        for i in range(self.spec.hosts):
            host_id = i + 1
            hostdir = os.path.join(self.workdir, f"host{host_id}")
            os.makedirs(os.path.join(hostdir, "run"))
            # QEMU runs as another user and opens the volume links in here.
            for d in (hostdir, os.path.join(hostdir, "run")):
                os.chmod(d, 0o755)
            sanlock = SanlockDaemon(f"host{host_id}", hostdir)
            host = Host(host_id, hostdir, sanlock, hsm_config="")
            self.hosts.append(host)
            sanlock.start()
            host.hsm_config = self._write_hsm_config(host)
            if host_id <= self.spec.spm_hosts:
                host.spm_config = self._write_spm_config(host)
            sd = self.domains[i]
            out = self._xtnd(
                "volume", "prepare", "--domain", str(sd.uuid), "--uuid", str(sd.volumes[0]),
                "--run-dir", host.run_dir, "--json",
            )  # fmt: skip
            host.volumes.append(json.loads(out)["path"])
        self.progress(f"{len(self.hosts)} hosts, each with its own sanlock daemon in its own mount namespace")
        for host in self.hosts[: self.spec.spm_hosts]:
            assert host.spm_config is not None
            host.spm = DaemonProcess(host.sanlock, "spm", host.spm_config, os.path.join(host.dir, "spm.log"))
            if host.host_id == 1:
                host.spm.wait_log(r"serving started", timeout=90)
                self.progress("host 1: xtnd spm serving (SPM lease acquired)")
        for host in self.hosts:
            host.hsm = DaemonProcess(host.sanlock, "hsm", host.hsm_config, os.path.join(host.dir, "hsm.log"))
        for host in self.hosts:
            assert host.hsm is not None

            def ready(h: Host = host) -> bool:
                return os.path.exists(h.hsm_socket) or self._check_alive(h.hsm)

            wait_for(
                ready,
                timeout=60,
                interval=0.05,
                what=f"host {host.host_id} HSM control socket",
            )
        self.progress(f"xtnd hsm running on {len(self.hosts)} hosts, xtnd spm on {self.spec.spm_hosts}")

    @staticmethod
    def _check_alive(proc: DaemonProcess | None) -> bool:
        if proc is not None and not proc.alive():
            raise ClusterError(f"xtnd {proc.command} exited rc={proc.proc.returncode}, see {proc.logfile}")
        return False

    def serving_spm(self) -> Host | None:
        """The host whose SPM logged "serving started" last and still runs."""
        best: tuple[float, Host] | None = None
        for host in self.hosts:
            if host.spm is None or not host.spm.alive():
                continue
            events = host.spm.serving()
            if events and events[-1][0] == "started" and (best is None or events[-1][2] > best[0]):
                best = (events[-1][2], host)
        return best[1] if best else None

    def lease_leader(self) -> sanlockdirect.ResourceLeader:
        """The SPM lease's leader record as stored now (owner host id and generation).

        Reads the PV directly (one ``sanlock direct`` call); where the lease
        lies is looked up in LVM once.
        """
        if self._lease_at is None:
            domain = storage.HostConfig.load(self.storage_config).open(self.master.uuid)
            assert isinstance(domain, storage.BlockDomain)
            info = lvm.vg_info(domain.runner, domain.vg)
            leases = lvm.lv_info(domain.runner, domain.vg, c.LEASES)
            align = sanlockdirect.alignment(512, self.spec.max_hosts)
            self._lease_at = pv_location(leases, info, align, align)
        return sanlockdirect.read_resource_leader(str(self.master.uuid), c.SPM_LEASE, *self._lease_at)

    def processes(self) -> list[tuple[str, int]]:
        """(what, pid) of every process the cluster started: sanlock daemons, SPMs, HSMs."""
        found = []
        for host in self.hosts:
            if host.sanlock.proc is not None:
                found.append((f"host {host.host_id} sanlock daemon", host.sanlock.proc.pid))
            for proc in (host.spm, host.hsm):
                if proc is not None:
                    found.append((f"host {host.host_id} xtnd {proc.command}", proc.pid))
        return found

    # Tear down

    def stop(self) -> list[str]:
        """Remove everything start() made; the problems met (never raises)."""
        problems: list[str] = []

        def step(what: str, fn: Callable[[], object]) -> None:
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - cleanup goes on past any failure
                log.warning("cleanup: %s failed: %s", what, e)
                problems.append(f"{what}: {e}")

        for host in reversed(self.hosts):
            if host.hsm is not None:
                step(f"stop host {host.host_id} HSM", host.hsm.stop)
        for host in reversed(self.hosts):
            if host.spm is not None:
                step(f"stop host {host.host_id} SPM", host.spm.stop)
        for host in reversed(self.hosts):
            step(f"stop host {host.host_id} sanlock", host.sanlock.stop)
        if os.path.exists(self.storage_config):
            config = storage.HostConfig.load(self.storage_config)
            for i, sd in enumerate(self.domains):
                run_dir = self.hosts[i].run_dir if i < len(self.hosts) else None

                def teardown(sd: DomainRig = sd, run_dir: str | None = run_dir) -> None:
                    if sd.uuid.hex not in {uuidlib.UUID(k).hex for k in config.domains}:
                        return
                    domain = config.open(sd.uuid)
                    for vol in sd.volumes:
                        if run_dir:
                            links.remove(sd.uuid, vol, run_dir)
                        with contextlib.suppress(Exception):
                            domain.teardown_volume(vol)
                    domain.deactivate_special()
                    lvm.vgremove(lvm.Runner([sd.pv]), str(sd.uuid))

                step(f"remove domain {sd.uuid}", teardown)
        for sd in self.domains:
            step(f"detach {sd.pv}", functools.partial(_detach_pv, sd.pv))
        self.domains.clear()
        self.hosts.clear()
        return problems


def _detach_pv(device: str) -> None:
    for mapped in loops.loops_over(device):
        loops.detach(mapped)
    subprocess.run(["wipefs", "--all", "--quiet", device], check=False, capture_output=True)
    loops.detach(device)


def sweep(base: str, domain_prefix: str, conn: Any = None) -> list[str]:
    """Remove what earlier runs under base left: libvirt domains named
    domain_prefix*, loop devices over files under base, then base's folders.

    Call it only while holding the lock that keeps other runs out of base.
    """
    found: list[str] = []
    if conn is not None:
        for dom in conn.listAllDomains():
            if dom.name().startswith(domain_prefix):
                with contextlib.suppress(Exception):
                    if dom.isActive():
                        dom.destroy()
                with contextlib.suppress(Exception):
                    dom.undefine()
                found.append(f"libvirt domain {dom.name()}")
    for dev in loops.detach_stale(lambda b: b.startswith(base.rstrip("/") + "/")):
        found.append(f"loop device {dev}")
    if os.path.isdir(base):
        for name in os.listdir(base):
            path = os.path.join(base, name)
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
                found.append(f"folder {path}")
    return found


@contextlib.contextmanager
def cluster(spec: ClusterSpec, workdir: str, progress: Callable[[str], None] | None = None) -> Iterator[Cluster]:
    """A started cluster, removed on exit."""
    with Cluster(spec, workdir, progress) as c:
        c.start()
        yield c
