"""``xtnd mailbox bench``: mailbox roundtrip latency and idle cost.

An SPM and N HSMs run as separate processes over one inbox/outbox pair on
real storage (files under /var/tmp or loop devices), as on a cluster. The
SPM's handler grants every request at once, so the figures are the
mailbox's own: latency from submit() to the reply reaching the HSM.

Phases: idle (nothing in flight: SPM CPU and storage I/O per second, which
is what an idle cluster pays), then rounds where every HSM submits M
requests at once and waits for all replies.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import multiprocessing
import multiprocessing.connection
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from typing import Any

from xtnd.common import cmd, stats
from xtnd.mailbox import codec, directio
from xtnd.mailbox.hsm import HSMConfig
from xtnd.mailbox.spm import SPMConfig, SPMMailbox, Wave
from xtnd.tools.mailbox_hsms import hsm_main
from xtnd.tools.mailbox_lean import lean_main

_mp = multiprocessing.get_context("fork")
# The SPM process starts fresh, as the daemon does: a forked one shares the
# bench's pages copy-on-write, and its first wave paid ~35 ms of CPU copying
# them (I/O thread CPU of the first wave ~55 ms against ~20 ms for the next).
_spawn = multiprocessing.get_context("spawn")


@dataclasses.dataclass
class Mailbox:
    inbox: str
    outbox: str
    max_hosts: int


def _area_size(max_hosts: int) -> int:
    # As on a block domain: 16 MiB LVs of which (max_hosts+1) blocks are used.
    return max(16 * 1024**2, (max_hosts + 1) * codec.BLOCK_SIZE)


@contextlib.contextmanager
def make_mailbox(storage: str, max_hosts: int, base: str = "/var/tmp") -> Iterator[Mailbox]:
    """Fresh zeroed inbox/outbox on files or loop devices, removed after."""
    workdir = tempfile.mkdtemp(prefix="xtnd-bench-", dir=base)
    devices: list[str] = []
    try:
        paths = []
        for name in ("inbox", "outbox"):
            path = os.path.join(workdir, name)
            with open(path, "wb") as f:
                f.truncate(_area_size(max_hosts))
            if storage == "loop":
                dev = cmd.run(["losetup", "--find", "--show", "--sector-size", "512", path]).decode().strip()
                devices.append(dev)
                path = dev
            paths.append(path)
        yield Mailbox(paths[0], paths[1], max_hosts)
    finally:
        for dev in devices:
            cmd.run(["losetup", "--detach", dev], check=False)
        shutil.rmtree(workdir, ignore_errors=True)


def _cpu_seconds(pid: int) -> float:
    """CPU time of process ``pid``: the sum of its threads' schedstat run
    times (nanoseconds; /proc/PID/stat counts 10 ms clock ticks, too coarse
    for an idle SPM over a few seconds), or clock ticks where missing."""
    try:
        total = 0
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        return total / 1e9
    except (OSError, ValueError, IndexError):
        pass
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _spm_main(box: Mailbox, config: SPMConfig, conn: Connection) -> None:
    inbox = directio.DirectFile(box.inbox)
    outbox = directio.DirectFile(box.outbox)
    spm = SPMMailbox(inbox, outbox, box.max_hosts, config)
    spm.register(codec.EXTEND_OPCODE, lambda req: req.message.size_mb)
    spm.start()
    conn.send("ready")
    while True:
        cmd = conn.recv()
        if cmd == "stats":
            conn.send(
                {
                    "reads": inbox.counters.reads + outbox.counters.reads,
                    "writes": inbox.counters.writes + outbox.counters.writes,
                    "active": spm.active,
                    **spm.stats,
                }
            )
        elif cmd == "waves":
            # The waves since last asked (spm.Wave).
            conn.send([spm.waves.popleft() for _ in range(len(spm.waves))])
        elif cmd == "stop":
            spm.stop()
            conn.send("stopped")
            return


class Cluster:
    """An SPM process and N HSM processes over one mailbox."""

    def __init__(
        self,
        box: Mailbox,
        hosts: int,
        spm_config: SPMConfig,
        hsm_config: HSMConfig,
        hsm_procs: int = 0,
        lean: bool = False,
    ):
        self.box = box
        self.hosts = hosts
        # Fork everything before this process starts any thread.
        parent, child = _mp.Pipe()
        self.spm = _spawn.Process(target=_spm_main, args=(box, spm_config, child), name="spm", daemon=True)
        self.spm.start()
        self.spm_conn = parent
        self.spm_conn.recv()
        self.hsm_conns: list[Connection] = []
        self.hsms = []
        procs = 1 if lean else min(hosts, hsm_procs or hosts)
        for n in range(procs):
            host_ids = list(range(1 + n, hosts + 1, procs))
            parent, child = _mp.Pipe()
            if lean:
                p = _mp.Process(
                    target=lean_main, args=(box.inbox, box.outbox, host_ids, child), name="lean-hosts", daemon=True
                )
            else:
                p = _mp.Process(
                    target=hsm_main,
                    args=(box.inbox, box.outbox, host_ids, hsm_config, child),
                    name=f"hsm-{n}",
                    daemon=True,
                )
            p.start()
            self.hsms.append(p)
            self.hsm_conns.append(parent)
        for conn in self.hsm_conns:
            conn.recv()

    @property
    def spm_pid(self) -> int:
        assert self.spm.pid is not None
        return self.spm.pid

    def wait_spm_idle(self, timeout: float = 60.0) -> None:
        """Wait until the SPM has left its fast-polling window and its
        start-up is over: its second full scan (one scan_interval after the
        first) is done. A spawned SPM imports numpy, whose thread pool
        starts with it, and zeroes and writes its outbox: ~70 ms of CPU
        that a 3 s idle window taken at once counted as idle cost."""
        deadline = time.monotonic() + timeout
        while True:
            self.spm_conn.send("stats")
            stats = self.spm_conn.recv()
            if (not stats["active"] and stats["scans"] >= 2) or time.monotonic() > deadline:
                return
            time.sleep(0.2)

    def spm_stats(self) -> dict[str, Any]:
        self.spm_conn.send("stats")
        stats: dict[str, Any] = self.spm_conn.recv()
        return stats

    def io_counts(self) -> tuple[int, int]:
        self.spm_conn.send("stats")
        total = self.spm_conn.recv()
        reads, writes = total["reads"], total["writes"]
        for conn in self.hsm_conns:
            conn.send(("stats",))
        for conn in self.hsm_conns:
            s = conn.recv()
            reads += s["reads"]
            writes += s["writes"]
        return reads, writes

    def waves(self) -> list[Wave]:
        """The SPM's waves since last asked."""
        self.spm_conn.send("waves")
        waves: list[Wave] = self.spm_conn.recv()
        return waves

    def round(self, messages: int) -> tuple[list[float], int, list[dict[str, float]]]:
        """Latencies, failures, and the lean client's timeline (none from
        HSM clients)."""
        for conn in self.hsm_conns:
            conn.send(("round", messages))
        latencies: list[float] = []
        failures = 0
        timelines: list[dict[str, float]] = []
        for conn in self.hsm_conns:
            lat, failed, *timeline = conn.recv()
            latencies.extend(lat)
            failures += failed
            timelines.extend(timeline)
        return latencies, failures, timelines

    def stop(self) -> None:
        for conn in self.hsm_conns:
            conn.send(("stop",))
        for conn in self.hsm_conns:
            conn.recv()
        self.spm_conn.send("stop")
        self.spm_conn.recv()
        for p in [*self.hsms, self.spm]:
            p.join(10)


