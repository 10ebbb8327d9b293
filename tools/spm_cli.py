"""``xtnd spm``: the SPM daemon, its effective config, and its benchmark.

    xtnd spm --config /etc/xtnd/spm.conf            run the daemon (systemd: xtnd-spm.service)
    xtnd spm --config FILE --show-config            print the effective config and exit
    xtnd spm --config FILE --check-config           validate it and exit (0 or 2)
    xtnd spm stats [--socket PATH]                   a running SPM's counters and latencies
    xtnd spm log-level LOGGER LEVEL                  change a logger of the running SPM
    xtnd spm bench [--volumes N] [--requests N] [--json]

The daemon logs at INFO unless -v/-vv asks for more.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from xtnd.common.ini import EXIT_CONFIG
from xtnd.spm import config as spm_config

log = logging.getLogger("xtnd.spm")


def _daemon(args: argparse.Namespace) -> int:
    try:
        config = spm_config.load(args.config)
    except spm_config.ConfigError as e:
        print(f"xtnd spm: {e}", file=sys.stderr)
        return EXIT_CONFIG
    if args.check_config:
        print(f"{args.config}: OK ({len(config.sources)} file(s))")
        return 0
    if args.show_config:
        sys.stdout.write(spm_config.show(config))
        return 0
    from xtnd.tools import cli

    cli.setup_logging(args.verbose, daemon=True)
    root = logging.getLogger()
    if root.level > logging.INFO:
        root.setLevel(logging.INFO)
    from xtnd.spm.daemon import SpmDaemon

    return SpmDaemon(config).run()


def _stats(args: argparse.Namespace) -> int:
    from xtnd.spm.control import ControlClient, ControlError
    from xtnd.tools import errors

    client = ControlClient(args.socket)
    try:
        result = client.call("stats")
    except ConnectionRefusedError:
        print(
            f"xtnd spm stats: {client.path}: no SPM daemon listens (connection refused; a stale socket)",
            file=sys.stderr,
        )
        return 1
    except FileNotFoundError:
        print(f"xtnd spm stats: {client.path}: no such socket (is xtnd-spm running here?)", file=sys.stderr)
        return 1
    except (OSError, ControlError) as e:
        print(f"xtnd spm stats: {client.path}: {errors.describe(e)}", file=sys.stderr)
        return 1
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


def _bench(args: argparse.Namespace) -> int:
    from xtnd.tools import spm_bench

    return spm_bench.main(args)


def register(subparsers: Any) -> None:
    spm = subparsers.add_parser(
        "spm",
        help="run the SPM daemon (extends LVs for every host), or benchmark it",
        description="Run the SPM daemon: join the master domain's lockspace, take the SPM lease, serve extends.",
    )
    spm.add_argument("--config", default=spm_config.DEFAULT_PATH, help="daemon config (default %(default)s)")
    spm.add_argument("--show-config", action="store_true", help="print the effective configuration and exit")
    spm.add_argument(
        "--check-config", action="store_true", help="validate the configuration and exit (2 if it cannot be used)"
    )
    spm.set_defaults(func=_daemon)
    sub = spm.add_subparsers(dest="spm_command", metavar="SUBCOMMAND")

    stats = sub.add_parser("stats", help="counters and latencies of the running SPM (control socket)")
    stats.add_argument("--socket", help="control socket (default $XTND_SPM_SOCKET or /run/xtnd/spm.sock)")
    stats.set_defaults(func=_stats)

    from xtnd.tools import status_cli

    status_cli.add_log_level(sub, "spm")

    from xtnd.tools import spm_bench

    bench = sub.add_parser("bench", help="extend latency and rate through the mailbox vs plain lvextend")
    spm_bench.add_arguments(bench)
    bench.set_defaults(func=_bench)


def main(argv: list[str] | None = None) -> int:
    """``python -m xtnd.tools.spm_cli ARGS`` = ``xtnd spm ARGS``.

    The same parser and code as the ``xtnd`` entry point, with only this
    command loaded (tests start daemons this way).
    """
    from xtnd.tools import cli

    parser = argparse.ArgumentParser(prog="xtnd")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["spm", *(sys.argv[1:] if argv is None else argv)])
    cli.setup_logging(args.verbose)
    return cli.run("xtnd", args)


if __name__ == "__main__":
    sys.exit(main())
