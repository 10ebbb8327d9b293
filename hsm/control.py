"""The HSM's local control socket: status and runtime log levels.

Transport and protocol: xtnd.common.control (root only, JSON lines) at
``[host] control_socket`` (default /run/xtnd/hsm.sock). Ops: ping,
status, log_level, and replicate_start, replicate_end, replicate_status
(the copy of a drive to another domain, told by ``xtnd volume move``;
see xtnd.hsm.replicate).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from xtnd.common import control as base
from xtnd.common.control import ControlServer, Op

if TYPE_CHECKING:
    from xtnd.hsm.daemon import HSM

__all__ = ["DEFAULT_SOCKET", "ControlClient", "ControlError", "ControlServer", "ops", "status"]

DEFAULT_SOCKET = "/run/xtnd/hsm.sock"


class ControlError(base.ControlError):
    """The HSM refused or failed a control request."""

    peer = "HSM"


class ControlClient(base.ControlClient):
    error = ControlError


def ops(hsm: HSM) -> dict[str, Op]:
    return {
        "ping": lambda args: "pong",
        "status": lambda args: status(hsm),
        "log_level": base.set_log_level,
        "replicate_start": lambda args: hsm.replicator.begin(
            str(args["vm_uuid"]),
            str(args["drive"]),
            bool(args["src_block"]),
            str(args["dst_domain"]),
            str(args["dst_volume"]),
            bool(args["dst_block"]),
            int(args["dst_physical"]),
        ).to_dict(),
        "replicate_end": lambda args: hsm.replicator.end(
            str(args["vm_uuid"]), str(args["drive"]), str(args["outcome"])
        ).to_dict(),
        "replicate_status": lambda args: _replica(hsm, str(args["vm_uuid"]), str(args["drive"])),
    }


def _replica(hsm: HSM, vm_id: str, drive: str) -> dict[str, Any] | None:
    replica = hsm.replicator.get(vm_id, drive)
    return replica.to_dict() if replica else None


def status(hsm: HSM, now: float | None = None) -> dict[str, Any]:
    """This host's HSM: connection, requests in flight, every watched drive."""
    monitor = hsm.monitor
    clock = monitor.clock()
    wall = time.time() if now is None else now
    last: dict[tuple[str, str], Any] = {}
    for record in list(monitor.records):
        last[(record.vm, record.drive)] = record
    names = monitor.vm_names()
    drives = []
    for vm_id, vm_drives in sorted(monitor.snapshot().items()):
        for name, d in sorted(vm_drives.items()):
            r = last.get((vm_id, name))
            drives.append(
                {
                    "vm": names.get(vm_id, vm_id),
                    "vm_uuid": vm_id,
                    "drive": name,
                    "domain": d.domain_id,
                    "volume": d.volume_id,
                    "state": d.state.value,
                    "allocation": d.allocation,
                    "physical": d.physical,
                    "capacity": d.capacity,
                    "disabled_reason": d.disabled_reason.value if d.disabled_reason else None,
                    "last_extend": round(wall - (clock - r.t_done), 3) if r else None,
                    "last_extend_ms": round(r.total * 1000, 1) if r else None,
                }
            )
    return {
        "role": "hsm",
        "host_id": hsm.config.host.host_id,
        "master_domain": hsm.config.host.master_domain,
        "libvirt_connected": hsm.connection.is_connected(),
        "in_flight": hsm.mailbox.in_flight,
        "counters": dict(monitor.counters),
        "mailbox": dict(hsm.mailbox.stats),
        "drives": drives,
        # Drives being copied to another domain (xtnd volume move).
        "replications": [r.to_dict() for r in hsm.replicator.replicas()],
    }
