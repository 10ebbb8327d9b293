"""``xtnd status`` and ``xtnd spm|hsm log-level``: the daemons' control sockets.

    xtnd status [--json] [--spm-config FILE] [--hsm-config FILE]
    xtnd spm log-level LOGGER LEVEL [--socket PATH]
    xtnd hsm log-level LOGGER LEVEL [--socket PATH]

The configs (default /etc/xtnd/spm.conf and hsm.conf) name the control
sockets; a daemon whose config file does not exist is not expected on this
host. Exit codes of ``xtnd status``:

    0  healthy: every configured daemon answers and has nothing to report
    1  degraded: a daemon answers but reports a problem (HSM without
       libvirt, a drive waiting for a retry or disabled for an improbable
       allocation, an SPM starting or stopping)
    2  bad usage, an unreadable config, or not run as root
    3  down: a configured daemon does not answer, or none is configured
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from typing import Any

from xtnd.common import control

HEALTHY, DEGRADED, USAGE, DOWN = 0, 1, 2, 3
STATUS_NAMES = {HEALTHY: "healthy", DEGRADED: "degraded", DOWN: "down"}
DEFAULT_SPM_CONFIG = "/etc/xtnd/spm.conf"
DEFAULT_HSM_CONFIG = "/etc/xtnd/hsm.conf"
TIMEOUT = 10.0


class ConfigProblem(Exception):
    """A config that names the socket cannot be read."""


def spm_socket(path: str) -> str:
    from xtnd.spm import config as spm_config

    try:
        return spm_config.load(path).spm.control_socket
    except (spm_config.ConfigError, OSError) as e:
        raise ConfigProblem(str(e)) from None


def hsm_socket(path: str) -> str:
    from xtnd.hsm import config as hsm_config

    try:
        return hsm_config.load(path).host.control_socket
    except (hsm_config.ConfigError, OSError) as e:
        raise ConfigProblem(str(e)) from None


def ask(sock: str, op: str, **args: Any) -> Any:
    """One request; raises control.ControlError (with a one-line message) on any failure."""
    if not sock:
        raise control.ControlError("Disabled", "the control socket is disabled in the config")
    try:
        return control.ControlClient(sock, timeout=TIMEOUT).call(op, **args)
    except FileNotFoundError:
        raise control.ControlError("NotRunning", f"not running (no socket {sock})") from None
    except ConnectionRefusedError:
        raise control.ControlError("NotRunning", f"not running (stale socket {sock})") from None
    except PermissionError:
        raise control.ControlError("PermissionError", f"root only ({sock})") from None
    except (OSError, ValueError) as e:
        raise control.ControlError("Unreachable", f"cannot talk to {sock}: {e}") from None


# xtnd status


def _when(ts: float | None, now: float) -> str:
    if not ts:
        return "-"
    stamp = datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")
    ago = max(0, int(now - ts))
    return f"{stamp} ({ago // 3600}h{ago % 3600 // 60:02d}m{ago % 60:02d}s ago)"


def _mib(n: int) -> str:
    return f"{n / 1024**2:.0f}M"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "no forecast"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def _domain_line(d: dict[str, Any]) -> str:
    """One managed domain: free space, consumption rate, time to full."""
    free = _mib(d["free_bytes"]) if d["free_bytes"] is not None else "?"
    rate = d["rate_bytes_per_s"] / (1024 * 1024)
    left = _duration(d["seconds_to_full"])
    return f"  domain {d['domain']} free {free}  consumed {rate:.2f} MiB/s  time to full: {left}"


def _spm_health(spm: dict[str, Any]) -> tuple[int, list[str]]:
    if spm["role"] in ("serving", "standby"):
        return HEALTHY, []
    return DEGRADED, [f"SPM is {spm['role']}"]


def _hsm_health(hsm: dict[str, Any]) -> tuple[int, list[str]]:
    problems = []
    if not hsm["libvirt_connected"]:
        problems.append("HSM is not connected to libvirt")
    for d in hsm["drives"]:
        if d["state"] == "exceeded":
            problems.append(f"drive {d['vm']}/{d['drive']} needs space (extend pending or failed)")
        if d["disabled_reason"] == "improbable-allocation":
            problems.append(f"drive {d['vm']}/{d['drive']} disabled: improbable allocation")
    return (DEGRADED if problems else HEALTHY), problems


def collect(spm_config: str, hsm_config: str) -> dict[str, Any]:
    """The status document of this host (what --json prints)."""
    report: dict[str, Any] = {"spm": None, "hsm": None, "problems": []}
    level = HEALTHY
    configured = 0
    for name, path, socket_of, health in (
        ("spm", spm_config, spm_socket, _spm_health),
        ("hsm", hsm_config, hsm_socket, _hsm_health),
    ):
        if not os.path.exists(path):
            continue
        configured += 1
        sock = socket_of(path)
        try:
            info = ask(sock, "status")
        except control.ControlError as e:
            report[name] = {"role": "down", "socket": sock, "error": e.message}
            report["problems"].append(f"{name.upper()} down: {e.message}")
            level = max(level, DOWN)
            continue
        info["socket"] = sock
        report[name] = info
        rc, problems = health(info)
        report["problems"] += problems
        level = max(level, rc)
    if not configured:
        report["problems"].append(f"no daemon configured here (neither {spm_config} nor {hsm_config} exists)")
        level = DOWN
    report["status"] = STATUS_NAMES[level]
    report["exit_code"] = level
    return report


def render(report: dict[str, Any], now: float | None = None) -> str:
    now = time.time() if now is None else now
    out = []
    spm = report["spm"]
    if spm is not None:
        if spm["role"] == "down":
            out.append(f"SPM  down       {spm['error']}")
        else:
            holder = spm["lease_holder"]
            who = "this host" if holder == spm["host_id"] else f"host {holder}" if holder else "unknown"
            out.append(
                f"SPM  {spm['role']:<10} host_id={spm['host_id']} lease holder: {who} since "
                f"{_when(spm['lease_holder_since'], now)}  in flight: {spm['in_flight']}"
            )
            out += [_domain_line(d) for d in spm.get("domains") or []]
    hsm = report["hsm"]
    if hsm is not None:
        if hsm["role"] == "down":
            out.append(f"HSM  down       {hsm['error']}")
        else:
            libvirt = "connected" if hsm["libvirt_connected"] else "NOT CONNECTED"
            out.append(
                f"HSM  running    host_id={hsm['host_id']} libvirt: {libvirt}  in flight: {hsm['in_flight']}  "
                f"drives: {len(hsm['drives'])}"
            )
            rows = [("VM", "DRIVE", "VOLUME", "STATE", "ALLOC", "PHYS", "CAPACITY", "LAST EXTEND", "TOOK")]
            for d in hsm["drives"]:
                last = _when(d["last_extend"], now) if d["last_extend"] else "-"
                took = f"{d['last_extend_ms']:.0f}ms" if d["last_extend_ms"] is not None else "-"
                rows.append(
                    (
                        d["vm"], d["drive"], d["volume"][:8], d["state"], _mib(d["allocation"]),
                        _mib(d["physical"]), _mib(d["capacity"]), last, took,
                    )
                )  # fmt: skip
            if len(rows) > 1:
                widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
                out += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
            copies = hsm.get("replications") or []
            if copies:
                out.append("Copies to other domains:")
                out += [
                    f"  {c['vm_uuid']} {c['drive']} -> {c['dst_volume'][:8]}: {c['phase']}, extends src="
                    f"{c['extends_src']} dst={c['extends_dst']}"
                    for c in copies
                ]
            disabled = [d for d in hsm["drives"] if d["state"] == "disabled"]
            if disabled:
                out.append("Disabled drives:")
                out += [f"  {d['vm']} {d['drive']}: {d['disabled_reason']}" for d in disabled]
    out += [f"problem: {p}" for p in report["problems"]]
    out.append(f"status: {report['status']}")
    return "\n".join(out) + "\n"


def _status(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("xtnd status: must run as root (the control sockets are root only)", file=sys.stderr)
        return USAGE
    try:
        report = collect(args.spm_config, args.hsm_config)
    except ConfigProblem as e:
        print(f"xtnd status: {e}", file=sys.stderr)
        return USAGE
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        sys.stdout.write(render(report))
    rc: int = report["exit_code"]
    return rc


# xtnd spm|hsm log-level


def log_level(daemon: str, args: argparse.Namespace) -> int:
    try:
        sock = args.socket or (spm_socket if daemon == "spm" else hsm_socket)(args.config)
        result = ask(sock, "log_level", logger=args.logger, level=args.level)
    except (ConfigProblem, control.ControlError) as e:
        print(f"xtnd {daemon} log-level: {e.message if isinstance(e, control.ControlError) else e}", file=sys.stderr)
        return 1
    print(f"{result['logger']}: {result['previous']} -> {result['level']}")
    return 0


def add_log_level(sub: Any, daemon: str) -> None:
    p = sub.add_parser(
        "log-level",
        help=f"change one logger's level in the running {daemon.upper()} daemon (no restart)",
        description=f"Set LOGGER (e.g. xtnd.mailbox, or root) to LEVEL in the running {daemon.upper()} daemon, "
        "through its control socket, until the next change or restart.",
    )
    p.add_argument("logger", metavar="LOGGER", help="logger name, e.g. xtnd.mailbox, xtnd.spm, root")
    p.add_argument("level", metavar="LEVEL", type=str.upper, choices=control.LEVELS, help="DEBUG, INFO, WARNING, ...")
    p.add_argument("--socket", help="control socket (default: the one the daemon's --config names)")
    p.set_defaults(func=lambda args: log_level(daemon, args))


def register(top: Any) -> None:
    p = top.add_parser(
        "status",
        help="this host's xtnd daemons: role, lease holder, watched drives (exit 0 healthy, 1 degraded, 3 down)",
        description="Ask the local SPM and HSM daemons (their control sockets, named by their configs) how they "
        "are. Exit code: 0 healthy, 1 degraded, 2 bad usage or config, 3 down.",
    )
    p.add_argument("--json", action="store_true", help="print the status document as JSON")
    p.add_argument("--spm-config", default=DEFAULT_SPM_CONFIG, help="SPM config (default %(default)s)")
    p.add_argument("--hsm-config", default=DEFAULT_HSM_CONFIG, help="HSM config (default %(default)s)")
    p.set_defaults(func=_status)
