"""``xtnd hsm bench``: the HSM's extend latency on real guests and storage.

    xtnd hsm bench [--json] [--extends 8] [--pauses 8] [--rate-chunk-mb 1] [--rates 1,2,3,0]
                   [--spm daemon|inprocess]
    xtnd hsm bench --policy fixed,adaptive [--json] [--policy-chunk-mb 1] [--policy-write-mb 48]
                   [--max-chunk-mb 64] [--spm inprocess --spm-delay-ms N]

Needs root: it builds the guest rig (xtnd.tools.rig.guest, a TCG guest
writing a known pattern, from Debian packages tools/run.sh installs), a
master block domain on a loop PV (4 MiB extents), starts an SPM serving
real lvextend (by default the real ``xtnd spm`` daemon with its own sanlock
daemon; ``--spm inprocess`` serves from this process) and runs the HSM in
this process against the machine's libvirtd. Three runs, one guest each:

1. threshold: chunk 8 MiB, the guest writes at 4 MiB/s and crosses
   ``--extends`` thresholds; latency = block-threshold event to volume
   refreshed, verified and re-armed (wait + extend + refresh).
2. enospc: chunk 4 MiB with no headroom (utilization 100%), so every chunk
   ends in an ENOSPC pause; latency = trigger to VM running again, from the
   HSM's records; the pause as libvirt reported it (lifecycle events
   SUSPENDED_IOERROR to RESUMED) is shown too.
3. rate: chunk ``--rate-chunk-mb`` at 20% utilization, one guest per
   rate in ``--rates`` (MiB/s, 0 = as fast as the guest can): the highest
   rate whose guest never paused. TCG guests write at most ~3.5 MiB/s
   here, so the chunk must be tiny for a limit to show.

With ``--policy`` it runs only the sizing policy comparison instead: the
same guest writing ``--policy-write-mb`` as fast as it can, once per policy,
with a small floor (``--policy-chunk-mb``, 20% utilization) and the cap
``--max-chunk-mb``; per policy the ENOSPC pauses and seconds paused (from
lifecycle events), the pauses after the first extend, the extends, the
largest chunk chosen and the over-allocation when the guest is done
(physical minus allocation). Its JSON holds ``policies``: one object per
policy keyed by its name.

Each phase prints the completion lines' phase breakdown (p50/p99 of wait,
extend, refresh, resume). ``--json`` prints one JSON object instead. The
default run takes about two to three minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from xtnd.common import stats
from xtnd.hsm.metrics import ExtendRecord

MiB = 1024**2
GiB = 1024**3
TARGET_THRESHOLD_MS = 40
TARGET_ENOSPC_MS = 50

log = logging.getLogger("xtnd.hsm.bench")


def _phases(records: list[ExtendRecord]) -> dict[str, dict[str, float]]:
    return {
        "wait": stats.summary_ms([r.wait for r in records]),
        "extend": stats.summary_ms([r.extend for r in records]),
        "refresh": stats.summary_ms([r.refresh for r in records]),
        "resume": stats.summary_ms([r.resume for r in records]),
        "total": stats.summary_ms([r.total for r in records]),
    }


class Lifecycle:
    """Pause and resume times of domains, from libvirt lifecycle events."""

    def __init__(self, conn: Any):
        import libvirt

        self._libvirt = libvirt
        self.conn = conn
        self.paused: dict[str, list[float]] = {}
        self.pauses: dict[str, list[float]] = {}
        # name -> (paused at, resumed at) of every finished pause.
        self.spans: dict[str, list[tuple[float, float]]] = {}
        self._id = conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._event, None)

    def _event(self, conn: Any, dom: Any, event: int, detail: int, _: Any) -> None:
        lv = self._libvirt
        now = time.monotonic()
        name = dom.name()
        if event == lv.VIR_DOMAIN_EVENT_SUSPENDED and detail == lv.VIR_DOMAIN_EVENT_SUSPENDED_IOERROR:
            self.paused.setdefault(name, []).append(now)
        elif event == lv.VIR_DOMAIN_EVENT_RESUMED and self.paused.get(name):
            began = self.paused[name].pop()
            self.pauses.setdefault(name, []).append(now - began)
            self.spans.setdefault(name, []).append((began, now))

    def count(self, name: str) -> int:
        return len(self.pauses.get(name, [])) + len(self.paused.get(name, []))

    def close(self) -> None:
        self.conn.domainEventDeregisterAny(self._id)


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: str, say: Callable[[str], None]):
        import libvirt
        from xtnd.hsm.libvirtconn import EventLoop
        from xtnd.tools.rig import guest, hsmrig

        self.args = args
        self.workdir = workdir
        self.say = say
        self.guest = guest
        self.hsmrig = hsmrig
        guest.start_libvirt()
        self.rig = guest.build_rig()
        self.events = EventLoop(name="xtnd-bench-libvirt-events")
        self.events.start()
        self.conn = libvirt.open("qemu:///system")
        self.lifecycle = Lifecycle(self.conn)

    def close(self) -> None:
        self.lifecycle.close()
        self.conn.close()
        self.events.stop()

    @contextlib.contextmanager
    def spm(self, pool: Any) -> Iterator[None]:
        if self.args.spm == "inprocess":
            with self.hsmrig.spm(pool, self.hsmrig.Gate(delay=self.args.spm_delay_ms / 1000)):
                yield
            return
        if self.args.spm_delay_ms:
            raise SystemExit("xtnd hsm bench: --spm-delay-ms needs --spm inprocess")
        from xtnd.tools.rig import sanlockd

        reason = sanlockd.missing()
        if reason:
            raise SystemExit(f"xtnd hsm bench: no sanlock for the SPM daemon ({reason}); try --spm inprocess")
        host = sanlockd.SanlockDaemon("bench-spm", self.workdir).start()
        try:
            with self.hsmrig.spm_daemon(pool, host):
                yield
        finally:
            host.stop()

    def run_hsm(
        self,
        config: Any,
        disk: str,
        workload: Any,
        records: list[ExtendRecord],
        inside: Callable[[Any, Any], Any] | None = None,
    ) -> tuple[Any, str, float, Any]:
        """An HSM in this process and one guest on disk, until the guest has
        written its workload: (the stopped HSM, guest name, write seconds,
        what inside(hsm, guest) returned while both still ran)."""
        from xtnd.hsm.daemon import HSM

        lock = threading.Lock()

        def on_extend(r: ExtendRecord) -> None:
            with lock:
                records.append(r)

        config.lvm.shell = self.args.lvm == "shell"
        # The bench's SPM is in-process and no sanlock user: no host id to share.
        hsm = HSM(config, event_loop=self.events, on_extend=on_extend, hold_host_id=False)
        hsm.start()
        try:
            hsm.connection.wait_connected(30)
            with self.guest.guest(self.conn, self.rig, disk, workload, self.workdir) as g:
                g.start()
                g.wait_console("XTND-START", timeout=120)
                start = time.monotonic()
                g.wait_console("XTND-WRITE-DONE", timeout=600)
                elapsed = time.monotonic() - start
                extra = inside(hsm, g) if inside is not None else None
                name = g.name
        finally:
            hsm.stop()
        return hsm, name, elapsed, extra

    def run_guest(
        self, pool: Any, chunk_mb: int, utilization: int, workload: Any, initial_mb: int
    ) -> tuple[list[ExtendRecord], str, float, dict[str, Any]]:
        """One guest on a fresh volume under a fresh HSM; records, name, write seconds."""
        records: list[ExtendRecord] = []
        disk = pool.thin_volume(initial=initial_mb * MiB)
        config = pool.config(chunk_mb=chunk_mb, utilization_percent=utilization)

        def verified(hsm: Any, g: Any) -> None:
            if workload.verify:
                g.wait_console("XTND-VERIFY-OK", timeout=600)

        try:
            hsm, name, elapsed, _ = self.run_hsm(config, disk, workload, records, verified)
            costs = _costs(hsm, pool.uuid, records)
        finally:
            self._remove(pool, disk)
        return records, name, elapsed, costs

    def _remove(self, pool: Any, link: str) -> None:
        """Free the volume so the next one is again the VG's last LV (one segment)."""
        from xtnd.hsm import links

        parsed = links.parse(link, pool.run_dir)
        assert parsed is not None
        links.remove(parsed[0], parsed[1], pool.run_dir)
        pool.domain.remove_volume(parsed[1])

    def threshold(self, pool: Any) -> dict[str, Any]:
        n = self.args.extends
        chunk = 8
        self.say(f"threshold: chunk {chunk} MiB, guest writing {chunk * n} MiB at 4 MiB/s")
        workload = self.guest.Workload(write_mb=chunk * n, rate=4, verify=False)
        records, name, _, costs = self.run_guest(pool, chunk, 20, workload, initial_mb=chunk)
        crossed = [r for r in records if r.trigger == "threshold"]
        refreshed = [r.t_refreshed - r.t_event for r in crossed]
        return {
            "chunk_mb": chunk,
            "extends": len(records),
            "paused": self.lifecycle.count(name),
            "refreshed_ms": stats.summary_ms(refreshed),
            "phases_ms": _phases(crossed),
            "per_extend": costs,
            "target_p50_ms": TARGET_THRESHOLD_MS,
        }

    def enospc(self, pool: Any) -> dict[str, Any]:
        n = self.args.pauses
        chunk = 4
        self.say(f"enospc: chunk {chunk} MiB with no headroom, guest writing {chunk * n} MiB")
        workload = self.guest.Workload(write_mb=chunk * n, verify=True)
        records, name, _, costs = self.run_guest(pool, chunk, 100, workload, initial_mb=chunk)
        resumed = [r for r in records if r.resumed]
        return {
            "chunk_mb": chunk,
            "extends": len(records),
            "resumed": len(resumed),
            "running_again_ms": stats.summary_ms([r.total for r in resumed]),
            "phases_ms": _phases(resumed),
            "libvirt_pause_ms": stats.summary_ms(self.lifecycle.pauses.get(name, [])),
            "per_extend": costs,
            "target_p50_ms": TARGET_ENOSPC_MS,
        }

    def rate(self, pool: Any) -> dict[str, Any]:
        chunk = self.args.rate_chunk_mb
        tried: list[dict[str, Any]] = []
        best: float | None = None
        for rate in self.args.rates:
            write_mb = max(12, chunk * 6)
            self.say(f"rate: chunk {chunk} MiB, guest writing {write_mb} MiB at {rate or 'max'} MiB/s")
            workload = self.guest.Workload(write_mb=write_mb, rate=rate, verify=False)
            records, name, elapsed, _ = self.run_guest(pool, chunk, self.args.rate_utilization, workload, initial_mb=4)
            paused = self.lifecycle.count(name)
            achieved = write_mb / elapsed if elapsed > 0 else 0.0
            tried.append(
                {"rate_mbs": rate, "achieved_mbs": round(achieved, 2), "extends": len(records), "paused": paused}
            )
            if paused == 0 and (best is None or achieved > best):
                best = round(achieved, 2)
        return {
            "chunk_mb": chunk,
            "utilization_percent": self.args.rate_utilization,
            "tried": tried,
            "max_rate_without_pause_mbs": best,
        }


