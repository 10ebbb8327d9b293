"""The ``xtnd`` command.

Each area adds its own subcommands: a module listed below defines
``register(subparsers)``, adding parsers whose defaults carry ``func``, the
function to call with the parsed arguments. Its return value is the exit
code. Modules are imported only to build the parser, so importing this
module stays cheap.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import logging
import sys

# Subcommands of "xtnd mailbox".
MAILBOX_COMMANDS = [
    "xtnd.tools.inspect",
    "xtnd.tools.mailbox_bench",
    "xtnd.tools.mailbox_demo",
]

# Top-level subcommands ("xtnd demo", "xtnd spm", ...).
TOP_COMMANDS = [
    "xtnd.tools.domain_cli",
    "xtnd.tools.demo",
    "xtnd.tools.hsm_cli",
    "xtnd.tools.inject_cli",
    "xtnd.tools.move_cli",
    "xtnd.tools.spm_cli",
    "xtnd.tools.stats_cli",
    "xtnd.tools.status_cli",
]


def version() -> str:
    """The installed distribution's version (the Debian package ships its metadata too)."""
    try:
        return importlib.metadata.version("xtnd")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xtnd", description="Keep thin VM disks on shared block storage from filling."
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    parser.add_argument("--version", action="version", version=f"xtnd {version()}")
    top = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    mailbox = top.add_parser("mailbox", help="inspect and benchmark the storage mailbox")
    mailbox_sub = mailbox.add_subparsers(dest="mailbox_command", required=True, metavar="SUBCOMMAND")
    for name in MAILBOX_COMMANDS:
        importlib.import_module(name).register(mailbox_sub)
    for name in TOP_COMMANDS:
        importlib.import_module(name).register(top)
    return parser


LOG_FORMAT = "%(asctime)s %(levelname)-7s (%(threadName)s) [%(name)s] %(message)s"


class _OperatorFormatter(logging.Formatter):
    """A command's stderr without -v: warnings in one line each.

    Errors are left out: the command prints its own one-line error, and
    their detail (LVM command history, tracebacks) is for ``-v``/``-vv``.
    """

    def format(self, record: logging.LogRecord) -> str:
        first = record.getMessage().split("\n", 1)[0]
        return f"xtnd: {record.levelname.lower()}: {first}"


def setup_logging(verbose: int, daemon: bool = False) -> None:
    """Daemons log with time, thread and logger; commands, without -v, only
    one line per warning (see _OperatorFormatter)."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    if verbose == 0 and not daemon:
        handler.setFormatter(_OperatorFormatter())
        handler.addFilter(lambda record: record.levelno < logging.ERROR)
    else:
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
    # Replace the handler an earlier call added (a daemon switches to the
    # full format once its config is good). Like logging.basicConfig, do
    # nothing when someone else configured logging (pytest in-process).
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "xtnd_cli", False)]:
        root.removeHandler(old)
    if root.handlers:
        return
    handler.xtnd_cli = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)


def run(prog: str, args: argparse.Namespace) -> int:
    """Run a parsed command; any error becomes one line on stderr (the
    traceback goes to the log at debug level): no traceback reaches an
    operator. Configuration errors exit with 2, other errors with 1."""
    from xtnd.common.ini import EXIT_CONFIG, ConfigError
    from xtnd.tools import errors

    try:
        rc: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    except ConfigError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except Exception as e:  # noqa: BLE001 (last resort: no traceback reaches an operator)
        print(errors.report(prog, e), file=sys.stderr)
        return 1
    return rc


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    return run("xtnd", args)


if __name__ == "__main__":
    sys.exit(main())
