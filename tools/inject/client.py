"""An HSM mailbox client as its own process, for scenarios that kill an HSM.

    python -m xtnd.tools.inject.client INBOX OUTBOX HOST_ID DOMAIN VOLUME:BYTES...

Submits every request through the real HSM mailbox code, waits for every
answer (a failure answer counts), exits 0; 1 if one is still unanswered
after --timeout. History: XTND_HISTORY / XTND_HISTORY_NAME as every process.
"""

from __future__ import annotations

import argparse
import sys
import uuid

from xtnd.mailbox.directio import DirectFile
from xtnd.mailbox.hsm import HSMConfig, HSMMailbox


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="xtnd.tools.inject.client")
    p.add_argument("inbox")
    p.add_argument("outbox")
    p.add_argument("host_id", type=int)
    p.add_argument("domain", type=uuid.UUID)
    p.add_argument("asks", nargs="+", help="VOLUME:BYTES")
    p.add_argument("--timeout", type=float, default=120.0)
    args = p.parse_args(argv)
    inbox, outbox = DirectFile(args.inbox), DirectFile(args.outbox)
    hsm = HSMMailbox(inbox, outbox, args.host_id, HSMConfig(reoffer_timeout=60.0))
    hsm.start()
    futures = []
    for ask in args.asks:
        vol, _, size = ask.partition(":")
        futures.append(hsm.submit(args.domain, uuid.UUID(vol), int(size)))
    missing = 0
    for fut in futures:
        try:
            fut.exception(timeout=args.timeout)
        except TimeoutError:
            missing += 1
    hsm.stop(timeout=5)
    inbox.close()
    outbox.close()
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