# Sizing policy comparison (--policy): kept apart from the latency phases.


def policy_guest(bench: Bench, pool: Any, policy: str) -> dict[str, Any]:
    """One guest writing as fast as it can under an HSM with this policy."""
    from xtnd.hsm.drive import State

    args = bench.args
    records: list[ExtendRecord] = []
    disk = pool.thin_volume(initial=args.policy_initial_mb * MiB)
    config = pool.config(chunk_mb=args.policy_chunk_mb, utilization_percent=args.policy_utilization, policy=policy)
    config.thin.max_chunk_mb = args.max_chunk_mb
    # hold: the guest stays up when done, so its final sizes can be read.
    workload = bench.guest.Workload(write_mb=args.policy_write_mb, rate=0, verify=False, hold=True)

    def sizes(hsm: Any, g: Any) -> tuple[int, int]:
        """(allocation, physical) once the HSM is done with what the guest wrote."""
        deadline = time.monotonic() + 30
        idle = threading.Event()
        while not idle.is_set() and time.monotonic() < deadline:
            busy = [
                d for vm in hsm.monitor.snapshot().values() for d in vm.values()
                if d.state in (State.EXCEEDED, State.EXTENDING)
            ]  # fmt: skip
            if not busy:
                idle.set()
            else:
                idle.wait(0.1)
        _, allocation, physical = g.dom.blockInfo("vda")
        return allocation, physical

    try:
        _, name, elapsed, (allocation, physical) = bench.run_hsm(config, disk, workload, records, sizes)
    finally:
        bench._remove(pool, disk)
    spans = bench.lifecycle.spans.get(name, [])
    open_pauses = bench.lifecycle.paused.get(name, [])
    first_done = min((r.t_done for r in records), default=float("inf"))
    paused_s = sum(end - began for began, end in spans) + sum(time.monotonic() - t for t in open_pauses)
    return {
        "policy": policy,
        "chunk_mb": args.policy_chunk_mb,
        "max_chunk_mb": args.max_chunk_mb,
        "utilization_percent": args.policy_utilization,
        "write_mb": args.policy_write_mb,
        "achieved_mbs": round(args.policy_write_mb / elapsed, 2) if elapsed > 0 else 0.0,
        "pauses": len(spans) + len(open_pauses),
        "paused_s": round(paused_s, 2),
        "pauses_after_first_extend": sum(1 for began, _ in spans if began > first_done)
        + sum(1 for t in open_pauses if t > first_done),
        "extends": len(records),
        "largest_chunk_mb": max((r.chunk for r in records), default=0) // MiB,
        "largest_extend_mb": max((r.new_size - r.old_size for r in records), default=0) // MiB,
        "peak_rate_mbs": round(max((r.rate for r in records), default=0.0) / MiB, 2),
        "physical_mb": round(physical / MiB, 1),
        "allocation_mb": round(allocation / MiB, 1),
        "overallocation_mb": round((physical - allocation) / MiB, 1),
    }


