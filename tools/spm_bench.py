"""``xtnd spm bench``: extends through the mailbox against plain lvextend.

Builds a throw-away block domain on a sparse file under /var/tmp (loop
device, 4 MiB extents), then on the same VG and in the same run:

1. plain: a loop of single ``lvextend`` processes (+1 extent each) on LVs
   of their own, with the host's LVM configuration: what an lvextend costs
   without xtnd's tuning (the baseline of ``ratio``);
2. spm: an HSM mailbox (host 1) sends extend requests (+1 extent each) for
   --volumes volumes at once, each volume's next request as soon as the
   previous one is answered; the SPM side (SPMMailbox and the daemon's
   ExtendService with validation, per-volume locks, volume cache) runs in
   this process with real lvextend, through the LVM shell (``--lvm
   shell``, the daemon's default) or one process per command;
3. plain again; the plain rate is the mean of both runs (drift on a shared
   machine).

The SPM lease is skipped (fence is a no-op; in the daemon it costs one
sanlock inquire, ~0.2 ms, the renewal status being the lease watchdog's
recent reading): the output says so. Figures: request-to-reply latency
p50/p99/max as the HSM sees it, extends per second, and where the time goes
against the floor: LVM commands and mailbox O_DIRECT I/Os per extend and
what each costs here.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import tempfile
import threading
import time
import uuid as uuidlib
from typing import Any

from xtnd import lvm, storage
from xtnd.common import cmd
from xtnd.common.stats import percentile
from xtnd.mailbox import codec
from xtnd.mailbox.directio import DirectFile
from xtnd.mailbox.hsm import HSMConfig, HSMMailbox
from xtnd.mailbox.spm import SPMConfig, SPMMailbox
from xtnd.spm.domains import DomainRegistry
from xtnd.spm.extend import ExtendService
from xtnd.spm.metrics import Metrics
from xtnd.storage import constants as c

log = logging.getLogger("xtnd.spm.bench")

EXTENT = 4 * c.MiB
BASE = "/var/tmp"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--volumes", type=int, default=8, help="volumes extended at once (default %(default)s)")
    p.add_argument("--requests", type=int, default=160, help="extends in the SPM run (default %(default)s)")
    p.add_argument("--plain", type=int, default=80, help="lvextend commands per plain run (default %(default)s)")
    p.add_argument("--workers", type=int, default=8, help="SPM worker threads (default %(default)s)")
    p.add_argument(
        "--poll-growth",
        type=float,
        default=HSMConfig.poll_growth,
        help="HSM outbox poll delay as a fraction of the time waited (default %(default)s)",
    )
    p.add_argument(
        "--lvm",
        choices=("shell", "process"),
        default="shell",
        help="how the SPM runs LVM: one LVM shell, or a process per command (default %(default)s)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.workdir = tempfile.mkdtemp(prefix="xtnd-spm-bench-", dir=BASE)
        self.loop = ""
        self.domain: storage.BlockDomain | None = None

    def setup(self) -> storage.BlockDomain:
        volumes = self.args.volumes
        grow = (self.args.requests + 2 * self.args.plain + volumes * 2) * EXTENT
        pv = os.path.join(self.workdir, "pv")
        with open(pv, "wb") as f:
            f.truncate(grow + 512 * c.MiB)
        self.loop = cmd.run(["losetup", "--find", "--show", pv]).decode().strip()
        domain = storage.create_block_domain(
            uuidlib.uuid4(), [self.loop], master=True, max_hosts=4, extent_size=EXTENT, activation="auto"
        )
        self.domain = domain
        for _ in range(volumes):
            # A thin volume's LV and tags, without the qcow2 header (no need here).
            tags = (c.TAG_VOLUME, f"{c.TAG_CAPACITY}{100 * c.GiB}", f"{c.TAG_FORMAT}qcow2")
            lvm.lvcreate(domain.runner, domain.vg, str(uuidlib.uuid4()), EXTENT, tags)
        for i in range(2):
            lvm.lvcreate(domain.runner, domain.vg, f"plain{i}", EXTENT)
        return domain

    def cleanup(self) -> None:
        if self.domain is not None:
            self.domain.deactivate_special()
            try:
                lvm.vgremove(self.domain.runner, self.domain.vg)
            except lvm.LVMError as e:
                log.warning("cannot remove bench VG: %s", e)
        if self.loop:
            cmd.run(["losetup", "--detach", self.loop], check=False)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def plain(self, lv: str, count: int, tuned: bool = False) -> float:
        """lvextend processes per second, with the host's LVM config or (tuned) xtnd's."""
        domain = self.domain
        assert domain is not None
        runner = lvm.Runner(domain.runner.devices, system_dir=None if tuned else "")
        size = lvm.lv_info(runner, domain.vg, lv).size
        start = time.monotonic()
        for _ in range(count):
            size += EXTENT
            lvm.lvextend(runner, domain.vg, lv, size)
        return count / (time.monotonic() - start)

    def spm(self) -> dict[str, Any]:
        domain = self.domain
        assert domain is not None
        args = self.args
        registry = DomainRegistry(lambda u: domain, [domain.uuid], ttl=3600)
        metrics = Metrics()

        def lost(reason: str) -> None:
            raise AssertionError("no lease in the benchmark")

        service = ExtendService(registry, lambda: None, lost, metrics)
        mbx = domain.mailbox()
        spm_files = DirectFile(mbx.inbox), DirectFile(mbx.outbox)
        spm = SPMMailbox(*spm_files, mbx.max_hosts, SPMConfig(workers=args.workers))
        spm.register(codec.EXTEND_OPCODE, service.handle)
        hsm = HSMMailbox(DirectFile(mbx.inbox), DirectFile(mbx.outbox), 1, HSMConfig(poll_growth=args.poll_growth))
        shell = lvm.LvmShell("bench-lvm") if args.lvm == "shell" else None
        domain.runner.shell = shell
        mda_start = _metadata_size(domain)
        commands_before = _commands(domain.runner)
        cpu_before = _children_cpu(), time.process_time()
        volumes = [v for v in domain.list_volumes()]
        per_volume = [args.requests // len(volumes) + (i < args.requests % len(volumes)) for i in range(len(volumes))]
        latencies: list[float] = []
        errors: list[BaseException] = []
        lock = threading.Lock()

        def client(vol: storage.VolumeInfo, count: int) -> None:
            size = vol.size
            try:
                for _ in range(count):
                    size += EXTENT
                    t0 = time.monotonic()
                    granted = hsm.submit(domain.uuid, vol.uuid, size).result(timeout=120)
                    ms = (time.monotonic() - t0) * 1000
                    if granted < size:
                        raise AssertionError(f"granted {granted} < {size}")
                    with lock:
                        latencies.append(ms)
            except BaseException as e:  # noqa: BLE001 - reported after the run
                errors.append(e)

        spm.start()
        hsm.start()
        try:
            threads = [
                threading.Thread(target=client, args=(v, n), name=f"bench-client-{i}")
                for i, (v, n) in enumerate(zip(volumes, per_volume, strict=True))
            ]
            busy_before = shell.busy_seconds if shell is not None else 0.0
            start = time.monotonic()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.monotonic() - start
            busy = shell.busy_seconds - busy_before if shell is not None else None
            python_cpu = time.process_time() - cpu_before[1]
        finally:
            hsm.stop()
            spm.stop()
            domain.runner.shell = None
            if shell is not None:
                shell.close()
        # Every LVM process of the run (commands, or the shell) has exited and been waited for.
        lvm_cpu = _children_cpu() - cpu_before[0]
        if errors:
            raise errors[0]
        commands = {k: v - commands_before.get(k, 0) for k, v in _commands(domain.runner).items()}
        snap = metrics.snapshot()
        spm_io = {
            "reads": sum(f.counters.reads for f in spm_files),
            "writes": sum(f.counters.writes for f in spm_files),
        }
        for f in spm_files:
            f.close()
        return {
            "lvm_cpu_s": lvm_cpu,
            "shell_busy_s": busy,
            "python_cpu_s": python_cpu,
            "metadata_bytes": [mda_start, _metadata_size(domain)],
            "lvm_commands": commands,
            "spm_io": spm_io,
            "extends": len(latencies),
            "elapsed_s": elapsed,
            "extends_per_s": len(latencies) / elapsed,
            "p50_ms": percentile(latencies, 50),
            "p99_ms": percentile(latencies, 99),
            "max_ms": max(latencies),
            "spm_total_p50_ms": snap["total"]["p50_ms"],
            "lvextend_p50_ms": snap["lvextend"]["p50_ms"],
            "lvextend_p99_ms": snap["lvextend"]["p99_ms"],
            "lvextend_mean_ms": snap["lvextend"]["mean_ms"],
        }

    def run(self) -> dict[str, Any]:
        args = self.args
        self.setup()
        plain1 = self.plain("plain0", args.plain)
        tuned = self.plain("plain0", max(10, args.plain // 4), tuned=True)
        spm = self.spm()
        plain2 = self.plain("plain1", args.plain)
        plain = (plain1 + plain2) / 2
        extends = spm["extends"]
        commands = spm["lvm_commands"]
        per_extend = {k: round(v / extends, 3) for k, v in sorted(commands.items()) if v}
        return {
            "lease": "skipped (in-process SPM, fence is a no-op)",
            "lvm": args.lvm,
            "load": _loadavg(),
            "volumes": args.volumes,
            "workers": args.workers,
            "hsm_poll_growth": args.poll_growth,
            "extent_mb": EXTENT // c.MiB,
            "p50_ms": round(spm["p50_ms"], 3),
            "p99_ms": round(spm["p99_ms"], 3),
            "max_ms": round(spm["max_ms"], 3),
            "extends_per_s": round(spm["extends_per_s"], 2),
            "plain_lvextend_per_s": round(plain, 2),
            "plain_runs_per_s": [round(plain1, 2), round(plain2, 2)],
            "ratio": round(spm["extends_per_s"] / plain, 3),
            "extends": spm["extends"],
            "spm_total_p50_ms": spm["spm_total_p50_ms"],
            "lvextend_p50_ms": spm["lvextend_p50_ms"],
            "lvextend_p99_ms": spm["lvextend_p99_ms"],
            "plain_lvextend_ms": round(1000 / plain, 3),
            "process_lvextend_ms": round(1000 / tuned, 3),
            "mailbox_overhead_p50_ms": round(spm["p50_ms"] - spm["spm_total_p50_ms"], 3),
            "lvm_commands_per_extend": per_extend,
            "spm_io_per_extend": {k: round(v / extends, 3) for k, v in spm["spm_io"].items()},
            # CPU per extend during the SPM run: of the LVM process(es), and of
            # this process (SPM and HSM mailbox client together). One core
            # running LVM without a pause is the floor: 1000 / lvm_cpu_ms extends/s.
            "lvm_cpu_ms_per_extend": round(spm["lvm_cpu_s"] * 1000 / extends, 3),
            "python_cpu_ms_per_extend": round(spm["python_cpu_s"] * 1000 / extends, 3),
            "lvm_floor_extends_per_s": round(extends / spm["lvm_cpu_s"], 1) if spm["lvm_cpu_s"] else None,
            # Used VG metadata (vg_mda_size - vg_mda_free) before and after the
            # SPM run: interleaved extends fragment LVs and each lvextend gets
            # slower as the metadata grows, so compare figures at similar sizes.
            "metadata_kb": [round(b[0] / 1024, 1) for b in spm["metadata_bytes"]],
            "metadata_text_kb": [round(b[1] / 1024, 1) for b in spm["metadata_bytes"]],
            # Share of the SPM run with an LVM shell command running or queued:
            # the rest LVM waited for requests (mailbox, Python).
            "shell_busy_share": round(spm["shell_busy_s"] / spm["elapsed_s"], 3) if spm["shell_busy_s"] else None,
            "shell_wall_ms_per_command": (
                round(spm["shell_busy_s"] * 1000 / sum(commands.values()), 3) if spm["shell_busy_s"] else None
            ),
        }


def _commands(runner: lvm.Runner) -> dict[str, int]:
    """LVM commands run so far, by subcommand."""
    return runner.history.counts()


def _metadata_size(domain: storage.BlockDomain) -> tuple[int, int]:
    """vg_mda_size - vg_mda_free, and an estimate of the metadata text size.

    LVM 2.03 reports as free what a new copy of the text can still use: half
    of the area (it keeps room for the next copy) minus the text, so
    size - free is half the area plus the text.
    """
    info = lvm.vg_info(domain.runner, domain.vg)
    used = info.mda_size - info.mda_free
    return used, used - info.mda_size // 2


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _loadavg() -> list[float]:
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


def _print(result: dict[str, Any]) -> None:
    print(f"lease: {result['lease']}; SPM runs LVM through: {result['lvm']}; load average: {result['load']}")
    print(f"volumes in flight: {result['volumes']}, SPM workers: {result['workers']}, +{result['extent_mb']} MiB each")
    print(
        f"request -> reply: p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms, "
        f"max {result['max_ms']:.1f} ms ({result['extends']} extends)"
    )
    print(f"through the SPM:  {result['extends_per_s']:.1f} extends/s")
    print(f"plain lvextend:   {result['plain_lvextend_per_s']:.1f} /s (runs: {result['plain_runs_per_s']})")
    print(f"ratio:            {result['ratio']:.2f} (extends/s through the SPM / plain lvextend processes/s)")
    print(
        f"where the time goes (p50): lvextend {result['lvextend_p50_ms']:.1f} ms in the SPM "
        f"(a plain lvextend process {result['plain_lvextend_ms']:.1f} ms, with xtnd's LVM config "
        f"{result['process_lvextend_ms']:.1f} ms), SPM queue+lock+validate+lvextend "
        f"{result['spm_total_p50_ms']:.1f} ms, mailbox handshake {result['mailbox_overhead_p50_ms']:.1f} ms"
    )
    cmds = ", ".join(f"{k} {v}" for k, v in result["lvm_commands_per_extend"].items())
    io = result["spm_io_per_extend"]
    print(
        f"floor per extend: LVM commands {cmds}; SPM mailbox O_DIRECT I/Os: "
        f"{io['reads']} reads, {io['writes']} writes"
    )
    print(
        f"CPU per extend: LVM {result['lvm_cpu_ms_per_extend']:.2f} ms (floor with LVM never waiting: "
        f"{result['lvm_floor_extends_per_s']} extends/s), Python (SPM + HSM client) "
        f"{result['python_cpu_ms_per_extend']:.2f} ms; VG metadata used {result['metadata_kb'][0]} -> "
        f"{result['metadata_kb'][1]} KiB (text ~{result['metadata_text_kb'][0]} -> {result['metadata_text_kb'][1]} KiB)"
    )
    if result["shell_busy_share"] is not None:
        print(
            f"LVM shell busy {result['shell_busy_share'] * 100:.0f}% of the run, "
            f"{result['shell_wall_ms_per_command']:.2f} ms wall per command"
        )


def main(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("xtnd spm bench: needs root (loop devices, LVM)", flush=True)
        return 1
    bench = Bench(args)
    try:
        result = bench.run()
    finally:
        bench.cleanup()
    if args.json:
        print(json.dumps(result))
    else:
        _print(result)
    return 0
