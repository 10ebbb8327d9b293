"""``xtnd demo``: the whole system at work on one machine.

    xtnd demo [--hosts 3] [--duration 90] [--chunk-mb 8] [--no-failover] [--json]

What runs (everything real, nothing simulated but the hosts themselves):

- shared storage on loop devices: a master block domain and one more block
  domain per further host, made by ``xtnd domain create``; one thin qcow2
  volume of 1 GiB in each, starting at one chunk;
- ``--hosts`` simulated hosts (xtnd.tools.rig.cluster), each with its own
  sanlock daemon in its own mount namespace and its own host id; hosts 1
  and 2 run ``xtnd spm`` (1 serves, 2 stands by), every host runs ``xtnd
  hsm``, as processes with configs under the work folder;
- one small TCG guest per host writing a known pattern to its volume: the
  first hosts' guests at a steady pace (~1.5 MiB/s), so their HSM extends every few
  seconds before the disk fills; the last host's HSM keeps no headroom
  (utilization 100%), so its guest, writing as fast as it can, runs out of
  space at every chunk: QEMU pauses it (ENOSPC) and the HSM resumes it after
  the extend;
- halfway through, the serving SPM daemon is killed (SIGKILL); the standby
  takes the SPM lease and serves the requests that were waiting; the guests
  keep running.

A live view (rich, a few refreshes a second) shows hosts and roles, the
lease holder and its generation, each volume's allocation / physical size /
capacity, the last extends with their phases (from the HSMs' extend-complete
lines), requests in flight and an event log. At the end: a summary table,
each guest's data check, and the checks that decide the exit code (0: all
passed, 1: a check failed, 2: could not start).

``--json``, or no terminal, prints only the summary as one JSON object.

Everything the demo made (guests, daemons, sanlock daemons and their mount
namespaces, VGs, loop devices, files) is removed at the end, on Ctrl-C or
SIGTERM, and when any part fails; a run killed outright is swept by the
next one. Only one demo runs at a time (a lock under /var/tmp/xtnd-demo).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from types import FrameType
from typing import Any

from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text
from xtnd.common import stats
from xtnd.hsm import metrics as hsm_metrics

log = logging.getLogger("xtnd.demo")

BASE = "/var/tmp/xtnd-demo"
# A failed run's daemon logs and configs are copied here (replaced each time).
LOGS = "/var/tmp/xtnd-demo-logs"
DOMAIN_PREFIX = "xtnd-demo-"
MiB = 1024**2
STEADY_RATE = 3  # MiB/s of the steady guests
FAST_RATE = 0  # as fast as the guest can
EXIT_FAILED = 1
EXIT_CANNOT_START = 2
_SERVING = re.compile(r"serving (started|stopped) host_id=\d+ .*?mono=([\d.]+)")
PHASES = ("wait", "extend", "refresh", "resume", "total")
TOOLS = ("sanlock", "losetup", "lvm", "qemu-img", "qemu-system-x86_64", "setpriv", "unshare", "nsenter", "wipefs")


class CannotStart(Exception):
    """Something the demo needs is missing or in use."""


class Aborted(Exception):
    """A part of the demo failed while it ran."""


# What happened, as the demo saw it


@dataclasses.dataclass
class Extend:
    host: int
    vm: str
    trigger: str
    old_mb: int
    new_mb: int
    phases_ms: dict[str, float]
    at: float  # monotonic


@dataclasses.dataclass
class GuestState:
    host: int
    name: str
    state: str = "defined"
    paused_since: float | None = None
    pauses: list[float] = dataclasses.field(default_factory=list)  # durations
    written_mb: int = 0
    data: str = "pending"  # pending, ok, FAILED: ...


class Tail:
    """The complete lines added to a log file since the last call."""

    def __init__(self, path: str):
        self.path = path
        self.offset = 0
        self.rest = b""

    def lines(self) -> list[str]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        data = self.rest + data
        *lines, self.rest = data.split(b"\n")
        return [line.decode("utf-8", "replace") for line in lines]


class State:
    """Everything the view and the summary show; written by the poller and
    libvirt's event thread, read by the main thread (under lock)."""

    def __init__(self, hosts: int):
        self.lock = threading.Lock()
        self.t0 = time.monotonic()
        self.hosts = hosts
        self.extends: list[Extend] = []
        self.failures = 0
        self.events: collections.deque[tuple[float, str]] = collections.deque(maxlen=200)
        self.guests: dict[str, GuestState] = {}
        self.hsm: dict[int, dict[str, Any]] = {}
        # host -> the last status of its guest's drive (kept after the guest stops).
        self.drives: dict[int, dict[str, Any]] = {}
        self.spm: dict[int, dict[str, Any]] = {}
        self.lease: tuple[int, int] | None = None  # owner host id, generation
        self.killed: tuple[int, float] | None = None  # host, monotonic
        self.took: tuple[int, float] | None = None
        self.phase = "starting"

    def event(self, text: str) -> None:
        with self.lock:
            self.events.append((time.monotonic(), text))
        log.info("%s", text)


