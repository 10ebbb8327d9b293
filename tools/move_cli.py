"""``xtnd volume move``: move a running VM's disk to another storage domain.

    xtnd volume move --vm VM --disk vda --to-domain D2 [--json] [--bandwidth MIB]

Runs on the host running the VM, next to its HSM. The steps:

1. create the destination volume in D2 through the SPM (same format and
   capacity; a block destination at least as large as the source's
   allocation plus a replicating chunk, and never smaller than a block
   source) and prepare it here (its link under the run dir);
2. tell the local HSM (its control socket, op replicate_start) so it
   extends both sides while the copy runs (xtnd.hsm.replicate);
3. blockCopy the disk to the destination (VIR_DOMAIN_BLOCK_COPY_REUSE_EXT:
   the volume is already a qcow2 image; TRANSIENT_JOB: the domain may be
   persistent), the guest running, showing bytes copied, rate and extends;
4. when the mirror is ready, pivot; the VM now runs on the destination
   (its persistent definition is changed to match);
5. retire the source: remove its link, deactivate it here, remove it
   through the SPM.

Ctrl-C or any failure before the pivot aborts: the job is cancelled (the
VM stays on its source), the HSM is told, the half-copied destination is
deactivated and removed. Nothing else changes. Interrupted once the
pivot took effect, the VM keeps its new disk and the source is kept (the
command says so; ``xtnd volume remove`` retires it).

Exit codes: 0 moved, 1 failed (aborted cleanly), 130 interrupted (aborted
cleanly).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import signal
import sys
import threading
import time
import uuid as uuidlib
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from typing import Any

import libvirt
from xtnd import lvm, storage
from xtnd.common.cmd import CommandError
from xtnd.common.units import MiB, round_up
from xtnd.hsm import config as hsm_config
from xtnd.hsm import control as hsm_control
from xtnd.hsm import links
from xtnd.hsm.disks import disk_element
from xtnd.hsm.sizing import REPLICATING
from xtnd.hsm.volumes import device_size
from xtnd.storage.model import max_size
from xtnd.tools import domain_cli, errors, volume_host_cli

log = logging.getLogger("xtnd.tools.move")

EXIT_FAILED = 1
EXIT_INTERRUPTED = 130
POLL = 0.25
PIVOT_TIMEOUT = 60.0


class MoveError(Exception):
    """The move cannot start or failed; the VM stays on its source."""


class Interrupted(MoveError):
    """Ctrl-C: the move was aborted."""


@dataclasses.dataclass
class Disk:
    name: str
    type: str  # block or file
    path: str
    format: str


@dataclasses.dataclass
class Progress:
    cur: int = 0
    end: int = 0
    rate: float = 0.0
    extends_src: int = 0
    extends_dst: int = 0
    phase: str = "starting"

    def line(self) -> str:
        pct = 100.0 * self.cur / self.end if self.end else 0.0
        return (
            f"{self.phase}: {self.cur // MiB}/{self.end // MiB} MiB ({pct:.0f}%) {self.rate / MiB:.1f} MiB/s "
            f"extends src={self.extends_src} dst={self.extends_dst}"
        )


def find_disk(xml: str, name: str) -> Disk:
    disk = disk_element(ET.fromstring(xml), name)
    if disk is None:
        raise MoveError(f"the vm has no disk {name}")
    source = disk.find("source")
    driver = disk.find("driver")
    path = source.get("dev") or source.get("file") if source is not None else None
    if not path:
        raise MoveError(f"disk {name} has no source")
    return Disk(name, disk.get("type", ""), path, driver.get("type", "raw") if driver is not None else "raw")


def has_mirror(xml: str, name: str) -> tuple[bool, bool]:
    """(a mirror exists, it is ready) for disk name."""
    disk = disk_element(ET.fromstring(xml), name)
    mirror = disk.find("mirror") if disk is not None else None
    if mirror is None:
        return False, False
    return True, mirror.get("ready") == "yes"


def dest_xml(block: bool, path: str, fmt: str) -> str:
    disk = ET.Element("disk", type="block" if block else "file", device="disk")
    ET.SubElement(disk, "driver", name="qemu", type=fmt)
    ET.SubElement(disk, "source", {"dev" if block else "file": path})
    return ET.tostring(disk, encoding="unicode")


def retarget(xml: str, name: str, block: bool, path: str) -> str:
    """The domain XML with disk name's source moved to path."""
    root = ET.fromstring(xml)
    disk = disk_element(root, name)
    if disk is not None:
        disk.set("type", "block" if block else "file")
        source = disk.find("source")
        if source is None:
            source = ET.SubElement(disk, "source")
        source.attrib.clear()
        source.set("dev" if block else "file", path)
    return ET.tostring(root, encoding="unicode")