def run_bench(
    hosts: int,
    messages: int,
    storage: str = "file",
    rounds: int = 0,
    idle_seconds: float = 3.0,
    max_hosts: int = 250,
    spm_config: SPMConfig | None = None,
    hsm_config: HSMConfig | None = None,
    hsm_procs: int = 0,
    clients: str = "hsm",
) -> dict[str, Any]:
    max_hosts = max(max_hosts, hosts)
    rounds = rounds or max(1, math.ceil(200 / (hosts * messages)))
    spm_config = spm_config or SPMConfig()
    hsm_config = hsm_config or HSMConfig()
    with make_mailbox(storage, max_hosts) as box:
        cluster = Cluster(box, hosts, spm_config, hsm_config, hsm_procs, lean=clients == "lean")
        try:
            # Idle: nothing in flight.
            # Idle means nothing happened for a while: start-up writes events.
            cluster.wait_spm_idle()
            r0, w0 = cluster.io_counts()
            c0, t0 = _cpu_seconds(cluster.spm_pid), time.monotonic()
            time.sleep(idle_seconds)
            c1, t1 = _cpu_seconds(cluster.spm_pid), time.monotonic()
            r1, w1 = cluster.io_counts()
            idle_wall = t1 - t0
            # Busy.
            latencies: list[float] = []
            failures = 0
            load_before = stats.loadavg()
            c2, t2 = _cpu_seconds(cluster.spm_pid), time.monotonic()
            r2, w2 = cluster.io_counts()
            spm0 = cluster.spm_stats()
            cluster.waves()  # forget the start-up's
            timelines: list[dict[str, float]] = []
            for _ in range(rounds):
                lat, failed, timeline = cluster.round(messages)
                latencies.extend(lat)
                failures += failed
                timelines.extend(timeline)
            c3, t3 = _cpu_seconds(cluster.spm_pid), time.monotonic()
            r3, w3 = cluster.io_counts()
            spm1 = cluster.spm_stats()
            busy_wall = t3 - t2
            waves = cluster.waves()
        finally:
            cluster.stop()
    latencies.sort()
    ms = [x * 1000 for x in latencies]
    # The SPM's service time of the waves that carried requests (the clean
    # and free steps of the handshake make waves of their own).
    request_waves = [w for w in waves if w.requests]
    wave_ms = sorted(w.seconds * 1000 for w in request_waves)
    detail = [_wave_detail(w) for w in request_waves]
    worst = max(detail, key=lambda d: d["ms"], default=None)
    split = _round_split(timelines, request_waves)
    return {
        "hosts": hosts,
        "messages": messages,
        "rounds": rounds,
        "requests": len(latencies),
        "failures": failures,
        "storage": storage,
        "max_hosts": max_hosts,
        "clients": clients,
        "hsm_processes": len(cluster.hsms),
        "p50_ms": round(stats.percentile(ms, 50), 2),
        "p99_ms": round(stats.percentile(ms, 99), 2),
        "max_ms": round(ms[-1], 2) if ms else math.nan,
        "spm_waves": len(wave_ms),
        "spm_wave_p50_ms": round(stats.percentile(wave_ms, 50), 2),
        "spm_wave_p99_ms": round(stats.percentile(wave_ms, 99), 2),
        "spm_wave_max_ms": round(wave_ms[-1], 2) if wave_ms else math.nan,
        # Where each wave's time went (mailbox/waves.py), in host order of
        # the waves; the slowest one again on its own.
        "spm_wave_detail": detail,
        "spm_wave_worst": worst,
        # Lean client: each round's roundtrip split into the client's own
        # write, the wait until the SPM's wave began, the wave, and the
        # client noticing the last reply; then which side is the limit.
        "round_split": split,
        "limit": _limit(split),
        "spm_cpu_idle_pct": round(100 * (c1 - c0) / idle_wall, 2),
        "spm_cpu_busy_pct": round(100 * (c3 - c2) / busy_wall, 2),
        # The SPM's CPU per round (request wave, clean wave, frees).
        "spm_cpu_ms_per_round": round(1000 * (c3 - c2) / rounds, 2),
        # Per request wave: CPU of the SPM process and of its I/O thread,
        # and the I/O thread's wait for a CPU (medians).
        "spm_wave_cpu_p50_ms": round(stats.percentile(sorted(w.cpu_seconds * 1000 for w in request_waves), 50), 2),
        "spm_wave_io_cpu_p50_ms": round(
            stats.percentile(sorted(w.io_cpu_seconds * 1000 for w in request_waves), 50), 2),
        "spm_wave_wait_cpu_p50_ms": round(
            stats.percentile(sorted(w.io_wait_cpu_seconds * 1000 for w in request_waves), 50), 2),
        "reads_per_s_idle": round((r1 - r0) / idle_wall, 1),
        "writes_per_s_idle": round((w1 - w0) / idle_wall, 1),
        "reads_per_s_busy": round((r3 - r2) / busy_wall, 1),
        "writes_per_s_busy": round((w3 - w2) / busy_wall, 1),
        # The SPM's own I/O per round (a round is a request wave, a clean
        # wave and the frees): scans (inbox reads of every host block) and
        # outbox writes, which do not grow with the hosts.
        "spm_scans_per_round": round((spm1["scans"] - spm0["scans"]) / rounds, 1),
        "spm_outbox_writes_per_round": round((spm1["outbox_writes"] - spm0["outbox_writes"]) / rounds, 1),
        "busy_seconds": round(busy_wall, 3),
        "event_interval_ms": spm_config.event_interval * 1000,
        "idle_event_interval_ms": spm_config.idle_event_interval * 1000,
        "cpus": os.cpu_count(),
        "loadavg_before": load_before,
        "loadavg_after": stats.loadavg(),
    }


