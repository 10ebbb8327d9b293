"""``xtnd inject``: run fault scenarios against a throw-away real rig.

    xtnd inject --list
    xtnd inject SCENARIO... [--trials N] [--seed S] [--json] [--report FILE]
    xtnd inject --all [--trials N] ...
    xtnd inject soak [--hosts 250] [--duration SECONDS]

Each scenario builds its rig (loop-device PV, master domain, one sanlock
daemon per SPM host in its own mount namespace, real ``xtnd spm``
processes, HSM mailbox clients), runs its trials (inject, then prove the
trial from its recorded history), and tears everything down, also on
Ctrl-C. Progress goes to stderr; the table (or with --json the whole report
as one JSON object on the last line) to stdout. Exit code: 0 every verdict
passed, 1 a verdict failed, 2 bad usage or the rig cannot be built here,
130 interrupted.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import statistics
import sys
from typing import Any

EXIT_FAILED = 1
EXIT_USAGE = 2


def _trial_seed(seed: int, scenario: str, index: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{scenario}/{index}".encode()).digest()[:8], "big")


def run_scenario(rig: Any, name: str, trials: int, seed: int) -> dict[str, Any]:
    """Run one scenario's trials on the rig; its report object."""
    from xtnd.tools.inject import harness, scenarios

    scenario = scenarios.BY_NAME[name]
    rig.scenario = name
    totals = {"sent": 0, "answered": 0, "refused": 0, "lost": 0, "wrong_extends": 0, "overlapping_spms": 0}
    recoveries: list[float] = []
    failures: list[str] = []
    logs: list[str] = []
    for i in range(trials):
        trial = harness.Trial(rig, i, _trial_seed(seed, name, i))
        trial.phase("start")
        try:
            scenario.func(trial)
        except Exception as e:  # noqa: BLE001 - a failing trial is a verdict, not a crash of the harness
            trial.fail(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        trial.phase("checking the history")
        result = trial.finish()
        for key, value in (("sent", result.sent), ("answered", result.answered), ("refused", result.refused),
                           ("lost", result.lost), ("wrong_extends", result.wrong_extends),
                           ("overlapping_spms", result.overlaps)):
            totals[key] += value
        if result.recovery is not None:
            recoveries.append(result.recovery)
        verdict = "pass" if result.ok else "FAIL"
        trial.phase(f"{verdict} sent={result.sent} answered={result.answered} lost={result.lost}"
                    + (f" first violation: {result.violations[0]}" if result.violations else ""))
        failures += [f"trial {i + 1}: {v}" for v in result.violations]
        if result.violations:
            kept = harness.keep(trial)
            harness.progress(f"{name} trial {i + 1}: logs and history kept in {kept}")
            logs.append(kept)
    report: dict[str, Any] = {"scenario": name, "trials": trials, **totals}
    report["recovery_p50"] = round(statistics.median(recoveries), 3) if recoveries else None
    report["recovery_max"] = round(max(recoveries), 3) if recoveries else None
    report["verdict"] = "fail" if failures else "pass"
    if failures:
        report["reason"] = failures[0]
        report["violations"] = failures[:50]
        report["logs"] = logs
    return report


def _table(reports: list[dict[str, Any]]) -> str:
    cols = ("scenario", "trials", "sent", "answered", "refused", "lost", "wrong_extends", "overlapping_spms",
            "recovery_p50", "recovery_max", "verdict")
    heads = ("scenario", "trials", "sent", "answered", "refused", "lost", "wrong", "overlap", "rec p50", "rec max",
             "verdict")
    rows = [[("-" if r.get(c) is None else str(r[c])) for c in cols] for r in reports]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(heads)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(heads, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in rows]
    for r in reports:
        if r["verdict"] != "pass":
            lines.append(f"{r['scenario']}: {r['reason']}")
    return "\n".join(lines)


def _main(args: argparse.Namespace) -> int:
    from xtnd.tools.inject import harness, scenarios

    if args.list:
        for s in scenarios.SCENARIOS:
            print(f"{s.name:22} {s.summary}{' (long)' if s.long else ''}")
            print(f"{'':22}   must hold: {s.expect}")
        return 0
    if args.scenarios[:1] == ["soak"]:
        return _soak(args)
    names = [s.name for s in scenarios.SCENARIOS] if args.all else args.scenarios
    if not names:
        print("xtnd inject: name a scenario, or --all, or --list", file=sys.stderr)
        return EXIT_USAGE
    unknown = [n for n in names if n not in scenarios.BY_NAME]
    if unknown:
        print(f"xtnd inject: unknown scenario {', '.join(unknown)} (see xtnd inject --list)", file=sys.stderr)
        return EXIT_USAGE
    if args.trials < 1:
        print("xtnd inject: --trials must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    if os.geteuid() != 0:
        print("xtnd inject: must run as root (loop devices, LVM, sanlock)", file=sys.stderr)
        return EXIT_USAGE
    if args.verbose == 0:
        # The clients' warnings (failure answers, re-offers) are expected
        # while faults are injected; the history and verdicts tell the story.
        logging.getLogger("xtnd.mailbox").setLevel(logging.ERROR)
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    harness.progress(f"seed {seed}")
    reports = []
    try:
        with harness.sigterm_as_interrupt():
            # One rig for the whole run: every trial has its own volumes,
            # processes and history; the sanlock daemons stay joined.
            harness.progress("building the rig")
            with harness.Rig("run") as rig:
                for name in names:
                    reports.append(run_scenario(rig, name, args.trials, seed))
    except harness.SetupError as e:
        print(f"xtnd inject: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("xtnd inject: interrupted; the rig was torn down", file=sys.stderr)
        return 130
    report = {"seed": seed, "scenarios": reports, "verdict": "fail" if any(
        r["verdict"] != "pass" for r in reports) else "pass"}
    if args.report:
        with open(args.report, "w") as f:
            json.dump(report, f, indent=2)
    if args.json:
        print(json.dumps(report, separators=(",", ":")))
    else:
        print(_table(reports))
    return EXIT_FAILED if report["verdict"] != "pass" else 0


def _soak(args: argparse.Namespace) -> int:
    """``xtnd inject soak --hosts N --duration SECONDS`` (see xtnd.tools.inject.soak)."""
    from xtnd.tools.inject import harness, soak

    if len(args.scenarios) > 1 or args.all:
        print("xtnd inject: soak runs alone", file=sys.stderr)
        return EXIT_USAGE
    if not 1 <= args.hosts <= 1998 or args.duration <= 0:
        print("xtnd inject: --hosts must be 1..1998 and --duration positive", file=sys.stderr)
        return EXIT_USAGE
    if os.geteuid() != 0:
        print("xtnd inject: must run as root (loop devices, LVM, sanlock)", file=sys.stderr)
        return EXIT_USAGE
    if args.verbose == 0:
        logging.getLogger("xtnd.mailbox").setLevel(logging.ERROR)
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    harness.progress(f"seed {seed}")
    try:
        with harness.sigterm_as_interrupt(), harness.Rig("soak", max_hosts=args.hosts + 2) as rig:
            rig.scenario = "soak"
            trial = harness.Trial(rig, 0, seed)
            try:
                figures = soak.run(trial, args.hosts, args.duration, seed)
            except Exception as e:  # noqa: BLE001 - a verdict, not a crash
                trial.fail(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                figures = {}
            result = trial.finish()
            if result.violations:
                harness.progress(f"soak: logs and history kept in {harness.keep(trial)}")
    except harness.SetupError as e:
        print(f"xtnd inject: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("xtnd inject: interrupted; the rig was torn down", file=sys.stderr)
        return 130
    lost = result.lost + int(figures.get("lean_lost", 0))
    entry: dict[str, Any] = {
        "scenario": "soak", "trials": 1,
        "sent": result.sent + int(figures.get("lean_sent", 0)),
        "answered": result.answered + int(figures.get("lean_answered", 0)),
        "refused": result.refused, "lost": lost, "wrong_extends": result.wrong_extends,
        "overlapping_spms": result.overlaps, "recovery_p50": None, "recovery_max": None,
        "verdict": "fail" if result.violations or lost else "pass", **figures,
    }
    if entry["verdict"] == "fail":
        entry["reason"] = result.violations[0] if result.violations else f"{lost} lean requests unanswered"
        entry["violations"] = result.violations[:50]
    report = {"seed": seed, "scenarios": [entry], "verdict": entry["verdict"]}
    if args.report:
        with open(args.report, "w") as f:
            json.dump(report, f, indent=2)
    if args.json:
        print(json.dumps(report, separators=(",", ":")))
    else:
        print(_table([entry]))
        print(f"soak: hosts={figures.get('hosts')} rounds={figures.get('rounds')} faults={figures.get('faults')} "
              f"lean latency ms={figures.get('latency_ms')}")
    return EXIT_FAILED if entry["verdict"] != "pass" else 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "inject",
        help="fault injection against a throw-away real rig, verdicts from a recorded history",
        description="Run fault scenarios against a throw-away rig of real components and check what happened.",
    )
    p.add_argument("scenarios", nargs="*", metavar="SCENARIO", help="scenarios to run (see --list)")
    p.add_argument("--list", action="store_true", help="list the scenarios and what each must prove")
    p.add_argument("--all", action="store_true", help="run every scenario")
    p.add_argument("--trials", type=int, default=1, help="trials per scenario (default %(default)s)")
    p.add_argument("--seed", type=int, help="random seed (default: random, printed)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object on the last line")
    p.add_argument("--report", metavar="FILE", help="also write the JSON report to FILE")
    p.add_argument("--hosts", type=int, default=250, help="soak: simulated hosts (default %(default)s)")
    p.add_argument("--duration", type=float, default=60.0, help="soak: seconds (default %(default)s)")
    p.set_defaults(func=_main)
