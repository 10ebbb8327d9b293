"""xtnd stats on log files and stdin: figures, JSON, the plot, and noise."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from xtnd.hsm.metrics import ExtendRecord
from xtnd.tools import stats_cli

XTND = [sys.executable, "-m", "xtnd.tools.cli", "stats"]
SPM_LINE = (
    "2026-11-29 04:07:{s:02d},254 INFO    (mailbox-spm-worker-1) [xtnd.spm.extend] extend done result={result} "
    "domain=730fd448-20ee-4bf6-b070-4594940b0680 volume=820a404c-bd7b-42ee-af4c-c95c7e2357d1 host_id=1 slot=1 "
    "size_mb=8 granted_mb=8 queue_ms=0.456 lock_ms=0.020 validate_ms=0.223 fence_ms=0.300 lvextend_ms={lvx:.3f} "
    "total_ms={total:.3f}"
)


def hsm_line(i: int, total: float) -> str:
    # The daemon's own completion line, with a VM name that needs quoting.
    r = ExtendRecord("u", f'vm "{i}" x', "vda", "d", "v", "threshold", 1 << 24, 2 << 24, 0.0, 0.01, total - 0.02,
                     total - 0.01, total, False)  # fmt: skip
    return f"2026-11-29 04:08:{i:02d},100 INFO    (w) [xtnd.hsm] {r.line()}"


def write_logs(workdir: str) -> tuple[str, str]:
    spm = os.path.join(workdir, "spm.log")
    with open(spm, "w") as f:
        f.write("2026-11-29 04:07:00,000 INFO    (MainThread) [xtnd.spm.daemon] serving started host_id=1\n")
        for i in range(1, 11):
            f.write(SPM_LINE.format(s=i, result="extended", lvx=10.0 * i, total=10.0 * i + 1) + "\n")
        f.write(SPM_LINE.format(s=30, result="noop", lvx=0, total=0.5) + "\n")
        f.write(SPM_LINE.format(s=31, result="refused", lvx=0, total=0.7) + ' reason="unknown volume"\n')
        f.write("garbage \x00\x01 extend done result=extended queue_ms=oops\n")  # broken: ignored
        f.write("\n")
    hsm = os.path.join(workdir, "hsm.log")
    with open(hsm, "w") as f:
        f.write("not a log line at all\n")
        for i in range(1, 5):
            f.write(hsm_line(i, 0.1 * i) + "\n")
    return spm, hsm


def test_figures_from_files_and_stdin(workdir: str) -> None:
    spm, hsm = write_logs(workdir)
    out = subprocess.run([*XTND, "--json", spm, hsm], capture_output=True, text=True, check=True).stdout
    summary = json.loads(out)
    assert summary["ignored"] == 1
    assert summary["spm"]["results"] == {"extended": 10, "noop": 1, "refused": 1}
    lvx = summary["spm"]["phases"]["lvextend"]
    assert (lvx["count"], lvx["min"], lvx["p50"], lvx["p90"], lvx["max"]) == (10, 10.0, 50.0, 90.0, 100.0)
    total = summary["hsm"]["phases"]["total"]
    assert (total["count"], total["min"], total["max"]) == (4, 100.0, 400.0)
    assert summary["hsm"]["phases"]["extend"]["p50"] == 170.0  # t_reply - t_request = 0.2 - 0.02 - 0.01
    with open(spm) as f:
        text = subprocess.run(XTND, stdin=f, capture_output=True, text=True, check=True).stdout
    assert "spm     lvextend     10  10.0  50.0  90.0  100.0  100.0" in text
    assert "hsm extends: 0  spm requests: 12 (extended=10 noop=1 refused=1)" in text


def test_plot(workdir: str) -> None:
    spm, hsm = write_logs(workdir)
    png = os.path.join(workdir, "stats.png")
    done = subprocess.run([*XTND, "--plot", png, spm, hsm], capture_output=True, text=True, check=True)
    assert done.stdout.endswith(f"plot: {png}\n")
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(png) > 20000


def test_errors_are_one_line(workdir: str) -> None:
    missing = subprocess.run([*XTND, os.path.join(workdir, "nope.log")], capture_output=True, text=True)
    assert missing.returncode == 1
    assert missing.stderr.startswith("xtnd stats: No such file or directory") and "Traceback" not in missing.stderr
    bad = subprocess.run([*XTND, "--plot", "/nonexistent/dir/x.png", "-"], input="", capture_output=True, text=True)
    assert bad.returncode == 1 and "cannot write /nonexistent/dir/x.png" in bad.stderr


def test_timestamps() -> None:
    sample = stats_cli.parse_line("2026-11-29T04:00:01.500000+0000 host xtnd[1]: " + hsm_line(1, 0.1).split("] ")[1])
    assert sample is not None and sample.time == 1795924801.5
    assert stats_cli.parse_line("extend done result=extended total_ms=1") is None  # phases missing
