"""Real storage, an SPM and an HSM configuration for HSM tests and benches.

- Pool: a master block domain (a VG with 4 MiB extents) on its own loop
  PV, recorded in a storage.json under the test's directory, and the
  volume links of the test under that directory too (not /run/xtnd).
- spm_daemon(): the real SPM daemon (`xtnd spm`, rig.spmd) on a
  simulated host with its own sanlock daemon: lease, validation, lvextend.
- spm(): an SPM inside this process (SPMMailbox + Domain.extend_volume,
  the same lvextend) for the benchmark and for tests that need to hold or
  refuse replies at a precise moment (Gate).
- NamespacedLibvirtd: a private libvirtd that can be killed and restarted
  while its QEMU guests keep running (see its docstring).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from uuid import UUID

from xtnd import lvm
from xtnd import storage as xstorage
from xtnd.hsm import config as hsm_config
from xtnd.hsm import links
from xtnd.mailbox import codec
from xtnd.mailbox.directio import DirectFile
from xtnd.mailbox.spm import Request, SPMConfig, SPMMailbox
from xtnd.storage import constants as storage_constants
from xtnd.tools.rig import loops, spmd
from xtnd.tools.rig.sanlockd import SanlockDaemon, die_with_parent
from xtnd.tools.rig.wait import Timeout

MiB = 1024**2
GiB = 1024**3
EXTENT = 4 * MiB
MAX_HOSTS = 10
HOST_ID = 1

log = logging.getLogger("xtnd.rig.hsmrig")


@dataclasses.dataclass
class Pool:
    workdir: str
    pvs: list[str]
    domain: xstorage.BlockDomain
    storage_config: str
    run_dir: str

    @property
    def uuid(self) -> uuid.UUID:
        return self.domain.uuid

    def open(self, sd: UUID, writable: bool = False) -> xstorage.Domain:
        """Any domain of the pool's storage config (the master or one added)."""
        return xstorage.HostConfig.load(self.storage_config).open(sd, writable=writable)

    def thin_volume(self, capacity: int = 1 * GiB, initial: int = 16 * MiB) -> str:
        """A qcow2 volume of the master domain, prepared and linked; its link."""
        return self.volume(capacity, initial)

    def volume(
        self, capacity: int = 1 * GiB, initial: int = 16 * MiB, fmt: str = "qcow2", sd: UUID | None = None
    ) -> str:
        """A volume of the master domain, or of domain sd, prepared and
        linked as `xtnd volume prepare` does; its link. A raw volume has
        its whole capacity at once (initial is for qcow2)."""
        vol = uuid.uuid4()
        domain: xstorage.Domain = self.domain if sd is None or sd == self.uuid else self.open(sd, writable=True)
        domain.create_volume(vol, capacity, fmt, initial_size=initial)
        device = domain.prepare_volume(vol)
        return links.create(domain.uuid, vol, device, self.run_dir)

    def volume_size(self, link: str) -> int:
        parsed = links.parse(link, self.run_dir)
        assert parsed is not None
        return self.domain.volume_info(parsed[1]).size

    def config(
        self, chunk_mb: int, utilization_percent: int = 20, policy: str = "fixed", **monitor: float
    ) -> hsm_config.Config:
        """An HSM config on this pool. The sizing policy defaults to fixed
        here (the product's default is adaptive): most tests count extends
        of a known chunk; adaptive sizing is tested by name."""
        c = hsm_config.Config()
        c.host.host_id = HOST_ID
        c.host.master_domain = str(self.uuid)
        c.host.storage_config = self.storage_config
        c.host.run_dir = self.run_dir
        # Tests run several daemons at once: no fixed ports or sockets.
        c.host.control_socket = os.path.join(self.workdir, "hsm.sock")
        c.api.socket = os.path.join(self.workdir, "hsm-api.sock")
        c.metrics.listen = ""
        c.thin.chunk_mb = chunk_mb
        c.thin.utilization_percent = utilization_percent
        c.thin.policy = policy
        c.monitor.stats_interval = monitor.get("stats_interval", 1.0)
        c.monitor.extend_timeout = monitor.get("extend_timeout", 30.0)
        c.retry.backoff_initial = monitor.get("backoff_initial", 0.25)
        c.retry.backoff_max = monitor.get("backoff_max", 1.0)
        return c

    def write_config(self, config: hsm_config.Config, path: str) -> str:
        with open(path, "w") as f:
            f.write(hsm_config.show(config))
        return path

    def grow_pv(self, index: int, size: int) -> None:
        """The LUN grew: grow the PV's backing file and device, then pvresize."""
        device = self.pvs[index]
        backing = open(f"/sys/block/{os.path.basename(device)}/loop/backing_file").read().strip()
        with open(backing, "r+b") as f:
            f.truncate(size)
        subprocess.run(["losetup", "--set-capacity", device], check=True)
        self.domain.runner.run("pvresize", device)

    def add_pv(self, size: int) -> str:
        """A new LUN added to the VG with vgextend."""
        path = loops.make_file(os.path.join(self.workdir, f"pv{len(self.pvs)}"), size)
        device = loops.losetup(path)
        self.pvs.append(device)
        runner = self.domain.runner.with_devices(self.pvs)
        lvm.pvcreate(runner, device)
        lvm.vgextend(runner, self.domain.vg, device)
        self.domain.runner = runner
        # The host config lists a domain's PVs: HSM and SPM re-read it.
        host = xstorage.HostConfig.load(self.storage_config)
        host.add_block(self.uuid, self.pvs)
        host.save()
        return device