def compare_policies(bench: Bench, pool: Any) -> dict[str, Any]:
    a = bench.args
    out: dict[str, Any] = {}
    for policy in a.policy:
        bench.say(
            f"policy {policy}: floor {a.policy_chunk_mb} MiB at {a.policy_utilization}%, cap {a.max_chunk_mb} MiB, "
            f"guest writing {a.policy_write_mb} MiB as fast as it can"
        )
        out[policy] = policy_guest(bench, pool, policy)
        out[policy]["spm_delay_ms"] = a.spm_delay_ms
    return out


def _format_policies(result: dict[str, Any]) -> str:
    out: list[str] = []
    out.append(
        f"\n{'policy':<10} {'pauses':>6} {'paused_s':>9} {'after 1st':>9} {'extends':>7} {'max chunk':>9} "
        f"{'overalloc':>9} {'MiB/s':>6}"
    )
    for name, p in result["policies"].items():
        out.append(
            f"{name:<10} {p['pauses']:>6} {p['paused_s']:>9.2f} {p['pauses_after_first_extend']:>9} "
            f"{p['extends']:>7} {p['largest_chunk_mb']:>6} MiB {p['overallocation_mb']:>5.1f} MiB "
            f"{p['achieved_mbs']:>6.2f}"
        )
    out.append(
        f"\n{result['duration_s']} s (SPM: {result['spm']}, HSM LVM: {result['lvm']}, "
        f"load {result['load_before']} -> {result['load_after']})"
    )
    return "\n".join(out)


