"""``xtnd mailbox demo``: the mailbox alone at work, in one box.

An SPM process and several HSM processes share an inbox and an outbox on
loop devices, as hosts of a cluster share them on a SAN. Each HSM sends
extend requests at random intervals for a while; a live view (the same as
``xtnd mailbox watch``) shows the slots moving through their handshake;
a summary gives the roundtrip figures at the end.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing.connection
import time
from typing import Any

from rich.console import Console
from rich.live import Live
from xtnd.common import stats
from xtnd.mailbox.hsm import HSMConfig
from xtnd.mailbox.spm import SPMConfig
from xtnd.tools import inspect as inspect_cmd
from xtnd.tools import mailbox_bench as bench
from xtnd.tools import mailbox_view as view


def run_demo(hosts: int, duration: float, rate: float, storage: str, console: Console) -> dict[str, Any]:
    console.print(f"[bold]xtnd mailbox demo[/]: 1 SPM + {hosts} HSM processes, {storage} storage, {duration:.0f} s")
    with bench.make_mailbox(storage, 250) as box:
        console.print(f"inbox={box.inbox} outbox={box.outbox}")
        cluster = bench.Cluster(box, hosts, SPMConfig(), HSMConfig())
        try:
            for conn in cluster.hsm_conns:
                conn.send(("flow", duration, rate))
            results: dict[int, tuple[list[float], int]] = {}
            with view.AreaReader(box.inbox) as inbox, view.AreaReader(box.outbox) as outbox:
                scanner = view.Scanner(inbox, outbox, box.max_hosts, None)
                scans = 0
                with Live(console=console, auto_refresh=False, transient=False) as live:
                    while len(results) < len(cluster.hsm_conns):
                        ready = multiprocessing.connection.wait(cluster.hsm_conns, timeout=0.5)
                        for n, conn in enumerate(cluster.hsm_conns):
                            if conn in ready:
                                results[n] = conn.recv()
                        scans += 1
                        live.update(inspect_cmd.watch_view(scanner.scan(), scans), refresh=True)
        finally:
            cluster.stop()
    latencies = sorted(x * 1000 for lat, _ in results.values() for x in lat)
    failures = sum(f for _, f in results.values())
    summary = {
        "hosts": hosts,
        "requests": len(latencies),
        "failures": failures,
        "p50_ms": round(stats.percentile(latencies, 50), 2),
        "p99_ms": round(stats.percentile(latencies, 99), 2),
        "max_ms": round(latencies[-1], 2) if latencies else math.nan,
    }
    console.print(
        f"[bold]summary[/]: {summary['requests']} extend requests from {hosts} hosts, "
        f"{failures} failed; roundtrip p50={summary['p50_ms']} ms p99={summary['p99_ms']} ms "
        f"max={summary['max_ms']} ms"
    )
    return summary


def _cmd_demo(args: argparse.Namespace) -> int:
    console = Console()
    start = time.monotonic()
    summary = run_demo(args.hosts, args.duration, args.rate, args.storage, console)
    console.print(f"done in {time.monotonic() - start:.1f} s")
    return 1 if summary["failures"] or not summary["requests"] else 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("demo", help="the mailbox alone: processes trading requests with an in-process SPM")
    p.add_argument("--hosts", type=int, default=4, help="HSM processes")
    p.add_argument("--duration", type=float, default=15.0, help="seconds of traffic")
    p.add_argument("--rate", type=float, default=5.0, help="requests per second per host")
    p.add_argument("--storage", choices=["file", "loop"], default="loop", help="mailbox storage")
    p.set_defaults(func=_cmd_demo)
