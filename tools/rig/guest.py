"""A tiny real QEMU guest that writes to its disk (tests, demo, benches).

The guest is Debian's cloud kernel plus a busybox initramfs whose /init
(guest_init.sh, shipped in this package) writes a known pattern to /dev/vda
with O_DIRECT, reads it back, prints markers on the serial console and
powers off. Kernel, modules and busybox come from Debian packages
tools/run.sh installs (linux-image-cloud-amd64, busybox-static): nothing is
downloaded at run time.

KVM exists on the test machines but a Linux guest hangs early under it, so
domains are type 'qemu' (TCG); the guest boots in a few seconds.

The kernel and initramfs are built once and cached under RIG_DIR, in a
folder named by a hash of their inputs (kernel package, busybox binary,
init script, module list), so a change to any of them rebuilds.

API: build_rig() -> Rig; Workload (what the guest writes); Guest.define() /
guest() (a libvirt domain, removed on exit); start_libvirt(); qcow2_create();
LoopDisk (a growable loop device standing in for a thin LV).
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import gzip
import hashlib
import os
import shutil
import stat
import subprocess
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass

import libvirt
from xtnd.hsm.disks import disk_element
from xtnd.tools.rig.sanlockd import RIG_DIR
from xtnd.tools.rig.wait import Timeout

KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX = "/bin/busybox"
INIT_SCRIPT = os.path.join(os.path.dirname(__file__), "guest_init.sh")
# insmod order matters: each needs the ones before it.
MODULES = ("virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci", "virtio_blk")
DOMAIN_PREFIX = "xtnd-test-"
# Bump to force a rebuild when the build itself changes.
RIG_FORMAT = 2


class RigUnavailable(Exception):
    """The guest rig cannot be built here (no QEMU, no kernel package)."""


class GuestFailed(AssertionError):
    """The guest reported a failure or stopped before the expected marker."""


# The rig


@dataclass(frozen=True)
class Rig:
    kernel: str
    initrd: str
    key: str


def _run(cmd: list[str], cwd: str | None = None) -> str:
    return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True).stdout


def _kernel_package() -> tuple[str, str]:
    """The installed kernel image package of the cloud meta package, and its version."""
    try:
        depends = _run(["dpkg-query", "-W", "-f=${Depends}", KERNEL_META_PACKAGE])
    except (OSError, subprocess.CalledProcessError) as e:
        raise RigUnavailable(f"{KERNEL_META_PACKAGE} is not installed (bash tools/run.sh setup installs it)") from e
    for dep in depends.split(","):
        package = dep.strip().split(" ")[0]
        if package.startswith("linux-image-"):
            break
    else:
        raise RigUnavailable(f"{KERNEL_META_PACKAGE} has no linux-image dependency: {depends!r}")
    try:
        status = _run(["dpkg-query", "-W", "-f=${Status} ${Version}", package])
    except (OSError, subprocess.CalledProcessError) as e:
        raise RigUnavailable(f"{package} is not installed (bash tools/run.sh setup installs it)") from e
    if not status.startswith("install ok installed "):
        raise RigUnavailable(f"{package} is not installed: {status}")
    return package, status.rsplit(" ", 1)[1]


def _file_hash(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _cpio_gz(root: str, dest: str) -> None:
    """Pack root as a gzip'ed newc cpio archive, as the kernel unpacks."""
    names = sorted(os.path.relpath(os.path.join(d, n), root) for d, dirs, files in os.walk(root) for n in dirs + files)
    data = subprocess.run(
        ["cpio", "--create", "--format=newc", "--owner=0:0", "--quiet"],
        cwd=root,
        input="\n".join(names).encode() + b"\n",
        check=True,
        capture_output=True,
    ).stdout
    with gzip.open(dest, "wb", compresslevel=6) as f:
        f.write(data)


