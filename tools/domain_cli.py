"""``xtnd domain`` and ``xtnd volume``: create and inspect storage domains.

    xtnd domain create --uuid UUID --pv DEV [--pv DEV ...] [--master] [--max-hosts 250] [--io-timeout 10]
    xtnd domain create --uuid UUID --path DIR [--master] [--max-hosts 250] [--io-timeout 10]
    xtnd domain info   --uuid UUID [--pv DEV ... | --path DIR] [--json]
    xtnd volume create --domain UUID --uuid UUID --capacity SIZE [--format qcow2|raw] [--initial-size SIZE]
                       [--host-id N] [--local]
    xtnd volume remove --domain UUID --uuid UUID [--host-id N] [--local]
    xtnd volume resize --domain UUID --uuid UUID --size SIZE [--host-id N] [--local] [--json]
    xtnd volume info   --domain UUID --uuid UUID
    xtnd volume list   --domain UUID [--json]

Finding a domain: LVM only looks at the PVs it is given, so the CLI needs
them. ``domain create`` records the new domain (its PVs, or its root
directory) in the host's storage config (/etc/xtnd/storage.json, see
xtnd.storage.hostconfig); later commands look the UUID up there. --pv or
--path on any command override the file.

Every command goes through a Backend. LocalBackend calls xtnd.storage in
this process, which is right as long as no SPM runs here (creating a
domain comes before any SPM exists). When the SPM daemon's control socket
exists ($XTND_SPM_SOCKET, default /run/xtnd/spm.sock), SpmBackend sends
volume commands to it instead: only the SPM may change LVM metadata.

Without a local SPM, ``volume create`` and ``remove`` on a block domain
first read the pool's SPM lease from storage (xtnd.storage.spmowner) and
refuse with exit code 2 while another host holds it: LVM run here would
change the VG behind the SPM's back. With the lease free (no SPM
anywhere) the command takes the SPM lease itself for its duration
(xtnd.spm.borrow, with this host's id: --host-id or the SPM/HSM config)
and refuses with exit code 2 when it cannot; file domains need no lease.
``--local`` skips all of it, for bootstrap and recovery (a dead SPM host
whose lease no standby took over); it is dangerous: use it only when no
SPM runs anywhere.

``volume resize`` goes the same way as create and remove (the SPM's
socket, or the lease taken here). After a change it writes a resize
notice into the master domain's outbox (xtnd.mailbox.notice) under the
same lease, for the HSM of whichever host runs a VM on the volume.
Shrinking is refused with exit code 2; the same size changes nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import sys
import uuid as uuidlib
from collections.abc import Iterator
from typing import Any, Protocol

from xtnd import lvm, storage
from xtnd.common.cmd import CommandError
from xtnd.hsm import config as hsm_config
from xtnd.mailbox import notice
from xtnd.mailbox.directio import DirectFile
from xtnd.spm import borrow, control
from xtnd.spm import config as spm_config
from xtnd.spm.borrow import CannotTakeLease
from xtnd.spm.control import ControlClient, volume_from_dict
from xtnd.storage import constants as c
from xtnd.storage import sanlockdirect
from xtnd.tools import errors

log = logging.getLogger("xtnd.tools.domain")

_UNITS = {"": 1, "b": 1, "k": c.KiB, "m": c.MiB, "g": c.GiB, "t": 1024 * c.GiB}

# Exit code when another host is the SPM (SpmLeaseHeld), or the SPM lease
# cannot be taken for the command (CannotTakeLease).
EXIT_NOT_SPM = 2
# Exit code of a refused shrink (nothing changed).
EXIT_SHRINK = 2
SPM_CONFIG = spm_config.DEFAULT_PATH
HSM_CONFIG = "/etc/xtnd/hsm.conf"


def parse_size(text: str) -> int:
    """'1073741824', '512M', '10G', '2560MiB' -> bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+)\s*([bkmgt]?)(?:i?b)?\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 1073741824, 512M, 10G)")
    return int(m.group(1)) * _UNITS[m.group(2)]


def _io_timeout(text: str) -> int:
    try:
        return sanlockdirect.check_io_timeout(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"io timeout must be a whole number of seconds in 1..{c.MAX_IO_TIMEOUT}, not {text!r}"
        ) from None