# Collecting: daemon logs, control sockets, the lease, libvirt events


class Poller(threading.Thread):
    def __init__(self, cluster: Any, state: State, interval: float = 0.25):
        super().__init__(name="xtnd-demo-poller", daemon=True)
        self.cluster = cluster
        self.state = state
        self.interval = interval
        self.stopping = threading.Event()
        self.error: BaseException | None = None
        self.hsm_tails = {h.host_id: Tail(os.path.join(h.dir, "hsm.log")) for h in cluster.hosts}
        self.spm_tails = {h.host_id: Tail(os.path.join(h.dir, "spm.log")) for h in cluster.hosts if h.spm}
        self._last_lease = 0.0
        self._roles_seen: dict[int, str] = {}

    def run(self) -> None:
        while not self.stopping.wait(self.interval):
            try:
                self.poll()
            except Exception as e:
                log.exception("poller failed")
                self.error = e
                return

    def poll(self) -> None:
        from xtnd.common.control import ControlError
        from xtnd.hsm.control import ControlClient as HsmClient
        from xtnd.spm.control import ControlClient as SpmClient

        st = self.state
        for host in self.cluster.hosts:
            for line in self.hsm_tails[host.host_id].lines():
                self._hsm_line(host.host_id, line)
            if host.host_id in self.spm_tails:
                for line in self.spm_tails[host.host_id].lines():
                    self._spm_line(host.host_id, line)
            try:
                info = HsmClient(host.hsm_socket, timeout=2).call("status")
            except (OSError, ControlError, ValueError):
                info = None
            with st.lock:
                st.hsm[host.host_id] = info or {}
                if info and info.get("drives"):
                    st.drives[host.host_id] = info["drives"][0]
            if host.spm is not None:
                spm: dict[str, Any] = {"role": "killed" if host.spm.killed_at else "down"}
                if host.spm.alive():
                    with contextlib.suppress(OSError, ControlError, ValueError):
                        spm = SpmClient(host.spm_socket, timeout=2).call("status")
                with st.lock:
                    st.spm[host.host_id] = spm
        self._roles()
        now = time.monotonic()
        if now - self._last_lease >= 1.0:
            self._last_lease = now
            with contextlib.suppress(Exception):
                leader = self.cluster.lease_leader()
                with st.lock:
                    st.lease = (leader.owner_id, leader.lver) if leader.held else None
        for host in self.cluster.hosts:
            for proc in (host.hsm, host.spm):
                if proc is not None and not proc.killed_at and not proc.alive() and st.phase == "running":
                    raise Aborted(
                        f"host {host.host_id}: xtnd {proc.command} exited rc={proc.proc.returncode}, see {proc.logfile}"
                    )

    def _hsm_line(self, host: int, line: str) -> None:
        st = self.state
        if "extend-complete " in line:
            f = hsm_metrics.parse_line(line)
            ext = Extend(
                host,
                f.get("vm", "?"),
                f.get("trigger", "?"),
                int(f.get("old_mb", 0)),
                int(f.get("new_mb", 0)),
                {p: float(f.get(f"{p}_ms", 0.0)) for p in PHASES},
                time.monotonic(),
            )
            with st.lock:
                st.extends.append(ext)
        elif "extend-failed " in line:
            with st.lock:
                st.failures += 1
            st.event(f"host {host}: extend failed, will retry ({line.split('error=', 1)[-1][:60]})")

    def _spm_line(self, host: int, line: str) -> None:
        st = self.state
        m = _SERVING.search(line)
        if m is None or m.group(1) != "started":
            return
        mono = float(m.group(2))
        with st.lock:
            killed = st.killed
        if killed is not None and st.took is None and host != killed[0] and mono >= killed[1]:
            with st.lock:
                st.took = (host, mono)
            st.event(f"host {host} took the SPM lease after {mono - killed[1]:.1f} s and serves")
        else:
            st.event(f"host {host}: xtnd spm serving (holds the SPM lease)")

    def _roles(self) -> None:
        """Events for SPM role changes seen through the control sockets."""
        st = self.state
        for hid, spm in list(st.spm.items()):
            role = spm.get("role", "down")
            if role != self._roles_seen.get(hid) and role == "standby":
                st.event(f"host {hid}: xtnd spm standing by, waiting for the SPM lease")
            self._roles_seen[hid] = role