def _round_split(timelines: list[dict[str, float]], waves: list[Wave]) -> list[dict[str, float]]:
    """Line up each lean round with the SPM's request waves inside it
    (one clock: time.monotonic() is the same in every process)."""
    out: list[dict[str, float]] = []
    if not timelines:  # HSM clients keep none
        return out
    # A round's request waves end after it began and before the next one
    # began (its cleans were answered, so were its requests).
    ends = [t["began"] for t in timelines[1:]] + [math.inf]
    for t, next_began in zip(timelines, ends, strict=True):
        inside = [w for w in waves if t["began"] <= w.end < next_began]
        if not inside:
            continue
        start = min(w.start for w in inside)
        end = max(w.end for w in inside)
        out.append({
            "client_write_ms": round((t["sent"] - t["began"]) * 1000, 2),
            # Negative: the SPM's scan began while the client still wrote.
            "until_wave_ms": round((start - t["sent"]) * 1000, 2),
            "waves": len(inside),
            "spm_ms": round((end - start) * 1000, 2),
            "client_notice_ms": round((t["seen"] - end) * 1000, 2),
            "roundtrip_max_ms": round((t["seen"] - t["sent"]) * 1000, 2),
        })
    return out


def _limit(split: list[dict[str, float]]) -> str:
    """Which side takes longer in the median round: "spm" or "client"."""
    if not split:
        return "unknown"
    spm = stats.percentile(sorted(s["spm_ms"] for s in split), 50)
    client = stats.percentile(sorted(s["client_write_ms"] + s["client_notice_ms"] for s in split), 50)
    return "client" if client > spm else "spm"