def _build(package: str, dest: str) -> None:
    """Build vmlinuz and initrd.img into dest from the installed kernel package."""
    release = package[len("linux-image-") :]
    kernel = f"/boot/vmlinuz-{release}"
    modules_dir = f"/lib/modules/{release}/kernel"
    if not os.path.exists(kernel) or not os.path.isdir(modules_dir):
        raise RigUnavailable(f"{package} is installed but {kernel} or {modules_dir} is missing")
    work = dest + ".tmp"
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    shutil.copy(kernel, os.path.join(work, "vmlinuz"))

    root = os.path.join(work, "root")
    for d in ("bin", "lib/modules", "proc", "sys", "dev", "tmp"):
        os.makedirs(os.path.join(root, d))
    shutil.copy(BUSYBOX, os.path.join(root, "bin", "busybox"))
    shutil.copy(INIT_SCRIPT, os.path.join(root, "init"))
    os.chmod(os.path.join(root, "init"), 0o755)
    for name in MODULES:
        found = glob.glob(os.path.join(modules_dir, "**", name + ".ko"), recursive=True)
        if len(found) != 1:
            raise RigUnavailable(f"module {name}.ko not found once in {package}: {found}")
        shutil.copy(found[0], os.path.join(root, "lib", "modules", name + ".ko"))
    with open(os.path.join(root, "modules.order"), "w") as f:
        f.write("\n".join(MODULES) + "\n")
    _cpio_gz(root, os.path.join(work, "initrd.img"))

    shutil.rmtree(root)
    for name in ("vmlinuz", "initrd.img"):
        os.chmod(os.path.join(work, name), 0o644)
    os.chmod(work, 0o755)
    os.rename(work, dest)