def initial_size(capacity: int, allocation: int, physical: int, src_block: bool, chunk: int) -> int:
    """A block destination: the source's allocation plus a chunk, at least
    the size of a block source (the destination is extended first, so it
    is never smaller), at most the volume's max size."""
    size = round_up(allocation + chunk, MiB)
    if src_block:
        size = max(size, physical)
    return min(size, max_size(capacity))


class Mover:
    def __init__(
        self,
        args: argparse.Namespace,
        out: Callable[[str], None],
        cancel: threading.Event | None = None,
    ):
        self.args = args
        self.out = out
        self.cancel = cancel or threading.Event()
        self.cfg = hsm_config.load(args.hsm_config)
        self.run_dir = self.cfg.host.run_dir
        self.storage_config = args.storage_config or self.cfg.host.storage_config
        self.host = storage.HostConfig.load(self.storage_config)
        self.hsm = hsm_control.ControlClient(self.cfg.host.control_socket, timeout=60.0)
        self.progress = Progress()
        self._replica: dict[str, Any] = {}
        self._link = ""
        self._hsm_away = False

    def _ns(self, **kw: Any) -> argparse.Namespace:
        base: dict[str, Any] = dict(
            storage_config=self.storage_config, pv=[], path=None, local=False, host_id=None, json=False
        )
        base.update(kw)
        return argparse.Namespace(**base)

    def _check_cancel(self) -> None:
        if self.cancel.is_set():
            raise Interrupted("interrupted")

    def run(self) -> dict[str, Any]:
        conn = libvirt.open(self.cfg.libvirt.uri)
        try:
            return self._run(conn)
        finally:
            conn.close()

    def _run(self, conn: libvirt.virConnect) -> dict[str, Any]:
        args = self.args
        try:
            dom = conn.lookupByName(args.vm)
        except libvirt.libvirtError:
            try:
                dom = conn.lookupByUUIDString(args.vm)
            except libvirt.libvirtError:
                raise MoveError(f"no vm {args.vm}") from None
        if not dom.isActive():
            raise MoveError(f"vm {args.vm} is not running")
        disk = find_disk(dom.XMLDesc(0), args.disk)
        ids = links.parse(disk.path, self.run_dir)
        if ids is None:
            raise MoveError(f"disk {disk.name} of {args.vm} is not a volume link under {self.run_dir}: {disk.path}")
        src_domain_id, src_volume = ids
        to_domain = args.to_domain
        if src_domain_id == to_domain:
            raise MoveError(f"disk {disk.name} is already in domain {to_domain}")
        if has_mirror(dom.XMLDesc(0), disk.name)[0]:
            raise MoveError(f"disk {disk.name} already has a block job")
        src_domain = self.host.open(src_domain_id)
        dst_domain = self.host.open(to_domain)
        src_info = src_domain.volume_info(src_volume)
        src_block = isinstance(src_domain, storage.BlockDomain)
        dst_block = isinstance(dst_domain, storage.BlockDomain)
        capacity, allocation, physical = dom.blockInfo(disk.name)
        size = initial_size(src_info.capacity, allocation, physical, src_block, self.cfg.sizing().chunk(REPLICATING))
        try:
            self.hsm.call("ping")
        except OSError as e:
            raise MoveError(
                f"cannot reach the HSM at {self.cfg.host.control_socket}: {e} (it extends both sides of the copy)"
            ) from None
        backend = domain_cli._backend(self._ns())
        new = uuidlib.uuid4()
        self.out(f"creating volume {new} in domain {to_domain} ({size // MiB} MiB)")
        started = time.monotonic()
        link: str | None = None
        created = told = copying = False
        vm_id = dom.UUIDString()
        try:
            backend.create_volume(
                self._ns(
                    domain=to_domain,
                    uuid=new,
                    capacity=src_info.capacity,
                    format=str(src_info.format),
                    initial_size=size,
                    image=src_info.image,
                )  # fmt: skip
            )
            created = True
            self._check_cancel()
            device = dst_domain.prepare_volume(new)
            link = links.create(to_domain, new, device, self.run_dir)
            self._replica = dict(
                vm_uuid=vm_id, drive=disk.name, src_block=src_block, dst_domain=str(to_domain), dst_volume=str(new),
                dst_block=dst_block,
            )  # fmt: skip
            self._link = link
            self.hsm.call("replicate_start", dst_physical=device_size(link), **self._replica)
            told = True
            self._check_cancel()
            flags = libvirt.VIR_DOMAIN_BLOCK_COPY_REUSE_EXT | libvirt.VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB
            params = {}
            if self.args.bandwidth:
                params[libvirt.VIR_DOMAIN_BLOCK_COPY_BANDWIDTH] = self.args.bandwidth * MiB
            dom.blockCopy(disk.name, dest_xml(dst_block, link, disk.format), params or None, flags)
            copying = True
            self.out(f"copying {disk.name} of {dom.name()} to {link}")
            self._wait_ready(dom, vm_id, disk.name)
            self._check_cancel()
            self._pivot(dom, disk.name, link)
            copying = False
        except BaseException as e:
            if copying and link is not None and self._pivoted(dom, disk.name, link):
                # Interrupted after the pivot took effect: the destination is
                # the VM's disk now and must stay; the source is kept too.
                with _no_sigint(), _step("tell the HSM"):
                    self.hsm.call("replicate_end", vm_uuid=vm_id, drive=disk.name, outcome="pivoted")
                raise MoveError(
                    f"{e or type(e).__name__} after the pivot: the vm runs on {link}; the source volume "
                    f"{src_volume} of domain {src_domain_id} was kept (remove it with xtnd volume remove)"
                ) from None
            why = "interrupted" if isinstance(e, (KeyboardInterrupt, Interrupted)) else str(e)
            self.out(f"aborting: {why}")
            with _no_sigint():
                self._abort(dom, vm_id, disk.name, copying, told, created, to_domain, new, backend)
            if isinstance(e, KeyboardInterrupt):
                raise Interrupted("interrupted; the vm stays on its source, the destination was removed") from None
            if isinstance(e, Interrupted):
                raise Interrupted(f"{e}; the vm stays on its source, the destination was removed") from None
            if isinstance(e, (libvirt.libvirtError, hsm_control.ControlError, storage.StorageError, OSError)):
                raise MoveError(f"{e}; the vm stays on its source, the destination was removed") from e
            raise
        seconds = time.monotonic() - started
        try:
            ended = self.hsm.call("replicate_end", vm_uuid=vm_id, drive=disk.name, outcome="pivoted")
            self.progress.extends_src = ended["extends_src"]
            self.progress.extends_dst = ended["extends_dst"]
        except (hsm_control.ControlError, OSError) as e:
            # The move is done; the HSM watches the new disk as any other.
            if isinstance(e, hsm_control.ControlError) and e.error == "NotReplicating":
                # It found the copy after a restart and saw its job end by itself.
                log.info("the HSM had seen the copy end: %s", e)
            else:
                log.warning("cannot tell the HSM the copy ended: %s", e)
        if dom.isPersistent():
            inactive = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
            conn.defineXML(retarget(inactive, disk.name, dst_block, link))
        self.out(f"pivoted to {link}; removing the source volume {src_volume}")
        self._retire(src_domain, src_domain_id, src_volume, backend)
        return {
            "vm": dom.name(),
            "vm_uuid": vm_id,
            "disk": disk.name,
            "from_domain": str(src_domain_id),
            "from_volume": str(src_volume),
            "to_domain": str(to_domain),
            "to_volume": str(new),
            "path": link,
            "bytes": self.progress.end,
            "seconds": round(seconds, 3),
            "rate": round(self.progress.end / seconds) if seconds > 0 else 0,
            "extends_src": self.progress.extends_src,
            "extends_dst": self.progress.extends_dst,
            "result": "moved",
        }

    def _wait_ready(self, dom: Any, vm_id: str, name: str) -> None:
        t_start, last_print = time.monotonic(), 0.0
        while True:
            self._check_cancel()
            info = dom.blockJobInfo(name, 0)
            exists, ready = has_mirror(dom.XMLDesc(0), name)
            if not info or not exists:
                raise MoveError(f"the copy job of {name} ended before it was ready")
            now = time.monotonic()
            p = self.progress
            p.cur, p.end = int(info.get("cur", 0)), int(info.get("end", 0))
            # The job copies in large steps: the average since the start reads best.
            p.rate = p.cur / (now - t_start) if now > t_start else 0.0
            replica = self._hsm_replica(vm_id, name)
            if replica is not None:
                p.extends_src = replica.get("extends_src", p.extends_src)
                p.extends_dst = replica.get("extends_dst", p.extends_dst)
            p.phase = "ready" if ready else "copying"
            if ready or now - last_print >= 1.0:
                self.out(p.line())
                last_print = now
            if ready and p.end and p.cur >= p.end:
                return
            self.cancel.wait(POLL)

    def _hsm_replica(self, vm_id: str, name: str) -> dict[str, Any] | None:
        """The HSM's view of the copy, None while it does not answer.

        An HSM that restarts (systemd after a crash, an upgrade) is away
        for a few seconds: the copy goes on meanwhile, and the new HSM
        finds it in libvirt by itself (xtnd.hsm.replicate.Replicator.adopt).
        Aborting here would throw away a copy that needs nothing from us."""
        try:
            replica: dict[str, Any] | None = self.hsm.call("replicate_status", vm_uuid=vm_id, drive=name)
            if replica is None:
                # An HSM that forgot the copy and did not find it: tell it
                # again, or nothing extends the destination ahead of the copy.
                self.out("the HSM does not know the copy (restarted?): telling it again")
                replica = self.hsm.call("replicate_start", dst_physical=device_size(self._link), **self._replica)
        except (OSError, hsm_control.ControlError) as e:
            if isinstance(e, hsm_control.ControlError) and e.error != "Disconnected":
                raise  # it answered: a refusal is an answer
            if not self._hsm_away:
                self.out(f"the HSM does not answer ({e}): the copy goes on, waiting for it")
                log.info("the HSM does not answer during the copy: %s", e)
            self._hsm_away = True
            return None
        if self._hsm_away:
            self.out("the HSM answers again")
            self._hsm_away = False
        return replica

    def _pivoted(self, dom: Any, name: str, link: str) -> bool:
        try:
            xml = dom.XMLDesc(0)
            return not has_mirror(xml, name)[0] and find_disk(xml, name).path == link
        except (libvirt.libvirtError, MoveError):
            return False

    def _pivot(self, dom: Any, name: str, link: str) -> None:
        dom.blockJobAbort(name, libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)
        deadline = time.monotonic() + PIVOT_TIMEOUT
        while True:
            xml = dom.XMLDesc(0)
            if not has_mirror(xml, name)[0] and find_disk(xml, name).path == link:
                return
            if time.monotonic() > deadline:
                raise MoveError(f"the pivot of {name} did not finish in {PIVOT_TIMEOUT:.0f}s")
            time.sleep(0.05)

    def _abort(self, dom: Any, vm_id: str, name: str, copying: bool, told: bool, created: bool,
               domain: uuidlib.UUID, volume: uuidlib.UUID, backend: domain_cli.Backend) -> None:  # fmt: skip
        """Undo a move that did not pivot; every step is tried."""
        if copying:
            with _step("cancel the copy job"):
                if dom.blockJobInfo(name, 0):
                    dom.blockJobAbort(name, 0)
                deadline = time.monotonic() + PIVOT_TIMEOUT
                while has_mirror(dom.XMLDesc(0), name)[0] and time.monotonic() < deadline:
                    time.sleep(0.05)
        if told:
            with _step("tell the HSM"):
                self.hsm.call("replicate_end", vm_uuid=vm_id, drive=name, outcome="aborted")
        if not created:
            return
        with _step("remove the destination's link"):
            links.remove(domain, volume, self.run_dir)
        with _step("deactivate the destination"):
            self.host.open(domain).teardown_volume(volume)
        with _step("remove the destination"):
            backend.remove_volume(self._ns(domain=domain, uuid=volume))
        self.out(f"aborted: the vm stays on its source; volume {volume} removed")

    def _retire(self, domain: storage.Domain, domain_id: uuidlib.UUID, volume: uuidlib.UUID,
                backend: domain_cli.Backend) -> None:  # fmt: skip
        links.remove(domain_id, volume, self.run_dir)
        domain.teardown_volume(volume)
        backend.remove_volume(self._ns(domain=domain_id, uuid=volume))