def _wave_detail(w: Wave) -> dict[str, Any]:
    return {
        "ms": round(w.seconds * 1000, 2),
        "requests": w.requests,
        "messages": w.messages,
        "scans": w.scans,
        "read_mib": round(w.read_bytes / 1024**2, 2),
        "outbox_writes": w.outbox_writes,
        # Start to the end of the last scan that found a request.
        "intake_ms": round(w.intake_seconds * 1000, 2),
        "handler_ms": round(w.handler_seconds * 1000, 2),
        # The SPM's I/O thread: CPU used, and runnable but waiting for a CPU.
        "io_cpu_ms": round(w.io_cpu_seconds * 1000, 2),
        "io_wait_cpu_ms": round(w.io_wait_cpu_seconds * 1000, 2),
        "process_cpu_ms": round(w.cpu_seconds * 1000, 2),
    }


def _format_wave(d: dict[str, Any] | None) -> str:
    if d is None:
        return "none"
    return (
        f"{d['ms']:.1f} ms: {d['requests']} requests, {d['scans']} scans ({d['read_mib']} MiB read), "
        f"last request found at {d['intake_ms']:.1f} ms, {d['outbox_writes']} outbox writes; "
        f"I/O thread CPU {d['io_cpu_ms']:.1f} ms + waiting for a CPU {d['io_wait_cpu_ms']:.1f} ms; "
        f"process CPU {d['process_cpu_ms']:.1f} ms, handlers {d['handler_ms']:.1f} ms"
    )


def _format_split(split: list[dict[str, float]], limit: str) -> str:
    if not split:
        return ""
    def p50(key: str) -> float:
        return stats.percentile(sorted(s[key] for s in split), 50)
    return (
        f"  rounds     (p50) client write {p50('client_write_ms'):.1f} ms, SPM wave began "
        f"{p50('until_wave_ms'):.1f} ms after it, wave {p50('spm_ms'):.1f} ms, client saw the last reply "
        f"{p50('client_notice_ms'):.1f} ms after the wave: the limit is the "
        f"{'lean client' if limit == 'client' else 'SPM'}\n"
    )