class Lifecycle:
    """Pauses (I/O error: ENOSPC) and resumes of the demo's guests, from libvirt events."""

    def __init__(self, conn: Any, state: State):
        import libvirt

        self.lv = libvirt
        self.conn = conn
        self.state = state
        self.id = conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._event, None)

    def _event(self, conn: Any, dom: Any, event: int, detail: int, opaque: Any) -> None:
        lv = self.lv
        st = self.state
        g = st.guests.get(dom.name())
        if g is None:
            return
        now = time.monotonic()
        if event == lv.VIR_DOMAIN_EVENT_SUSPENDED and detail == lv.VIR_DOMAIN_EVENT_SUSPENDED_IOERROR:
            with st.lock:
                g.paused_since = now
                g.state = "PAUSED (no space)"
        elif event == lv.VIR_DOMAIN_EVENT_RESUMED:
            with st.lock:
                since, g.paused_since = g.paused_since, None
                g.state = "running"
                if since is not None:
                    g.pauses.append(now - since)
            if since is not None:
                st.event(f"host {g.host}: guest paused on ENOSPC, resumed after {now - since:.2f} s")
        elif event == lv.VIR_DOMAIN_EVENT_STARTED:
            with st.lock:
                g.state = "running"
        elif event == lv.VIR_DOMAIN_EVENT_STOPPED:
            with st.lock:
                g.state = "stopped"

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.domainEventDeregisterAny(self.id)


# The view


def _bar(part: int, whole: int, width: int = 24) -> str:
    if whole <= 0:
        return " " * width
    n = max(0, min(width, round(width * part / whole)))
    return "█" * n + "░" * (width - n)


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / MiB:.0f}M"