def build_rig(cache_dir: str = RIG_DIR) -> Rig:
    """Return the guest kernel and initramfs, building them if needed."""
    if shutil.which("qemu-system-x86_64") is None:
        raise RigUnavailable("qemu-system-x86_64 is not installed")
    if not os.path.exists(BUSYBOX):
        raise RigUnavailable(f"{BUSYBOX} is missing (package busybox-static)")
    os.makedirs(cache_dir, mode=0o755, exist_ok=True)
    os.chmod(cache_dir, 0o755)
    package, version = _kernel_package()
    h = hashlib.sha256()
    for part in (str(RIG_FORMAT), package, version, _file_hash(BUSYBOX), _file_hash(INIT_SCRIPT), " ".join(MODULES)):
        h.update(part.encode() + b"\0")
    key = h.hexdigest()[:16]
    dest = os.path.join(cache_dir, key)
    # Other test processes may build at the same time: one builds, the
    # others wait for it and reuse the result.
    with open(os.path.join(cache_dir, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.isdir(dest):
            _build(package, dest)
    return Rig(kernel=os.path.join(dest, "vmlinuz"), initrd=os.path.join(dest, "initrd.img"), key=key)


# Domains


@dataclass(frozen=True)
class Workload:
    """What the guest writes; see guest_init.sh."""

    write_mb: int = 64
    chunk_mb: int = 1
    rate: int = 0  # MiB/s, 0: as fast as it can
    offset_mb: int = 0
    verify: bool = True
    hold: bool = False  # stay up when done (XTND-HOLD) until the test stops it
    seconds: int = 0  # stop writing after this long, even before write_mb (0: no limit)
    watch_size: bool = False  # while holding, print XTND-SIZE sectors=N when /sys/block/vda/size changes

    def cmdline(self) -> str:
        return (
            f"xtnd.write_mb={self.write_mb} xtnd.chunk_mb={self.chunk_mb} xtnd.rate={self.rate} "
            f"xtnd.offset_mb={self.offset_mb} xtnd.verify={int(self.verify)} xtnd.hold={int(self.hold)}"
            f" xtnd.seconds={self.seconds} xtnd.watch_size={int(self.watch_size)}"
        )


def domain_xml(
    name: str,
    rig: Rig,
    disk_path: str,
    workload: Workload,
    console_path: str,
    memory_mib: int = 96,
    disk_format: str = "qcow2",
) -> str:
    """A one-vCPU TCG domain booting the rig with one virtio disk, vda.

    The disk stops the VM on errors (error_policy='stop'), which is what
    makes ENOSPC on a thin volume a pause rather than a guest I/O error.
    """
    dom = ET.Element("domain", type="qemu")
    ET.SubElement(dom, "name").text = name
    ET.SubElement(dom, "memory", unit="MiB").text = str(memory_mib)
    ET.SubElement(dom, "vcpu").text = "1"
    os_ = ET.SubElement(dom, "os")
    ET.SubElement(os_, "type", arch="x86_64", machine="pc").text = "hvm"
    ET.SubElement(os_, "kernel").text = rig.kernel
    ET.SubElement(os_, "initrd").text = rig.initrd
    # panic=-1 and on_reboot=destroy: a crashing guest ends instead of looping.
    # no_timer_check: on a loaded host TCG runs so slowly that the kernel's
    # IO-APIC timer check fails and it panics at boot ("IO-APIC + timer
    # doesn't work").
    cmdline = f"console=ttyS0 panic=-1 loglevel=4 no_timer_check {workload.cmdline()}"
    ET.SubElement(os_, "cmdline").text = cmdline
    features = ET.SubElement(dom, "features")
    ET.SubElement(features, "acpi")
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        ET.SubElement(dom, event).text = "destroy"
    devices = ET.SubElement(dom, "devices")
    is_block = stat.S_ISBLK(os.stat(disk_path).st_mode)
    disk = ET.SubElement(devices, "disk", type="block" if is_block else "file", device="disk")
    ET.SubElement(disk, "driver", name="qemu", type=disk_format, cache="none", io="native", error_policy="stop")
    ET.SubElement(disk, "source", {"dev" if is_block else "file": disk_path})
    ET.SubElement(disk, "target", dev="vda", bus="virtio")
    serial = ET.SubElement(devices, "serial", type="file")
    ET.SubElement(serial, "source", path=console_path)
    ET.SubElement(serial, "target", port="0")
    ET.SubElement(devices, "controller", type="usb", model="none")
    ET.SubElement(devices, "memballoon", model="none")
    return ET.tostring(dom, encoding="unicode")


def qcow2_create(path: str, virtual_size: int) -> None:
    """Format path (a file or a block device) as an empty qcow2 image."""
    _run(["qemu-img", "create", "-q", "-f", "qcow2", path, str(virtual_size)])


class Guest:
    """A defined test domain and its serial console log."""

    def __init__(self, conn: libvirt.virConnect, name: str, xml: str, console_path: str):
        self.conn = conn
        self.name = name
        self.console_path = console_path
        self.dom = conn.defineXML(xml)

    @classmethod
    def define(
        cls,
        conn: libvirt.virConnect,
        rig: Rig,
        disk_path: str,
        workload: Workload,
        workdir: str,
        memory_mib: int = 96,
        prefix: str = DOMAIN_PREFIX,
    ) -> Guest:
        """A new domain named prefix + a random suffix; its console log goes to workdir."""
        name = prefix + uuid.uuid4().hex[:12]
        console = os.path.join(workdir, name + ".console")
        return cls(conn, name, domain_xml(name, rig, disk_path, workload, console, memory_mib), console)

    def start(self) -> None:
        self.dom.create()

    def console(self) -> str:
        try:
            with open(self.console_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def state(self) -> tuple[int, int]:
        state, reason = self.dom.state()
        return state, reason

    def wait_console(self, marker: str, timeout: float = 120.0) -> str:
        """Wait until the console shows marker; return the console text.

        Fails at once if the guest reports a failure or shuts off first.
        """
        deadline = time.monotonic() + timeout
        while True:
            text = self.console()
            if marker in text:
                return text
            for bad in ("XTND-VERIFY-FAIL", "XTND-WRITE-FAIL", "XTND-NO-DISK", "XTND-MODULE-FAIL", "Kernel panic"):
                if bad in text and bad not in marker:
                    raise GuestFailed(f"guest {self.name} reported {bad}:\n{text[-3000:]}")
            if self.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF:
                # The console may have been written just before shutoff.
                text = self.console()
                if marker in text:
                    return text
                raise GuestFailed(f"guest {self.name} shut off before {marker!r}:\n{text[-3000:]}")
            if time.monotonic() > deadline:
                raise Timeout(f"no {marker!r} from {self.name} in {timeout}s:\n{text[-3000:]}")
            time.sleep(0.05)

    def wait_state(self, state: int, reason: int | None = None, timeout: float = 120.0) -> tuple[int, int]:
        deadline = time.monotonic() + timeout
        while True:
            current = self.state()
            if current[0] == state and (reason is None or current[1] == reason):
                return current
            if time.monotonic() > deadline:
                raise Timeout(
                    f"{self.name} in state {current}, not ({state}, {reason}) after {timeout}s:\n"
                    f"{self.console()[-3000:]}"
                )
            time.sleep(0.05)

    def disk_index(self, target: str = "vda") -> int:
        """The index libvirt gave the top image of target (for 'vda[N]')."""
        disk = disk_element(ET.fromstring(self.dom.XMLDesc(0)), target)
        source = disk.find("source") if disk is not None else None
        if source is not None and source.get("index") is not None:
            return int(source.get("index", ""))
        raise LookupError(f"{self.name}: no <source index> for {target} in the live XML")

    def remove(self) -> None:
        """Destroy (if running) and undefine; safe to call twice."""
        with contextlib.suppress(libvirt.libvirtError):
            if self.dom.isActive():
                self.dom.destroy()
        with contextlib.suppress(libvirt.libvirtError):
            self.dom.undefine()


@contextlib.contextmanager
def guest(
    conn: libvirt.virConnect,
    rig: Rig,
    disk_path: str,
    workload: Workload,
    workdir: str,
    memory_mib: int = 96,
    prefix: str = DOMAIN_PREFIX,
) -> Iterator[Guest]:
    """A defined (not started) guest, removed on exit."""
    g = Guest.define(conn, rig, disk_path, workload, workdir, memory_mib, prefix)
    try:
        yield g
    finally:
        g.remove()


# Daemons


def start_libvirt(timeout: float = 10.0) -> None:
    """Start virtlogd and libvirtd unless running, as tools/run.sh does."""
    for daemon in ("virtlogd", "libvirtd"):
        if shutil.which(daemon) is None:
            raise RigUnavailable(f"{daemon} is not installed")
        if subprocess.run(["pgrep", "-x", daemon], capture_output=True).returncode != 0:
            subprocess.run([daemon, "-d"], check=True)
    deadline = time.monotonic() + timeout
    while not os.path.exists("/run/libvirt/libvirt-sock"):
        if time.monotonic() > deadline:
            raise RigUnavailable("libvirtd did not create /run/libvirt/libvirt-sock")
        time.sleep(0.1)


# Disks


class LoopDisk:
    """A loop device over a sparse file under a test directory, growable.

    Stands in for a thin LV: growing the file and asking the loop driver
    to re-read its size (LOOP_SET_CAPACITY, `losetup -c`) grows the
    device in place while QEMU has it open, as an LV refresh does.
    """

    def __init__(self, path: str, size: int):
        self.path = path
        with open(path, "wb") as f:
            f.truncate(size)
        self.device = _run(["losetup", "--find", "--show", path]).strip()

    @property
    def size(self) -> int:
        with open(self.device, "rb") as f:
            return f.seek(0, os.SEEK_END)

    def grow(self, size: int) -> None:
        with open(self.path, "r+b") as f:
            f.truncate(size)
        _run(["losetup", "--set-capacity", self.device])

    def detach(self) -> None:
        subprocess.run(["losetup", "--detach", self.device], check=False, capture_output=True)
