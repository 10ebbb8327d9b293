"""``xtnd stats``: extend latencies per phase from the daemons' logs.

    xtnd stats [LOG...] [--journal] [--json] [--plot FILE.png]

Reads log files (``-`` or none: stdin), or the systemd journal of both
units with ``--journal``, and picks the completion lines of both daemons:

    HSM: extend-complete ... wait_ms=N extend_ms=N refresh_ms=N resume_ms=N total_ms=N
    SPM: extend done result=R ... queue_ms=N lock_ms=N validate_ms=N fence_ms=N lvextend_ms=N total_ms=N

Every other line, and any line that does not parse, is skipped (counted as
"ignored"). Prints count, min, p50, p90, p99 and max per phase in ms (SPM
phases over the requests that ran lvextend; every result is counted).
``--plot`` draws the latency distribution per phase and the extends over
time (needs matplotlib: Debian's python3-matplotlib).
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import subprocess
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from xtnd.common import logfmt, stats

HSM_PHASES = ("wait", "extend", "refresh", "resume", "total")
SPM_PHASES = ("queue", "lock", "validate", "fence", "lvextend", "total")
JOURNAL_UNITS = ("xtnd-hsm.service", "xtnd-spm.service")

# A timestamp at the start: ours ("2026-11-29 04:00:01,123"), or the
# journal's short-iso ("2026-11-29T04:00:01.123456+0000").
_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d)[ T](\d\d:\d\d:\d\d)(?:[.,](\d+))?([+-]\d\d:?\d\d|Z)?")


@dataclass
class Sample:
    daemon: str  # "hsm" or "spm"
    time: float | None  # seconds since the epoch, when the line had a timestamp
    result: str
    phases: dict[str, float]  # ms


@dataclass
class Collected:
    samples: list[Sample] = field(default_factory=list)
    lines: int = 0
    ignored: int = 0


def _timestamp(line: str) -> float | None:
    m = _STAMP.match(line)
    if m is None:
        return None
    day, clock, frac, zone = m.groups()
    text = f"{day}T{clock}.{(frac or '0')[:6]}"
    when = datetime.datetime.fromisoformat(text)
    if zone:
        zone = "+00:00" if zone == "Z" else zone if ":" in zone else f"{zone[:3]}:{zone[3:]}"
        when = when.replace(tzinfo=datetime.datetime.fromisoformat(f"2000-01-01T00:00:00{zone}").tzinfo)
    return when.timestamp()


def parse_line(line: str) -> Sample | None:
    """The sample of one completion line, None for any other line."""
    for marker, daemon, phases in (("extend-complete ", "hsm", HSM_PHASES), ("extend done ", "spm", SPM_PHASES)):
        at = line.find(marker)
        if at < 0:
            continue
        fields = logfmt.parse(line[at + len(marker) :])
        try:
            values = {p: float(fields[f"{p}_ms"]) for p in phases}
            when = _timestamp(line)
        except (KeyError, ValueError):
            return None
        return Sample(daemon, when, fields.get("result", "extended"), values)
    return None


def collect(lines: Iterable[str]) -> Collected:
    out = Collected()
    for line in lines:
        out.lines += 1
        sample = parse_line(line)
        if sample is None:
            if "extend-complete " in line or "extend done " in line:
                out.ignored += 1
            continue
        out.samples.append(sample)
    return out


def _figures(values: list[float]) -> dict[str, float]:
    if not values:
        return {"count": 0}
    return {
        "count": len(values),
        "min": min(values),
        "p50": stats.percentile(values, 50),
        "p90": stats.percentile(values, 90),
        "p99": stats.percentile(values, 99),
        "max": max(values),
    }


def summarize(c: Collected) -> dict[str, Any]:
    hsm = [s for s in c.samples if s.daemon == "hsm"]
    spm = [s for s in c.samples if s.daemon == "spm"]
    spm_extended = [s for s in spm if s.result == "extended"]
    results: dict[str, int] = {}
    for s in spm:
        results[s.result] = results.get(s.result, 0) + 1
    return {
        "lines": c.lines,
        "ignored": c.ignored,
        "hsm": {
            "count": len(hsm),
            "phases": {p: _figures([s.phases[p] for s in hsm]) for p in HSM_PHASES},
        },
        "spm": {
            "count": len(spm),
            "results": dict(sorted(results.items())),
            "phases": {p: _figures([s.phases[p] for s in spm_extended]) for p in SPM_PHASES},
        },
    }


def render(summary: dict[str, Any]) -> str:
    rows = [("DAEMON", "PHASE", "COUNT", "MIN", "P50", "P90", "P99", "MAX")]
    for daemon in ("hsm", "spm"):
        for phase, f in summary[daemon]["phases"].items():
            if f["count"]:
                rows.append(
                    (daemon, phase, str(f["count"]), *(f"{f[k]:.1f}" for k in ("min", "p50", "p90", "p99", "max")))
                )
    out = []
    if len(rows) > 1:
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        out = [
            "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
            for r in rows
        ]
        out.append("(milliseconds; SPM phases over requests that ran lvextend)")
    spm = summary["spm"]
    results = " ".join(f"{k}={v}" for k, v in spm["results"].items()) or "-"
    out.append(f"hsm extends: {summary['hsm']['count']}  spm requests: {spm['count']} ({results})")
    out.append(f"lines read: {summary['lines']}  completion lines ignored (unparsable): {summary['ignored']}")
    return "\n".join(out) + "\n"


def plot(c: Collected, path: str) -> None:
    """Latency distribution per phase (one panel per daemon) and extends over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    plain = FuncFormatter(lambda v, _pos: f"{v:g}")

    fig, axes = plt.subplots(3, 1, figsize=(10, 13))
    for ax, daemon, phases in ((axes[0], "hsm", HSM_PHASES), (axes[1], "spm", SPM_PHASES)):
        samples = [s for s in c.samples if s.daemon == daemon and (daemon == "hsm" or s.result == "extended")]
        for phase in phases:
            values = sorted(max(s.phases[phase], 0.001) for s in samples)
            if values:
                share = [(i + 1) / len(values) for i in range(len(values))]
                ax.step(values, share, where="post", label=f"{phase} (p50 {stats.percentile(values, 50):.1f} ms)")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("latency (ms, log scale; below 0.001 drawn at 0.001)")
        ax.set_ylabel("share of extends at or below")
        ax.set_title(f"{daemon.upper()} extend latency per phase ({len(samples)} extends)")
        ax.grid(True, which="both", alpha=0.3)
        if samples:
            ax.legend(loc="lower right", fontsize="small")
        else:
            ax.text(0.5, 0.5, f"no {daemon.upper()} completion lines", ha="center", va="center", transform=ax.transAxes)
    ax = axes[2]
    for daemon, marker in (("hsm", "o"), ("spm", "x")):
        timed = [s for s in c.samples if s.daemon == daemon and s.time is not None]
        if timed:
            when = [datetime.datetime.fromtimestamp(s.time) for s in timed if s.time is not None]
            ax.scatter(when, [s.phases["total"] for s in timed], marker=marker, s=14, label=f"{daemon} total")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.set_ylabel("total latency (ms, log scale)")
    ax.set_title("Extends over time")
    ax.grid(True, which="both", alpha=0.3)
    if any(s.time is not None for s in c.samples):
        ax.legend(loc="upper right", fontsize="small")
        for label in ax.get_xticklabels():
            label.set_rotation(20)
            label.set_horizontalalignment("right")
    else:
        ax.text(0.5, 0.5, "no timestamps in the input", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _read(paths: list[str], journal: bool) -> Iterator[str]:
    if journal:
        units = [a for u in JOURNAL_UNITS for a in ("-u", u)]
        cmd = ["journalctl", *units, "-o", "short-iso-precise", "--no-pager", "-q"]
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, errors="replace") as proc:
            assert proc.stdout is not None
            yield from proc.stdout
        if proc.returncode:
            raise OSError(f"journalctl exited with status {proc.returncode}")
        return
    for path in paths or ["-"]:
        if path == "-":
            yield from sys.stdin
            continue
        f: IO[str]
        with open(path, errors="replace") as f:
            yield from f