def view(state: State, duration: float, failover_at: float | None) -> Group:
    """One screen (~30 lines): hosts with their volume, last extends, events."""
    st = state
    with st.lock:
        now = time.monotonic()
        hosts = Table(box=box.SIMPLE_HEAD, expand=True, pad_edge=False)
        for col in ("host", "role", "xtnd spm", "in flight", "extends", "guest", "allocation / physical"):
            hosts.add_column(col)
        hosts.add_column("capacity", justify="right")
        guests = {g.host: g for g in st.guests.values()}
        for hid in range(1, st.hosts + 1):
            spm = st.spm.get(hid)
            hsm = st.hsm.get(hid, {})
            spm_role = spm.get("role", "-") if spm else "-"
            role = "SPM" if spm_role == "serving" else "standby" if spm_role == "standby" else "HSM"
            style = "bold green" if role == "SPM" else "yellow" if role == "standby" else ""
            g = guests.get(hid)
            d = st.drives.get(hid)
            volume = Text("-")
            if d is not None:
                volume = Text(_bar(d["allocation"], d["physical"], 16), style="cyan")
                volume.append(f" {_mib(d['allocation'])} / {_mib(d['physical'])}", style="")
            in_flight = hsm.get("in_flight", "-") if hsm else "HSM down"
            hosts.add_row(
                f"host {hid}",
                Text(role, style=style),
                Text(spm_role, style="bold red" if spm_role == "killed" else ""),
                str(in_flight),
                str(sum(1 for e in st.extends if e.host == hid)),
                Text(g.state if g else "-", style="bold red" if g and g.paused_since else ""),
                volume,
                _mib(d["capacity"]) if d else "-",
            )
        extends = Table(box=box.SIMPLE_HEAD, expand=True, pad_edge=False)
        for col in ("ago", "host", "trigger", "MiB", *(f"{p} ms" for p in PHASES)):
            extends.add_column(col, justify="right")
        for e in st.extends[-5:][::-1]:
            extends.add_row(
                f"{now - e.at:.0f}s",
                str(e.host),
                e.trigger,
                f"{e.old_mb}→{e.new_mb}",
                *(f"{e.phases_ms[p]:.0f}" for p in PHASES),
            )
        events = Text("\n".join(f"{t - st.t0:6.1f}s  {text}" for t, text in list(st.events)[-7:]))
        elapsed = now - st.t0
        head = f"[bold]xtnd demo[/]  {st.phase}  {elapsed:.0f}s / ~{duration:.0f}s of writing"
        if failover_at is not None and st.killed is None:
            head += f"   SPM failover in {max(0.0, failover_at - now):.0f}s"
        pauses = sum(len(g.pauses) for g in st.guests.values())
        head += f"   extends {len(st.extends)}  ENOSPC pauses {pauses}"
        lease = f"held by host {st.lease[0]}, generation {st.lease[1]}" if st.lease else "free"
        head += f"\n[bold]SPM lease:[/] {lease}"
    return Group(
        Text.from_markup(head),
        hosts,
        Text("last extends (HSM extend-complete lines)", style="bold"),
        extends,
        Panel(events, title="events", title_align="left"),
    )


# Summary


def _phase_figures(extends: list[Extend]) -> dict[str, dict[str, float | None]]:
    out: dict[str, dict[str, float | None]] = {}
    for p in PHASES:
        values = sorted(e.phases_ms[p] for e in extends)
        out[p] = {
            "p50": round(stats.percentile(values, 50), 1) if values else None,
            "p99": round(stats.percentile(values, 99), 1) if values else None,
            "max": round(values[-1], 1) if values else None,
        }
    return out


def failover_planned(args: argparse.Namespace) -> bool:
    return not args.no_failover and args.hosts >= 2


def summarize(state: State, args: argparse.Namespace, lost: int, started: float) -> dict[str, Any]:
    st = state
    with st.lock:
        phases = _phase_figures(st.extends)
        pauses = sum(len(g.pauses) + (1 if g.paused_since else 0) for g in st.guests.values())
        resumed = sum(len(g.pauses) for g in st.guests.values())
        paused_s = sum(sum(g.pauses) for g in st.guests.values())
        failover = round(st.took[1] - st.killed[1], 2) if st.took and st.killed else None
        guests = [
            {"host": g.host, "name": g.name, "written_mb": g.written_mb, "pauses": len(g.pauses), "data": g.data}
            for g in sorted(st.guests.values(), key=lambda g: g.host)
        ]
        summary: dict[str, Any] = {
            "hosts": st.hosts,
            "extends": len(st.extends),
            "extends_by_trigger": dict(collections.Counter(e.trigger for e in st.extends)),
            "extend_failures": st.failures,
            "pauses": pauses,
            "resumed": resumed,
            "paused_s": round(paused_s, 2),
            "failover": failover_planned(args),
            "failover_s": failover,
            "killed_spm_host": st.killed[0] if st.killed else None,
            "new_spm_host": st.took[0] if st.took else None,
            "lease_generation": st.lease[1] if st.lease else None,
            "lost": lost,
            "guest_data_ok": bool(guests) and all(g["data"] == "ok" for g in guests),
            "guests": guests,
            "p50_ms": phases["total"]["p50"],
            "p99_ms": phases["total"]["p99"],
            "max_ms": phases["total"]["max"],
            "phases_ms": phases,
            "chunk_mb": args.chunk_mb,
            "duration_s": round(time.monotonic() - started, 1),
            "load": _loadavg(),
        }
    checks = {
        "extends": summary["extends"] > 0,
        "no_requests_lost": lost == 0,
        "guest_data_ok": summary["guest_data_ok"],
        # With two hosts or more the last one's guest has no headroom: it must pause.
        "pauses_resumed": pauses == resumed and (resumed > 0 or args.hosts < 2),
    }
    if failover_planned(args):
        checks["failover"] = failover is not None
    summary["checks"] = checks
    summary["ok"] = all(checks.values())
    return summary