@contextlib.contextmanager
def block_domain(
    pvs: list[str], run_dir: str, master: bool = False, metadata_size: int = 0
) -> Iterator[xstorage.BlockDomain]:
    """A block domain with the rig's settings on pvs; its volumes, their
    links under run_dir, its VG and loop devices over its PVs removed after."""
    sd = uuid.uuid4()
    # Short sanlock io timeout: joining takes ~3 s instead of ~20 s.
    domain = xstorage.create_block_domain(
        sd,
        pvs,
        master=master,
        max_hosts=MAX_HOSTS,
        extent_size=EXTENT,
        activation="loop",
        io_timeout=spmd.IO_TIMEOUT,
        metadata_size=metadata_size or storage_constants.METADATA_SIZE,
    )
    try:
        yield domain
    finally:
        for vol in domain.list_volumes():
            links.remove(sd, vol.uuid, run_dir)
            with contextlib.suppress(Exception):
                domain.teardown_volume(vol.uuid)
        domain.deactivate_special()
        # The domain's devices, which include PVs added later (Pool.add_pv).
        devices = list(domain.runner.devices)
        with contextlib.suppress(Exception):
            lvm.vgremove(lvm.Runner(devices), str(sd))
        for pv in devices:
            for mapped in loops.loops_over(pv):
                loops.detach(mapped)


@contextlib.contextmanager
def pool(workdir: str, pv_size: int = 512 * MiB, metadata_size: int = 0) -> Iterator[Pool]:
    """A master block domain on one loop PV; everything removed after.

    metadata_size (bytes, 0 for the production default) sizes the PV's LVM
    metadata areas: tests that fill a small PV ask for small ones.
    """
    run_dir = os.path.join(workdir, "run")
    with loops.loop_pvs(workdir, count=1, size=pv_size) as pvs:
        all_pvs = list(pvs)  # Pool.add_pv appends to it
        try:
            with block_domain(pvs, run_dir, master=True, metadata_size=metadata_size) as domain:
                host = xstorage.HostConfig(os.path.join(workdir, "storage.json"), activation="loop")
                host.add_block(domain.uuid, pvs)
                host.save()
                yield Pool(workdir, all_pvs, domain, host.path, run_dir)
        finally:
            for extra in all_pvs[1:]:
                loops.detach(extra)


@contextlib.contextmanager
def spm_daemon(p: Pool, host: SanlockDaemon, **extra: str) -> Iterator[spmd.SpmProcess]:
    """`xtnd spm --config FILE` serving the pool, on host (its sanlock daemon);
    extra: config options ("section.option" -> value)."""
    config = spmd.Pool.spm_config(p, HOST_ID, **extra)  # type: ignore[arg-type]  # same attributes
    n = len([f for f in os.listdir(p.workdir) if f.startswith("spm.")])
    proc = spmd.SpmProcess(host, config, os.path.join(p.workdir, f"spm.{n}.log"))
    try:
        proc.wait_serving()
        yield proc
    finally:
        if proc.proc.poll() is None:
            proc.terminate(30)


class Gate:
    """Controls the test SPM: hold replies, or refuse requests."""

    def __init__(self, delay: float = 0.0) -> None:
        self.open = threading.Event()
        self.open.set()
        self.refuse = False
        # Seconds added to every extend: the latency of a busy SPM or slow
        # storage, so a benchmark can show what a writer does against it.
        self.delay = delay
        self.requests: list[codec.Extend] = []
        self.held = threading.Event()


