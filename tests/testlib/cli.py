"""Run ``xtnd ARGV`` in the test process, through the real entry point."""

from __future__ import annotations

from xtnd.tools import cli


def xtnd(*argv: str) -> int:
    """The exit code of ``xtnd ARGV`` (argparse errors raise SystemExit)."""
    return cli.main(list(argv))


def ctrl_c_default() -> None:
    """preexec_fn for a child a test Ctrl-Cs: SIGINT back to its default.

    A test run started in the background by a non-interactive shell (nohup
    cmd &) inherits SIGINT ignored, and so would the child: the test's
    SIGINT would then do nothing and the test fail for a reason outside it.
    """
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