def _loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def print_summary(console: Console, s: dict[str, Any]) -> None:
    t = Table(title="summary", title_justify="left")
    t.add_column("")
    t.add_column("value", justify="right")
    t.add_row("hosts", str(s["hosts"]))
    triggers = ", ".join(f"{k} {v}" for k, v in sorted(s["extends_by_trigger"].items()))
    t.add_row("extends", f"{s['extends']} ({triggers or '-'})")
    t.add_row("extend attempts failed and retried", str(s["extend_failures"]))
    t.add_row("pauses (ENOSPC) / resumed", f"{s['pauses']} / {s['resumed']}")
    t.add_row("time paused", f"{s['paused_s']:.2f} s")
    if s["failover"]:
        fo = f"{s['failover_s']:.2f} s" if s["failover_s"] is not None else "NO TAKEOVER"
        t.add_row("SPM failover", f"host {s['killed_spm_host']} killed, host {s['new_spm_host']} serving after {fo}")
    t.add_row("requests lost", str(s["lost"]))
    console.print(t)
    lat = Table(title="extend latency per phase (ms, HSM extend-complete lines)", title_justify="left")
    lat.add_column("phase")
    for col in ("p50", "p99", "max"):
        lat.add_column(col, justify="right")
    for p in PHASES:
        f = s["phases_ms"][p]
        lat.add_row(p, *("-" if f[k] is None else f"{f[k]:.1f}" for k in ("p50", "p99", "max")))
    console.print(lat)
    g = Table(title="guest data check", title_justify="left")
    for col in ("host", "guest", "written", "pauses", "data"):
        g.add_column(col)
    for row in s["guests"]:
        ok = row["data"] == "ok"
        g.add_row(
            str(row["host"]),
            row["name"],
            f"{row['written_mb']} MiB",
            str(row["pauses"]),
            Text(row["data"], style="green" if ok else "bold red"),
        )
    console.print(g)
    for name, ok in s["checks"].items():
        console.print(Text(f"{'PASS' if ok else 'FAIL'}  {name}", style="green" if ok else "bold red"))
    if s.get("left_behind"):
        console.print(Text(f"left behind: {', '.join(s['left_behind'])}", style="bold red"))
    console.print(f"{s['duration_s']:.0f} s, load average {s['load']}")


# Running it


def preflight() -> None:
    """Raise CannotStart naming the first thing missing."""
    if os.geteuid() != 0:
        raise CannotStart("needs root (loop devices, LVM, sanlock, libvirt): run `bash tools/run.sh demo`")
    for tool in TOOLS:
        if shutil.which(tool) is None:
            raise CannotStart(f"{tool} is not installed (bash tools/run.sh setup installs what the demo needs)")
    from xtnd.tools.rig import sanlockd

    reason = sanlockd.missing()
    if reason:
        raise CannotStart(f"cannot run sanlock daemons: {reason}")


@contextlib.contextmanager
def demo_lock() -> Iterator[None]:
    """One demo at a time: it sweeps what earlier runs left under BASE."""
    os.makedirs(BASE, mode=0o755, exist_ok=True)
    fd = os.open(os.path.join(BASE, "lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise CannotStart(f"another xtnd demo is running (pid {other}; its lock: {BASE}/lock)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)


def _raise_interrupt(signo: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signo).name)


