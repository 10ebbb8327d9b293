"""Run ``xtnd ARGV`` in the test process, through the real entry point."""

from __future__ import annotations

from xtnd.tools import cli


def xtnd(*argv: str) -> int:
    """The exit code of ``xtnd ARGV`` (argparse errors raise SystemExit)."""
    return cli.main(list(argv))
