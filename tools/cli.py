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
]

# Top-level subcommands ("xtnd demo", "xtnd spm", ...).
TOP_COMMANDS = [
    "xtnd.tools.domain_cli",
    "xtnd.tools.demo",
    "xtnd.tools.hsm_cli",
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


def setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)-7s (%(threadName)s) [%(name)s] %(message)s",
        stream=sys.stderr,
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        rc: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    return rc


if __name__ == "__main__":
    sys.exit(main())