def _uuid(text: str) -> uuidlib.UUID:
    try:
        return uuidlib.UUID(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a UUID: {text!r}") from None


class Backend(Protocol):
    def create_domain(self, args: argparse.Namespace) -> storage.DomainInfo: ...

    def domain_info(self, args: argparse.Namespace) -> storage.DomainInfo: ...

    def create_volume(self, args: argparse.Namespace) -> storage.VolumeInfo: ...

    def remove_volume(self, args: argparse.Namespace) -> None: ...

    def resize_volume(self, args: argparse.Namespace) -> tuple[storage.VolumeInfo, bool]: ...

    def volume_info(self, args: argparse.Namespace) -> storage.VolumeInfo: ...

    def list_volumes(self, args: argparse.Namespace) -> list[storage.VolumeInfo]: ...


class LocalBackend:
    """Runs the storage functions in this process.

    check_spm: before creating or removing a block volume, refuse if
    another host holds the pool's SPM lease (see the module doc).
    """

    def __init__(self, config: storage.HostConfig, check_spm: bool = True):
        self.config = config
        self.check_spm = check_spm

    def _progress(self, msg: str) -> None:
        print(msg, flush=True)

    def create_domain(self, args: argparse.Namespace) -> storage.DomainInfo:
        domain: storage.Domain
        if args.path:
            domain = storage.create_file_domain(
                args.uuid, args.path, args.master, args.max_hosts, self._progress, io_timeout=args.io_timeout
            )
            self.config.add_file(args.uuid, args.path)
        else:
            domain = storage.create_block_domain(
                args.uuid,
                args.pv,
                args.master,
                args.max_hosts,
                extent_size=args.extent_size,
                progress=self._progress,
                activation=self.config.activation,
                io_timeout=args.io_timeout,
            )
            self.config.add_block(args.uuid, args.pv)
        if args.register:
            self.config.save()
            self._progress(f"recorded in {self.config.path}")
        return domain.info()

    def _open(self, args: argparse.Namespace, uuid: uuidlib.UUID, writable: bool = False) -> storage.Domain:
        """Reports read LVM metadata only; create and remove ask for writable."""
        return self.config.open(uuid, pvs=args.pv, root=args.path, writable=writable)

    def domain_info(self, args: argparse.Namespace) -> storage.DomainInfo:
        return self._open(args, args.uuid).info()

    def create_volume(self, args: argparse.Namespace) -> storage.VolumeInfo:
        domain = self._open(args, args.domain, writable=True)
        with self._as_spm(args, domain, "create") as fence:
            return domain.create_volume(
                args.uuid, args.capacity, args.format, initial_size=args.initial_size, image=args.image, fence=fence
            )

    def remove_volume(self, args: argparse.Namespace) -> None:
        domain = self._open(args, args.domain, writable=True)
        with self._as_spm(args, domain, "remove") as fence:
            domain.remove_volume(args.uuid, fence=fence)

    def resize_volume(self, args: argparse.Namespace) -> tuple[storage.VolumeInfo, bool]:
        domain = self._open(args, args.domain, writable=True)
        with self._as_spm(args, domain, "resize") as fence:
            changed = domain.resize_volume(args.uuid, args.size, fence=fence)
            if changed:
                self._announce(domain, args, fence)
        return domain.volume_info(args.uuid), changed

    def _announce(self, domain: storage.Domain, args: argparse.Namespace, fence: storage.Fence) -> None:
        """The resize notice in the master domain's outbox (still under the lease)."""
        master = self._master(domain)
        if master is None:
            log.warning("no master domain of domain=%s: no resize notice written", domain.uuid)
            print(
                f"xtnd: warning: no master domain of {domain.uuid} in {self.config.path}: running VMs were not told",
                file=sys.stderr,
            )
            return
        fence()
        with DirectFile(master.mailbox().outbox) as outbox:
            notice.announce(outbox, domain.uuid, args.uuid, args.size)

    def _master(self, domain: storage.Domain) -> storage.Domain | None:
        """The master domain of domain's pool (the one with the mailbox)."""
        if isinstance(domain, storage.BlockDomain):
            return storage.find_master(domain, self.config)
        if domain.info().master:
            return domain
        for uuid in self.config.domains:
            try:
                other = self.config.open(uuid)
                if other.info().master:
                    return other
            except (storage.StorageError, lvm.LVMError) as e:
                log.info("skipping domain %s while looking for the master: %s", uuid, e)
        return None

    def volume_info(self, args: argparse.Namespace) -> storage.VolumeInfo:
        return self._open(args, args.domain).volume_info(args.uuid)

    def list_volumes(self, args: argparse.Namespace) -> list[storage.VolumeInfo]:
        return self._open(args, args.domain).list_volumes()

    @contextlib.contextmanager
    def _as_spm(self, args: argparse.Namespace, domain: storage.Domain, op: str) -> Iterator[storage.Fence]:
        """Hold the pool's SPM lease around a block volume command; yield its fence."""
        if not self.check_spm:
            log.info("SPM lease not taken (--local) op=%s domain=%s volume=%s", op, domain.uuid, args.uuid)
            yield storage.no_fence
            return
        if not isinstance(domain, storage.BlockDomain):
            yield storage.no_fence  # file volumes are files, not LVM metadata
            return
        try:
            # Reading the lease from storage refuses at once, naming the SPM.
            storage.check_no_other_spm(domain, self.config)
        except storage.SpmLeaseHeld as e:
            log.warning("refused op=%s domain=%s volume=%s owner_host_id=%d", op, domain.uuid, args.uuid, e.host_id)
            raise
        master = storage.find_master(domain, self.config)
        if master is None:
            raise CannotTakeLease(
                f"no master domain of domain {domain.uuid} in {self.config.path}: cannot take the SPM lease"
            )
        host_id = _host_id(args)
        with borrow.spm_lease(master, host_id) as lease:
            log.info("SPM lease taken op=%s domain=%s volume=%s host_id=%d", op, domain.uuid, args.uuid, host_id)
            yield lease.fence


def _host_id(args: argparse.Namespace) -> int:
    """This host's id: --host-id, else [spm] host_id or the HSM's [host] host_id."""
    if args.host_id:
        return int(args.host_id)
    for path, read in ((SPM_CONFIG, _spm_host_id), (HSM_CONFIG, _hsm_host_id)):
        if os.path.exists(path):
            try:
                return read(path)
            except (ValueError, OSError) as e:
                raise CannotTakeLease(f"cannot read this host's id from {path}: {e}") from None
    raise CannotTakeLease(
        f"cannot take the SPM lease: this host's id is unknown (give --host-id, or set it in {SPM_CONFIG} or "
        f"{HSM_CONFIG})"
    )


def _spm_host_id(path: str) -> int:
    return spm_config.load(path).spm.host_id


def _hsm_host_id(path: str) -> int:
    return hsm_config.load(path).host.host_id


class SpmBackend(LocalBackend):
    """Volume commands through the local SPM daemon's control socket.

    While an SPM runs on this host only it may change LVM metadata, so
    create and remove (and, for one consistent view, info and list) go to
    it; the domain is the SPM's, --pv/--path are not used. Domain commands
    stay local: creating a domain comes before any SPM, info only reads.
    """

    def __init__(self, config: storage.HostConfig, client: ControlClient):
        super().__init__(config)
        self.client = client

    def create_volume(self, args: argparse.Namespace) -> storage.VolumeInfo:
        image = str(args.image) if args.image else None
        result = self.client.call(
            "volume_create",
            domain=str(args.domain),
            uuid=str(args.uuid),
            capacity=args.capacity,
            format=args.format,
            initial_size=args.initial_size,
            image=image,
        )
        return volume_from_dict(result)

    def remove_volume(self, args: argparse.Namespace) -> None:
        self.client.call("volume_remove", domain=str(args.domain), uuid=str(args.uuid))

    def resize_volume(self, args: argparse.Namespace) -> tuple[storage.VolumeInfo, bool]:
        result = self.client.call("volume_resize", domain=str(args.domain), uuid=str(args.uuid), size=args.size)
        return volume_from_dict(result["volume"]), bool(result["changed"])

    def volume_info(self, args: argparse.Namespace) -> storage.VolumeInfo:
        return volume_from_dict(self.client.call("volume_info", domain=str(args.domain), uuid=str(args.uuid)))

    def list_volumes(self, args: argparse.Namespace) -> list[storage.VolumeInfo]:
        return [volume_from_dict(d) for d in self.client.call("volume_list", domain=str(args.domain))]


def _backend(args: argparse.Namespace) -> Backend:
    """SpmBackend if an SPM daemon answers here, else LocalBackend."""
    config = storage.HostConfig.load(args.storage_config)
    path = control.default_path()
    if os.path.exists(path):
        client = ControlClient(path)
        try:
            client.call("ping")
        except ConnectionRefusedError:
            # Left by an SPM that was killed: nobody serves it (a running SPM
            # replaces it at start).
            print(f"xtnd: warning: stale SPM socket {path}, running locally", file=sys.stderr)
        except OSError as e:
            raise control.ControlError("Unreachable", f"cannot reach the SPM at {path}: {e}") from None
        else:
            return SpmBackend(config, client)
    return LocalBackend(config, check_spm=not getattr(args, "local", False))


def _print(data: dict[str, Any] | list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        json.dump(data, sys.stdout, indent=2)
        print()
        return
    rows = data if isinstance(data, list) else [data]
    for i, row in enumerate(rows):
        if i:
            print()
        for key, value in row.items():
            if isinstance(value, dict):
                for k, v in value.items():
                    print(f"{key}.{k}: {v}")
            elif isinstance(value, list):
                print(f"{key}: {' '.join(str(v) for v in value) or '-'}")
            else:
                print(f"{key}: {value}")


def need_root(args: argparse.Namespace) -> str | None:
    """Why this command cannot run as the caller (LVM, sanlock and /run/xtnd are root's), or None."""
    if os.geteuid() == 0:
        return None
    words = [
        w for w in (args.command, getattr(args, "domain_command", None), getattr(args, "volume_command", None)) if w
    ]
    return f"xtnd {' '.join(words)} must run as root (LVM, sanlock and /run/xtnd are root's); try sudo"


def _run(func: Any, args: argparse.Namespace) -> int:
    refusal = need_root(args)
    if refusal:
        print(f"xtnd: error: {refusal}", file=sys.stderr)
        return 1
    try:
        func(_backend(args), args)
    except (storage.SpmLeaseHeld, CannotTakeLease) as e:
        print(f"xtnd: error: {e} (--local skips this check: only when no SPM runs anywhere)", file=sys.stderr)
        return EXIT_NOT_SPM
    except storage.ShrinkRefused as e:
        print(errors.report("xtnd", e), file=sys.stderr)
        return EXIT_SHRINK
    except control.ControlError as e:
        # The SPM's refusals keep their exit codes.
        print(errors.report("xtnd", e), file=sys.stderr)
        return EXIT_SHRINK if e.error == storage.ShrinkRefused.__name__ else 1
    except (storage.StorageError, lvm.LVMError, lvm.ActivationError, CommandError, OSError) as e:
        print(errors.report("xtnd", e), file=sys.stderr)
        return 1
    return 0


def _domain_create(backend: Backend, args: argparse.Namespace) -> None:
    if bool(args.pv) == bool(args.path):
        raise storage.InvalidArgument("give either --pv (block domain) or --path (file domain)")
    info = backend.create_domain(args)
    _print(info.to_dict(), args.json)


def _domain_info(backend: Backend, args: argparse.Namespace) -> None:
    _print(backend.domain_info(args).to_dict(), args.json)


def _volume_create(backend: Backend, args: argparse.Namespace) -> None:
    _print(backend.create_volume(args).to_dict(), args.json)


def _volume_remove(backend: Backend, args: argparse.Namespace) -> None:
    backend.remove_volume(args)
    print(f"volume {args.uuid} removed")


def _volume_resize(backend: Backend, args: argparse.Namespace) -> None:
    info, changed = backend.resize_volume(args)
    data = info.to_dict()
    data["changed"] = changed
    if args.json:
        _print(data, True)
        return
    if changed:
        print(f"volume {args.uuid} resized to {info.capacity} bytes")
    else:
        print(f"volume {args.uuid} is already {info.capacity} bytes: nothing changed")


def _volume_info(backend: Backend, args: argparse.Namespace) -> None:
    _print(backend.volume_info(args).to_dict(), args.json)


def _volume_list(backend: Backend, args: argparse.Namespace) -> None:
    volumes = backend.list_volumes(args)
    if args.json:
        _print([v.to_dict() for v in volumes], True)
        return
    print(f"{'uuid':36}  {'format':6}  {'capacity':>14}  {'size':>14}  path")
    for v in volumes:
        print(f"{v.uuid!s:36}  {v.format!s:6}  {v.capacity:>14}  {v.size:>14}  {v.path or '-'}")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pv", action="append", default=[], metavar="DEV", help="a PV of the block domain (repeat)")
    p.add_argument("--path", metavar="DIR", help="root directory of the file domain (holds DIR/<uuid>/)")
    p.add_argument(
        "--storage-config",
        metavar="FILE",
        help=f"host storage config (default: ${storage.hostconfig.ENV} or {storage.hostconfig.DEFAULT_PATH})",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _local(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--host-id",
        type=int,
        metavar="N",
        help=f"this host's id, to take the SPM lease when no SPM daemon runs here (default: [spm] host_id of "
        f"{SPM_CONFIG}, else [host] host_id of {HSM_CONFIG})",
    )
    p.add_argument(
        "--local",
        action="store_true",
        help="DANGEROUS: with no SPM daemon on this host, run LVM here even if another host holds "
        "the SPM lease (bootstrap or recovery only, when no SPM runs anywhere)",
    )


def register(subparsers: Any) -> None:
    domain = subparsers.add_parser("domain", help="create and inspect storage domains")
    dsub = domain.add_subparsers(dest="domain_command", required=True, metavar="SUBCOMMAND")

    create = dsub.add_parser("create", help="create a block (--pv) or file (--path) storage domain")
    create.add_argument("--uuid", type=_uuid, required=True, help="the domain UUID (also the VG name)")
    create.add_argument("--master", action="store_true", help="the pool's master domain (mailbox, SPM lease)")
    create.add_argument("--max-hosts", type=int, default=c.DEFAULT_MAX_HOSTS, help="host ids 1..N (default 250)")
    create.add_argument(
        "--extent-size", type=parse_size, default=c.DEFAULT_EXTENT_SIZE, help="LVM extent size (default 128M)"
    )
    create.add_argument(
        "--io-timeout",
        type=_io_timeout,
        default=c.DEFAULT_IO_TIMEOUT,
        metavar="SECONDS",
        help=f"sanlock io timeout written into the lockspace, 1..{c.MAX_IO_TIMEOUT} (default "
        f"{c.DEFAULT_IO_TIMEOUT}); the SPM config's [lease] io_timeout must be the same",
    )
    create.add_argument(
        "--no-register", dest="register", action="store_false", help="do not record the domain in the config"
    )
    _common(create)
    create.set_defaults(func=lambda a: _run(_domain_create, a))

    info = dsub.add_parser("info", help="show a domain: space, volumes, mailbox and lease location")
    info.add_argument("--uuid", type=_uuid, required=True)
    _common(info)
    info.set_defaults(func=lambda a: _run(_domain_info, a))

    volume = subparsers.add_parser("volume", help="create, remove and inspect volumes")
    vsub = volume.add_subparsers(dest="volume_command", required=True, metavar="SUBCOMMAND")

    vcreate = vsub.add_parser("create", help="create a volume (qcow2 thin or raw)")
    vcreate.add_argument("--domain", type=_uuid, required=True)
    vcreate.add_argument("--uuid", type=_uuid, required=True)
    vcreate.add_argument("--capacity", type=parse_size, required=True, help="virtual size, e.g. 10G")
    vcreate.add_argument("--format", choices=[f.value for f in storage.Format], default="qcow2")
    vcreate.add_argument(
        "--initial-size",
        type=parse_size,
        default=c.DEFAULT_CHUNK,
        help="first allocation of a qcow2 volume (default one chunk, 2560M)",
    )
    vcreate.add_argument("--image", type=_uuid, help="image (disk) UUID the volume belongs to")
    _local(vcreate)
    _common(vcreate)
    vcreate.set_defaults(func=lambda a: _run(_volume_create, a))

    vresize = vsub.add_parser("resize", help="grow a volume's virtual size (running VMs see it without reboot)")
    vresize.add_argument("--domain", type=_uuid, required=True)
    vresize.add_argument("--uuid", type=_uuid, required=True)
    vresize.add_argument("--size", type=parse_size, required=True, help="new virtual size, e.g. 20G (never smaller)")
    _local(vresize)
    _common(vresize)
    vresize.set_defaults(func=lambda a: _run(_volume_resize, a))

    for name, handler, text in (
        ("remove", _volume_remove, "remove a volume"),
        ("info", _volume_info, "show a volume"),
    ):
        p = vsub.add_parser(name, help=text)
        p.add_argument("--domain", type=_uuid, required=True)
        p.add_argument("--uuid", type=_uuid, required=True)
        if name == "remove":
            _local(p)
        _common(p)
        p.set_defaults(func=lambda a, h=handler: _run(h, a))

    vlist = vsub.add_parser("list", help="list the volumes of a domain")
    vlist.add_argument("--domain", type=_uuid, required=True)
    _common(vlist)
    vlist.set_defaults(func=lambda a: _run(_volume_list, a))