class Demo:
    def __init__(self, args: argparse.Namespace, console: Console, live: bool):
        self.args = args
        self.console = console
        self.live = live
        self.state = State(args.hosts)
        self.cluster: Any = None
        self.conn: Any = None
        self.events: Any = None
        self.lifecycle: Lifecycle | None = None
        self.guests: list[Any] = []
        self.poller: Poller | None = None
        self.workdir = ""
        self.saved_logs: str | None = None

    def say(self, msg: str) -> None:
        if self.live:
            self.console.print(msg)
        else:
            log.info("%s", msg)

    def run(self) -> dict[str, Any]:
        import libvirt
        from xtnd.hsm.libvirtconn import EventLoop
        from xtnd.tools.rig import cluster, guest

        args = self.args
        started = time.monotonic()
        try:
            guest.start_libvirt()
            rig = guest.build_rig()
        except guest.RigUnavailable as e:
            raise CannotStart(f"no guest rig: {e}") from None
        except (OSError, subprocess.CalledProcessError) as e:
            raise CannotStart(f"cannot start libvirtd: {e}") from None
        self.events = EventLoop(name="xtnd-demo-libvirt-events")
        self.events.start()
        self.conn = libvirt.open("qemu:///system")
        left = cluster.sweep(BASE, DOMAIN_PREFIX, self.conn)
        if left:
            self.say(f"removed what an earlier run left: {', '.join(left)}")
        self.workdir = os.path.join(BASE, f"run-{os.getpid()}")
        os.makedirs(self.workdir)
        os.chmod(self.workdir, 0o755)  # QEMU (another user) opens the volume links under it
        spec = cluster.ClusterSpec(
            hosts=args.hosts,
            spm_hosts=min(2, args.hosts),
            chunk_mb=args.chunk_mb,
            utilization={args.hosts: 100} if args.hosts > 1 else {},
        )
        self.cluster = cluster.Cluster(spec, self.workdir, progress=self.say)
        self.cluster.start()
        self.lifecycle = Lifecycle(self.conn, self.state)
        for host in self.cluster.hosts:
            fast = host.host_id == args.hosts and args.hosts > 1
            workload = guest.Workload(
                write_mb=900, rate=FAST_RATE if fast else STEADY_RATE, seconds=int(args.duration), verify=True
            )
            g = guest.Guest.define(
                self.conn, rig, host.volumes[0], workload, host.dir, prefix=f"{DOMAIN_PREFIX}h{host.host_id}-"
            )
            self.guests.append(g)
            self.state.guests[g.name] = GuestState(host.host_id, g.name)
        for g in self.guests:
            g.start()
        self.say(f"{len(self.guests)} guests started, each writing to its thin volume for {args.duration:.0f} s")
        for g in self.guests:
            g.wait_console("XTND-START", timeout=180)
        st = self.state
        st.t0 = time.monotonic()
        st.phase = "running"
        self.poller = Poller(self.cluster, st)
        self.poller.start()
        failover_at = st.t0 + args.duration / 2 if failover_planned(args) else None
        deadline = st.t0 + args.duration + 180
        if self.live:
            with Live(view(st, args.duration, failover_at), console=self.console, refresh_per_second=4) as live:
                self._loop(failover_at, deadline, lambda: live.update(view(st, args.duration, failover_at)))
        else:
            self._loop(failover_at, deadline, lambda: None)
        st.phase = "finishing"
        lost = self._lost()
        return summarize(st, args, lost, started)

    def _loop(self, failover_at: float | None, deadline: float, refresh: Any) -> None:
        while True:
            now = time.monotonic()
            if self.poller is not None and self.poller.error is not None:
                raise Aborted(str(self.poller.error))
            if failover_at is not None and now >= failover_at and self.state.killed is None:
                self._kill_spm()
            if self._guests_done():
                # The last pass: extends and events up to now.
                if self.poller is not None:
                    self.poller.poll()
                refresh()
                return
            if now > deadline:
                late = [f"host {g.host}" for g in self.state.guests.values() if g.data == "pending"]
                raise Aborted(f"guests did not finish their data check in time: {', '.join(late)}")
            refresh()
            time.sleep(0.25)

    def _kill_spm(self) -> None:
        host = self.cluster.serving_spm()
        if host is None:
            raise Aborted("no SPM is serving at failover time")
        assert host.spm is not None
        killed = host.spm.kill()
        with self.state.lock:
            self.state.killed = (host.host_id, killed)
        self.state.event(f"host {host.host_id}: xtnd spm killed (SIGKILL) while serving")

    def _guests_done(self) -> bool:
        from xtnd.tools.rig.guest import GuestFailed

        done = True
        for g in self.guests:
            gs = self.state.guests[g.name]
            if gs.data != "pending":
                continue
            text = g.console()
            for line in text.splitlines():
                if line.startswith("XTND-WRITE-DONE mb="):
                    gs.written_mb = int(line.split("=", 1)[1])
            if "XTND-VERIFY-OK" in text:
                gs.data = "ok"
                self.state.event(f"host {gs.host}: guest wrote {gs.written_mb} MiB, read it back: data intact")
                continue
            try:
                g.wait_console("XTND-VERIFY-OK", timeout=0)
            except GuestFailed as e:
                gs.data = f"FAILED: {str(e).splitlines()[0]}"
                self.state.event(f"host {gs.host}: guest data check failed")
                continue
            except AssertionError:
                pass  # not yet
            done = False
        return done

    def _lost(self) -> int:
        """Requests the HSMs sent that no reply answered (waits for in-flight ones to drain)."""
        from xtnd.common.control import ControlError
        from xtnd.hsm.control import ControlClient

        deadline = time.monotonic() + 30
        while True:
            lost = 0
            in_flight = 0
            for host in self.cluster.hosts:
                try:
                    info = ControlClient(host.hsm_socket, timeout=5).call("status")
                except (OSError, ControlError, ValueError):
                    return -1
                mbx = info["mailbox"]
                in_flight += info["in_flight"]
                lost += mbx["submitted"] - mbx["replies"]
            if in_flight == 0 or time.monotonic() > deadline:
                return lost
            time.sleep(0.2)

    def save_logs(self) -> str | None:
        """Copy the run's logs and configs to LOGS; its path (None if nothing to copy)."""
        if not self.workdir or not os.path.isdir(self.workdir):
            return None
        shutil.rmtree(LOGS, ignore_errors=True)
        for root, _, files in os.walk(self.workdir):
            for name in files:
                if name.endswith((".log", ".conf", ".console", ".json")):
                    rel = os.path.relpath(os.path.join(root, name), self.workdir)
                    os.makedirs(os.path.dirname(os.path.join(LOGS, rel)), exist_ok=True)
                    with contextlib.suppress(OSError):
                        shutil.copy(os.path.join(root, name), os.path.join(LOGS, rel))
        return LOGS

    def close(self, keep_logs: bool = False) -> list[str]:
        """Remove everything (first copying the logs if keep_logs); what could not be removed."""
        problems = []
        if self.poller is not None:
            self.poller.stopping.set()
            self.poller.join(5)
        for g in self.guests:
            g.remove()
        if self.lifecycle is not None:
            self.lifecycle.close()
        started: list[tuple[str, int]] = []
        if self.cluster is not None:
            started = self.cluster.processes()
            problems += self.cluster.stop()
        for what, pid in started:
            # Reaped by stop(): a pid still there is no longer ours, unless it is a zombie of ours.
            with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[1]) == os.getpid():
                    problems.append(f"{what} (pid {pid})")
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.close()
        if self.events is not None:
            self.events.stop()
        if keep_logs:
            with contextlib.suppress(OSError):
                self.saved_logs = self.save_logs()
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return problems + leftovers(self.workdir) if self.workdir else problems