@contextlib.contextmanager
def _step(what: str) -> Iterator[None]:
    try:
        yield
    except Exception as e:  # noqa: BLE001 - the other cleanup steps still run
        log.warning("abort: cannot %s: %s", what, e)


@contextlib.contextmanager
def _no_sigint() -> Iterator[None]:
    """A second Ctrl-C must not cut the cleanup short."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def _move(args: argparse.Namespace) -> int:
    refusal = domain_cli.need_root(args)
    if refusal:
        print(f"xtnd: error: {refusal}", file=sys.stderr)
        return EXIT_FAILED

    def out(line: str) -> None:
        print(line, file=sys.stderr if args.json else sys.stdout, flush=True)

    try:
        result = Mover(args, out).run()
    except Interrupted as e:
        print(f"xtnd: error: {e}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("xtnd: error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (MoveError, storage.StorageError, lvm.LVMError, lvm.ActivationError, CommandError, OSError,
            libvirt.libvirtError, hsm_control.ControlError) as e:  # fmt: skip
        print(errors.report("xtnd", e), file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
    else:
        print(
            f"moved {result['disk']} of {result['vm']} to domain {result['to_domain']} volume {result['to_volume']}: "
            f"{result['bytes'] // MiB} MiB in {result['seconds']:.1f}s, extends src={result['extends_src']} "
            f"dst={result['extends_dst']}"
        )
    return 0


def register(top: Any) -> None:
    vsub = volume_host_cli._volume_subparsers(top)
    p = vsub.add_parser("move", help="move a running VM's disk to another storage domain (live)")
    p.add_argument("--vm", required=True, help="the VM (name or UUID), running on this host")
    p.add_argument("--disk", required=True, help="the disk's target, e.g. vda")
    p.add_argument("--to-domain", type=domain_cli._uuid, required=True, help="the destination domain's UUID")
    p.add_argument("--json", action="store_true", help="machine-readable result on stdout (progress on stderr)")
    p.add_argument(
        "--bandwidth", type=int, default=0, metavar="MIB", help="limit the copy to MIB MiB/s (default 0: no limit)"
    )
    p.add_argument(
        "--hsm-config", default=domain_cli.HSM_CONFIG, help=f"the HSM's config (default {domain_cli.HSM_CONFIG})"
    )
    p.add_argument("--storage-config", metavar="FILE", help="host storage config (default: the HSM's)")
    p.set_defaults(func=_move)