def _policies(text: str) -> list[str]:
    from xtnd.hsm.sizing import POLICIES

    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [n for n in names if n not in POLICIES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"policies are {', '.join(POLICIES)}; got {text!r}")
    return names


def _run(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("xtnd hsm bench: needs root (LVM, loop devices, libvirt)", file=sys.stderr)
        return 1

    def say(msg: str) -> None:
        if not args.json:
            print(msg, flush=True)

    os.makedirs("/var/tmp/xtnd-bench", exist_ok=True)
    result: dict[str, Any] = {"spm": args.spm, "lvm": args.lvm, "load_before": stats.loadavg()}
    with tempfile.TemporaryDirectory(dir="/var/tmp/xtnd-bench") as workdir:
        os.chmod(workdir, 0o755)  # QEMU runs as another user: it opens the volume links in here
        bench = Bench(args, workdir, say)
        try:
            with bench.hsmrig.pool(workdir) as pool, bench.spm(pool):
                started = time.monotonic()
                if args.policy:
                    result["policies"] = compare_policies(bench, pool)
                else:
                    result["threshold"] = bench.threshold(pool)
                    result["enospc"] = bench.enospc(pool)
                    if args.rates:
                        result["rate"] = bench.rate(pool)
                    result["estimate"] = _estimate(result, args)
                result["duration_s"] = round(time.monotonic() - started, 1)
                result["load_after"] = stats.loadavg()
        finally:
            bench.close()
    stats.emit(result, args.json, _format_policies if "policies" in result else _format)
    return 0


def _costs(hsm: Any, domain: Any, records: list[ExtendRecord]) -> dict[str, Any]:
    """The HSM's side of one extend against the floor: LVM commands run
    between a trigger and its extend done (count per extend and mean cost,
    from the runner's history; the others, such as opening the domain and
    mapping the mailbox at start, apart), O_DIRECT reads of LVM metadata
    (the refresh's size check) and mailbox O_DIRECT I/Os."""
    n = max(len(records), 1)
    volumes = hsm.volumes.domain(domain)
    runner = volumes.runner
    to_wall = time.time() - time.monotonic()  # records use the monotonic clock
    windows = [(r.t_event + to_wall, r.t_done + to_wall) for r in records]
    during: dict[str, list[float]] = {}
    outside: dict[str, int] = {}
    history = runner.history.records()
    for c in history:
        if any(a <= c.started <= b for a, b in windows):
            during.setdefault(c.argv[1], []).append(c.duration)
        else:
            outside[c.argv[1]] = outside.get(c.argv[1], 0) + 1
    reader = getattr(volumes.activator, "metadata", None)
    inbox, outbox = hsm.mailbox_files
    return {
        "lvm_commands": {k: round(len(v) / n, 2) for k, v in sorted(during.items())},
        "lvm_mean_ms": {k: round(1000 * sum(v) / len(v), 2) for k, v in sorted(during.items())},
        "lvm_outside_extends": dict(sorted(outside.items())),
        # False: more commands ran than the history keeps; the split above is partial.
        "lvm_history_complete": sum(runner.history.counts().values()) == len(history),
        "lvm_through": "shell" if runner.shell is not None else "processes",
        "metadata_reads": round(reader.counters.reads / n, 2) if reader else 0,
        "metadata_mean_ms": (
            round(1000 * reader.counters.seconds / reader.counters.lookups, 2)
            if reader and reader.counters.lookups
            else 0
        ),
        "metadata_fallbacks": getattr(volumes.activator, "fallbacks", 0),
        # Checks sized from the threshold event instead of fresh libvirt stats.
        "checks_from_event": round(hsm.monitor.counters["checks_from_event"] / n, 2),
        "mailbox_reads": round(inbox.counters.reads / n + outbox.counters.reads / n, 2),
        "mailbox_writes": round(inbox.counters.writes / n + outbox.counters.writes / n, 2),
    }


def _estimate(result: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Fastest write that never pauses, from the measured latency: the guest
    may write the headroom (chunk x (100 - utilization)%) while an extend is
    under way, so rate = headroom / latency (p99 of threshold -> refreshed)."""
    p99 = result["threshold"]["refreshed_ms"].get("p99")
    if not p99:
        return {}
    out: dict[str, Any] = {"latency_p99_ms": p99}
    for key, chunk, util in (
        ("threshold_chunk", result["threshold"]["chunk_mb"], 20),
        ("rate_chunk", args.rate_chunk_mb, args.rate_utilization),
    ):
        headroom = chunk * (100 - util) / 100
        out[key] = {"chunk_mb": chunk, "utilization_percent": util, "max_rate_mbs": round(headroom / (p99 / 1000), 1)}
    return out


def _line(label: str, s: dict[str, float]) -> str:
    if not s.get("count"):
        return f"  {label:<22} -"
    return (
        f"  {label:<22} p50 {s['p50']:7.1f}  p99 {s['p99']:7.1f}  min {s['min']:7.1f}  max {s['max']:7.1f}"
        f"  (n={s['count']:.0f})"
    )


def _format(result: dict[str, Any]) -> str:
    out: list[str] = []
    t, e = result["threshold"], result["enospc"]
    out.append(f"\nthreshold event -> refreshed and re-armed (ms), chunk {t['chunk_mb']} MiB, paused {t['paused']}x:")
    out.append(_line("refreshed", t["refreshed_ms"]))
    for phase in ("wait", "extend", "refresh"):
        out.append(_line(phase, t["phases_ms"][phase]))
    out.append(_floor(t["per_extend"]))
    out.append(f"\nENOSPC pause -> running again (ms), chunk {e['chunk_mb']} MiB, {e['resumed']} resumes:")
    out.append(_line("running again", e["running_again_ms"]))
    for phase in ("wait", "extend", "refresh", "resume"):
        out.append(_line(phase, e["phases_ms"][phase]))
    out.append(_line("libvirt pause", e["libvirt_pause_ms"]))
    out.append(_floor(e["per_extend"]))
    if "rate" in result:
        r = result["rate"]
        out.append(
            f"\nguest write rate vs pauses, chunk {r['chunk_mb']} MiB at {r['utilization_percent']}% utilization:"
        )
        for row in r["tried"]:
            out.append(
                f"  asked {row['rate_mbs'] or 'max':>4} MiB/s  achieved {row['achieved_mbs']:5.2f} MiB/s  "
                f"extends {row['extends']:3}  paused {row['paused']}"
            )
        out.append(f"  highest write rate that never paused: {r['max_rate_without_pause_mbs']} MiB/s (achieved)")
    for est in (v for k, v in result.get("estimate", {}).items() if k != "latency_p99_ms"):
        out.append(
            f"  estimate at chunk {est['chunk_mb']} MiB, {est['utilization_percent']}%: "
            f"{est['max_rate_mbs']} MiB/s (headroom / p99 latency)"
        )
    out.append(
        f"\n{result['duration_s']} s (SPM: {result['spm']}, HSM LVM: {result['lvm']}, "
        f"load {result['load_before']} -> {result['load_after']})"
    )
    return "\n".join(out)


def _floor(c: dict[str, Any]) -> str:
    cmds = ", ".join(f"{k} {v} x {c['lvm_mean_ms'].get(k, 0)} ms" for k, v in c["lvm_commands"].items())
    other = ", ".join(f"{k} {v}" for k, v in c["lvm_outside_extends"].items())
    return (
        f"  per extend on the HSM: LVM ({c['lvm_through']}) {cmds or 'none'}; "
        f"LVM metadata {c['metadata_reads']} O_DIRECT reads, {c['metadata_mean_ms']} ms per lookup "
        f"({c['metadata_fallbacks']} fell back to lvs); {c['checks_from_event']} checks sized from the event; "
        f"mailbox O_DIRECT {c['mailbox_reads']} reads, {c['mailbox_writes']} writes\n"
        f"  LVM outside extends (start, resize check): {other or 'none'}"
    )


def _rates(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()] if text else []


def register(sub: Any) -> None:
    p = sub.add_parser("bench", help="extend latency and safe write rate on a real guest (root)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--extends", type=int, default=8, help="thresholds the first guest crosses (default 8)")
    p.add_argument("--pauses", type=int, default=8, help="ENOSPC pauses of the second guest (default 8)")
    p.add_argument("--rate-chunk-mb", type=int, default=1, help="chunk of the rate search (default 1 MiB)")
    p.add_argument(
        "--rates", type=_rates, default=[1, 2, 3, 0], help="MiB/s to try, 0 = unthrottled (default 1,2,3,0; '' skips)"
    )
    p.add_argument(
        "--rate-utilization", type=int, default=20, help="utilization_percent of the rate search (default 20)"
    )
    p.add_argument("--spm", choices=["daemon", "inprocess"], default="daemon", help="the SPM serving extends")
    p.add_argument(
        "--lvm", choices=["shell", "process"], default="shell", help="the HSM's LVM: [lvm] shell true or false"
    )
    p.add_argument(
        "--policy",
        type=_policies,
        default=[],
        help="compare sizing policies instead, e.g. fixed,adaptive (one guest each, writing as fast as it can)",
    )
    p.add_argument("--policy-chunk-mb", type=int, default=1, help="--policy: chunk_mb, the floor (default 1)")
    p.add_argument("--policy-write-mb", type=int, default=48, help="--policy: MiB each guest writes (default 48)")
    p.add_argument("--policy-initial-mb", type=int, default=4, help="--policy: initial volume size (default 4)")
    p.add_argument("--policy-utilization", type=int, default=20, help="--policy: utilization_percent (default 20)")
    p.add_argument("--max-chunk-mb", type=int, default=64, help="--policy: max_chunk_mb, the cap (default 64)")
    p.add_argument(
        "--spm-delay-ms",
        type=float,
        default=0.0,
        help="with --spm inprocess: add this to every extend (a busy SPM or slow storage; default 0)",
    )
    p.set_defaults(func=_run)