def leftovers(workdir: str) -> list[str]:
    """What of a run is still there: guests, loop devices, folders, processes."""
    from xtnd.tools.rig import loops

    found = []
    with contextlib.suppress(Exception):
        import libvirt

        conn = libvirt.open("qemu:///system")
        try:
            found += [f"libvirt domain {d.name()}" for d in conn.listAllDomains() if d.name().startswith(DOMAIN_PREFIX)]
        finally:
            conn.close()
    for name in os.listdir("/sys/block"):
        with contextlib.suppress(OSError), open(f"/sys/block/{name}/loop/backing_file") as f:
            if f.read().strip().startswith(workdir + "/"):
                found.append(f"loop device /dev/{name}")
    if os.path.exists(workdir):
        found.append(f"folder {workdir}")
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{entry}/cmdline", "rb") as f:
                if workdir.encode() in f.read():
                    found.append(f"process {entry}")
    del loops
    return found


def _run(args: argparse.Namespace) -> int:
    console = Console()
    as_json = args.json or not console.is_terminal
    if not 1 <= args.hosts <= 8:
        print("xtnd demo: --hosts must be 1..8", file=sys.stderr)
        return EXIT_CANNOT_START
    if args.duration < 10:
        print("xtnd demo: --duration must be at least 10 seconds", file=sys.stderr)
        return EXIT_CANNOT_START
    if args.chunk_mb < 4 or args.chunk_mb % 4:
        print("xtnd demo: --chunk-mb must be a multiple of 4 (the demo's LVM extent size)", file=sys.stderr)
        return EXIT_CANNOT_START
    old = {s: signal.signal(s, _raise_interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    demo: Demo | None = None
    left: list[str] = []
    summary: dict[str, Any] | None = None
    error: str | None = None
    rc = 0
    try:
        preflight()
        with demo_lock():
            demo = Demo(args, console, live=not as_json)
            try:
                summary = demo.run()
            except CannotStart:
                raise
            except KeyboardInterrupt:
                error, rc = "interrupted: everything it made was removed", 130
            except (Aborted, AssertionError, OSError, subprocess.CalledProcessError) as e:
                error, rc = f"failed: {(str(e).splitlines() or ['?'])[0]}", EXIT_FAILED
                log.debug("demo failed", exc_info=True)
            except Exception as e:
                error, rc = f"failed: {type(e).__name__}: {(str(e).splitlines() or ['?'])[0]}", EXIT_FAILED
                log.debug("demo failed", exc_info=True)
            finally:
                if not as_json and summary is None:
                    console.print("removing everything the demo made…")
                # A second Ctrl-C must not cut the cleanup short.
                sigint = signal.signal(signal.SIGINT, signal.SIG_IGN)
                try:
                    left = demo.close(keep_logs=error is not None or not (summary or {}).get("ok", False))
                finally:
                    signal.signal(signal.SIGINT, sigint)
    except CannotStart as e:
        print(f"xtnd demo: cannot start: {e}", file=sys.stderr)
        return EXIT_CANNOT_START
    except KeyboardInterrupt:
        print("xtnd demo: interrupted", file=sys.stderr)
        return 130
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    if demo is not None and demo.saved_logs:
        print(f"xtnd demo: logs of this run: {demo.saved_logs}", file=sys.stderr)
    if error is not None:
        if demo is not None and demo.workdir and demo.saved_logs:
            error = error.replace(demo.workdir, demo.saved_logs)
        print(f"xtnd demo: {error}", file=sys.stderr)
        if left:
            print(f"xtnd demo: left behind: {', '.join(left)}", file=sys.stderr)
        return rc
    assert summary is not None
    summary["left_behind"] = left
    summary["checks"]["nothing_left_behind"] = not left
    summary["ok"] = all(summary["checks"].values())
    if as_json:
        json.dump(summary, sys.stdout)
        print()
    else:
        print_summary(console, summary)
    return 0 if summary["ok"] else EXIT_FAILED


def register(sub: Any) -> None:
    p = sub.add_parser(
        "demo", help="the whole system on one machine: hosts, SPM failover, guests filling thin disks (root)"
    )
    p.add_argument("--hosts", type=int, default=3, help="simulated hosts, each with a guest (default 3)")
    p.add_argument("--duration", type=float, default=90.0, help="seconds the guests write (default 90)")
    p.add_argument("--chunk-mb", type=int, default=8, help="MiB added by one extend (default 8)")
    p.add_argument("--no-failover", action="store_true", help="do not kill the serving SPM halfway")
    p.add_argument("--json", action="store_true", help="print only the summary, as one JSON object")
    p.set_defaults(func=_run)