def _main(args: argparse.Namespace) -> int:
    try:
        collected = collect(_read(args.logs, args.journal))
    except OSError as e:
        print(f"xtnd stats: {e.strerror or e}: {getattr(e, 'filename', '') or ''}".rstrip(": "), file=sys.stderr)
        return 1
    summary = summarize(collected)
    if args.plot:
        try:
            plot(collected, args.plot)
        except ImportError:
            print("xtnd stats: --plot needs matplotlib (apt install python3-matplotlib)", file=sys.stderr)
            return 1
        except OSError as e:
            print(f"xtnd stats: cannot write {args.plot}: {e.strerror or e}", file=sys.stderr)
            return 1
        summary["plot"] = args.plot
    if args.json:
        json.dump(summary, sys.stdout, indent=2)
        print()
    else:
        sys.stdout.write(render(summary))
        if args.plot:
            print(f"plot: {args.plot}")
    return 0


def register(top: Any) -> None:
    p = top.add_parser(
        "stats",
        help="extend latency per phase (min/p50/p90/p99/max) from the daemons' logs",
        description="Read the completion lines of both daemons (files, stdin, or the journal) and print extend "
        "latency figures per phase; optionally plot them.",
    )
    p.add_argument("logs", nargs="*", metavar="LOG", help="log files ('-' or none: stdin)")
    p.add_argument("--journal", action="store_true", help=f"read the journal of {' and '.join(JOURNAL_UNITS)}")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="draw latency distributions and extends over time")
    p.set_defaults(func=_main)