def format_result(r: dict[str, Any]) -> str:
    return (
        f"hosts={r['hosts']} messages={r['messages']} rounds={r['rounds']} requests={r['requests']} "
        f"failures={r['failures']} storage={r['storage']} clients={r['clients']} "
        f"processes={r['hsm_processes']}\n"
        f"  roundtrip  p50={r['p50_ms']:.2f} ms  p99={r['p99_ms']:.2f} ms  max={r['max_ms']:.2f} ms\n"
        f"  SPM wave   p50={r['spm_wave_p50_ms']:.2f} ms  p99={r['spm_wave_p99_ms']:.2f} ms  "
        f"max={r['spm_wave_max_ms']:.2f} ms  ({r['spm_waves']} waves with requests: first read to last reply "
        f"written)\n"
        f"  worst wave {_format_wave(r['spm_wave_worst'])}\n"
        f"{_format_split(r['round_split'], r['limit'])}"
        f"  SPM I/O    per round: {r['spm_scans_per_round']} inbox scans, "
        f"{r['spm_outbox_writes_per_round']} outbox writes\n"
        f"  SPM CPU    idle={r['spm_cpu_idle_pct']:.2f}%  busy={r['spm_cpu_busy_pct']:.2f}% of a core, "
        f"{r['spm_cpu_ms_per_round']:.1f} ms a round; a request wave (p50): process {r['spm_wave_cpu_p50_ms']:.1f} ms, "
        f"I/O thread {r['spm_wave_io_cpu_p50_ms']:.1f} ms + {r['spm_wave_wait_cpu_p50_ms']:.1f} ms waiting for a CPU\n"
        f"  storage    idle reads/s={r['reads_per_s_idle']} writes/s={r['writes_per_s_idle']}  "
        f"busy reads/s={r['reads_per_s_busy']} writes/s={r['writes_per_s_busy']}\n"
        f"  machine    cpus={r['cpus']} load before={r['loadavg_before']} after={r['loadavg_after']}"
    )


def _cmd_bench(args: argparse.Namespace) -> int:
    spm_config = SPMConfig(
        event_interval=args.event_interval / 1000, idle_event_interval=args.idle_event_interval / 1000
    )
    result = run_bench(
        args.hosts,
        args.messages,
        storage=args.storage,
        rounds=args.rounds,
        idle_seconds=args.idle_seconds,
        max_hosts=args.max_hosts,
        spm_config=spm_config,
        hsm_procs=args.hsm_procs,
        clients=args.clients,
    )
    stats.emit(result, args.json, format_result)
    return 1 if result["failures"] else 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("bench", help="measure mailbox roundtrip latency and idle cost")
    p.add_argument("--hosts", type=int, default=1, help="HSM processes (host ids 1..N)")
    p.add_argument("--messages", type=int, default=1, help="requests each HSM submits at once per round")
    p.add_argument("--rounds", type=int, default=0, help="rounds (default: enough for ~200 samples)")
    p.add_argument("--storage", choices=["file", "loop"], default="file", help="files under /var/tmp or loop devices")
    p.add_argument("--max-hosts", type=int, default=250, help="mailbox size in hosts (SPM scans all)")
    p.add_argument("--idle-seconds", type=float, default=3.0, help="length of the idle measurement")
    p.add_argument("--event-interval", type=float, default=2.0, help="SPM event poll interval while busy, ms")
    p.add_argument("--idle-event-interval", type=float, default=25.0, help="SPM event poll interval when idle, ms")
    p.add_argument(
        "--hsm-procs",
        type=int,
        default=0,
        help="processes the HSMs run in (default: one per host); each HSM keeps its own block, thread and fds",
    )
    p.add_argument(
        "--clients",
        choices=["hsm", "lean"],
        default="hsm",
        help="hsm: real HSMMailbox instances; lean: one process speaking the protocol for all hosts "
        "(isolates the SPM when the machine has too few cores for one interpreter per host)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_bench)