@contextlib.contextmanager
def spm(p: Pool, gate: Gate | None = None) -> Iterator[Gate]:
    """An SPM serving the pool's mailbox with real lvextend."""
    gate = gate or Gate()
    location = p.domain.mailbox()
    inbox, outbox = DirectFile(location.inbox), DirectFile(location.outbox)
    domains: dict[uuid.UUID, xstorage.Domain] = {}
    loaded = [0.0]

    def extend(req: Request) -> int:
        msg = req.message
        gate.requests.append(msg)
        if not gate.open.is_set():
            gate.held.set()
            gate.open.wait(60)
        if gate.refuse:
            raise RuntimeError("refused by the test")
        if gate.delay > 0:
            threading.Event().wait(gate.delay)
        mtime = os.stat(p.storage_config).st_mtime
        if mtime != loaded[0]:
            domains.clear()  # a PV was added: open with the new list
            loaded[0] = mtime
        if msg.domain not in domains:
            domains[msg.domain] = p.open(msg.domain, writable=True)
        return domains[msg.domain].extend_volume(msg.volume, msg.size_mb * MiB) // MiB

    mailbox = SPMMailbox(inbox, outbox, location.max_hosts, SPMConfig(workers=2))
    mailbox.register(codec.EXTEND_OPCODE, extend)
    mailbox.start()
    try:
        yield gate
    finally:
        gate.open.set()
        mailbox.stop()
        inbox.close()
        outbox.close()


class NamespacedLibvirtd:
    """A private libvirtd that can be killed and restarted under running guests.

    Killing the machine's libvirtd would break everyone else's connections
    and tests, so this one is private (like testlib.libvirtd) but its mount
    namespace outlives it: a holder process keeps the namespace with tmpfs
    over libvirt's folders, and each libvirtd start joins it (nsenter). A
    restarted libvirtd so finds the status files and monitor sockets of the
    QEMU processes the killed one started, and reconnects to them, as on a
    real host. QEMU's stdio goes to files (qemu.conf stdio_handler) since
    the machine's virtlogd socket is hidden by the tmpfs.
    """

    DIRS = ("/run/libvirt", "/var/lib/libvirt", "/var/cache/libvirt", "/etc/libvirt")

    def __init__(self, workdir: str):
        self.dir = os.path.join(workdir, "nslibvirtd")
        self.sock_dir = os.path.join(self.dir, "sock")
        os.makedirs(self.sock_dir)
        self.conf = os.path.join(self.dir, "libvirtd.conf")
        self.pidfile = os.path.join(self.dir, "libvirtd.pid")
        with open(self.conf, "w") as f:
            f.write(f'unix_sock_dir = "{self.sock_dir}"\n')
        ready = os.path.join(self.dir, "ns-ready")
        mounts = "; ".join(f"mount -t tmpfs xtnd-test {d} || exit 1" for d in self.DIRS)
        self.holder = subprocess.Popen(
            [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                f"{mounts}; echo 'stdio_handler = \"file\"' >/etc/libvirt/qemu.conf; touch {ready}; exec sleep 86400",
            ],
            preexec_fn=die_with_parent,
        )
        deadline = time.monotonic() + 10
        while not os.path.exists(ready):
            if self.holder.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("cannot set up the libvirtd mount namespace")
            time.sleep(0.02)
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def socket(self) -> str:
        return os.path.join(self.sock_dir, "libvirt-sock")

    def uri(self) -> str:
        return f"qemu:///system?socket={self.socket}"

    def start(self, timeout: float = 30.0) -> None:
        self.starts += 1
        with open(os.path.join(self.dir, f"libvirtd.{self.starts}.log"), "wb") as out:
            self.proc = subprocess.Popen(
                ["nsenter", "-t", str(self.holder.pid), "-m", "libvirtd", "-f", self.conf, "-p", self.pidfile],
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,
            )
        import socket as socketlib

        deadline = time.monotonic() + timeout
        while True:
            with socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM) as s:
                try:
                    s.connect(self.socket)
                    return
                except OSError:
                    pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"libvirtd exited rc={self.proc.returncode}, see {self.dir}")
            if time.monotonic() > deadline:
                raise Timeout(f"libvirtd did not listen on {self.socket}")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)
        self.proc = None

    def close(self) -> None:
        self.kill()
        self.holder.kill()
        self.holder.wait(10)


def volume_of(pool: Pool, link: str) -> uuid.UUID:
    """The volume UUID behind a volume link of pool."""
    parsed = links.parse(link, pool.run_dir)
    assert parsed is not None, link
    return parsed[1]
