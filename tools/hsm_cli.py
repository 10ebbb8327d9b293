"""``xtnd hsm``: the HSM daemon, its configuration and its benchmark.

    xtnd hsm --config /etc/xtnd/hsm.conf            run the daemon (SIGTERM stops it)
    xtnd hsm --config /etc/xtnd/hsm.conf --show-config
    xtnd hsm --config /etc/xtnd/hsm.conf --check-config   validate it and exit (0 or 2)
    xtnd hsm log-level LOGGER LEVEL                 change a logger of the running HSM
    xtnd hsm bench [--json] ...                     see xtnd.tools.hsm_bench

Also adds ``xtnd volume prepare|teardown`` (xtnd.tools.volume_host_cli):
the commands a host runs to use a volume, next to the daemon that watches it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from xtnd.common.ini import EXIT_CONFIG
from xtnd.hsm import config as hsm_config
from xtnd.tools import volume_host_cli

DEFAULT_CONFIG = "/etc/xtnd/hsm.conf"


def _daemon(args: argparse.Namespace) -> int:
    try:
        config = hsm_config.load(args.config)
        if args.show_config:
            sys.stdout.write(hsm_config.show(config))
            return 0
        config.validate()
    except hsm_config.ConfigError as e:
        print(f"xtnd hsm: {e}", file=sys.stderr)
        return EXIT_CONFIG
    if args.check_config:
        print(f"{args.config}: OK ({len(config.sources)} file(s))")
        return 0
    from xtnd.hsm import daemon  # libvirt and storage only when running
    from xtnd.tools import cli

    cli.setup_logging(args.verbose, daemon=True)

    if args.verbose == 0:
        # A daemon logs its state changes and extend-complete lines (INFO)
        # even without -v; -vv still gives DEBUG.
        logging.getLogger("xtnd").setLevel(logging.INFO)
    return daemon.run(config)


def register(top: Any) -> None:
    volume_host_cli.register(top)
    p = top.add_parser("hsm", help="the HSM daemon: watch thin VM disks, extend, refresh, resume")
    p.add_argument(
        "--config", default=DEFAULT_CONFIG, help=f"config file, drop-ins in FILE.d/*.conf (default {DEFAULT_CONFIG})"
    )
    p.add_argument("--show-config", action="store_true", help="print the effective configuration and exit")
    p.add_argument(
        "--check-config", action="store_true", help="validate the configuration and exit (2 if it cannot be used)"
    )
    p.set_defaults(func=_daemon)
    sub = p.add_subparsers(dest="hsm_command", metavar="SUBCOMMAND")
    from xtnd.tools import status_cli

    status_cli.add_log_level(sub, "hsm")
    from xtnd.tools import hsm_bench

    hsm_bench.register(sub)
