"""``xtnd volume prepare`` and ``xtnd volume teardown``: use a volume on this host.

    xtnd volume prepare  --domain UUID --uuid UUID [--run-dir /run/xtnd] [--json]
    xtnd volume teardown --domain UUID --uuid UUID [--run-dir /run/xtnd]

prepare activates the volume (device-mapper or loop, as the LVM layer
decides; a file domain's volume needs nothing) and exposes it at the stable
path /run/xtnd/<domain>/<volume>, a symlink to the device. VM definitions
point at that path; the HSM maps a libvirt disk back to (domain, volume)
from it (xtnd.hsm.links). teardown removes the link, then deactivates.

These are host-local operations (no LVM metadata changes), so unlike
volume create/remove they never need the SPM.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from xtnd import lvm, storage
from xtnd.common.cmd import CommandError
from xtnd.hsm import links
from xtnd.tools import domain_cli, errors


def _open(args: argparse.Namespace) -> storage.Domain:
    config = storage.HostConfig.load(args.storage_config)
    return config.open(args.domain, pvs=args.pv, root=args.path)


def _prepare(args: argparse.Namespace) -> None:
    domain = _open(args)
    device = domain.prepare_volume(args.uuid)
    path = links.create(args.domain, args.uuid, device, args.run_dir)
    if args.json:
        json.dump({"domain": str(args.domain), "volume": str(args.uuid), "path": path, "device": device}, sys.stdout)
        print()
    else:
        print(f"{path} -> {device}")


def _teardown(args: argparse.Namespace) -> None:
    links.remove(args.domain, args.uuid, args.run_dir)
    _open(args).teardown_volume(args.uuid)
    print(f"volume {args.uuid} torn down")


def _run(func: Any, args: argparse.Namespace) -> int:
    refusal = domain_cli.need_root(args)
    if refusal:
        print(f"xtnd: error: {refusal}", file=sys.stderr)
        return 1
    try:
        func(args)
    except (storage.StorageError, lvm.LVMError, lvm.ActivationError, CommandError, OSError) as e:
        print(errors.report("xtnd", e), file=sys.stderr)
        return 1
    return 0


def _volume_subparsers(top: Any) -> Any:
    """The subcommands of ``xtnd volume`` (made by xtnd.tools.domain_cli)."""
    volume = top.choices.get("volume")
    if volume is None:
        raise RuntimeError("register xtnd.tools.domain_cli before xtnd.tools.volume_host_cli")
    for action in volume._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    raise RuntimeError("xtnd volume has no subcommands")


def register(top: Any) -> None:
    vsub = _volume_subparsers(top)
    for name, handler, text in (
        ("prepare", _prepare, f"activate a volume on this host and link it at {links.RUN_DIR}/DOMAIN/VOLUME"),
        ("teardown", _teardown, "remove the volume's link and deactivate it on this host"),
    ):
        p = vsub.add_parser(name, help=text)
        p.add_argument("--domain", type=domain_cli._uuid, required=True)
        p.add_argument("--uuid", type=domain_cli._uuid, required=True)
        p.add_argument("--run-dir", default=links.RUN_DIR, help=f"where volume links live (default {links.RUN_DIR})")
        domain_cli._common(p)
        p.set_defaults(func=lambda a, h=handler: _run(h, a))
