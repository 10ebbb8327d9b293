from __future__ import annotations

import os
import uuid

from xtnd.mailbox import codec
from xtnd.tools import mailbox_view as view

BLOCK = codec.BLOCK_SIZE
REQUEST = codec.encode(codec.Extend(uuid.uuid4(), uuid.uuid4(), 1024))


def write_block(path: str, index: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(index * BLOCK)
        f.write(data)


def test_default_max_hosts() -> None:
    assert view.default_max_hosts(251 * BLOCK, 251 * BLOCK) == 250
    assert view.default_max_hosts(251 * BLOCK, 11 * BLOCK + 5) == 10
    assert view.default_max_hosts(16 * 1024**2, 16 * 1024**2) == 2000
    assert view.default_max_hosts(0, BLOCK) == 0


def test_scanner_reuses_unchanged_hosts(workdir: str) -> None:
    """watch rescans a live mailbox: only changed blocks are decoded again."""
    inbox = os.path.join(workdir, "inbox")
    outbox = os.path.join(workdir, "outbox")
    for path in (inbox, outbox):
        with open(path, "wb") as f:
            f.truncate(11 * BLOCK)
    write_block(inbox, 1, codec.build_block([REQUEST]))
    write_block(inbox, 2, codec.build_block([REQUEST]))
    with view.AreaReader(inbox) as ib, view.AreaReader(outbox) as ob:
        scanner = view.Scanner(ib, ob, None, None)
        first = scanner.scan()
        assert [h.host for h in first.hosts] == [1, 2]

        write_block(outbox, 2, codec.build_block([REQUEST], with_checksum=False))
        second = scanner.scan()
        assert second.hosts[0] is first.hosts[0]
        assert second.hosts[1].slots[0].verdict.state == "replied"

        write_block(inbox, 1, bytes(BLOCK))
        third = scanner.scan()
        assert [h.host for h in third.hosts] == [2]
        assert third.hosts[0] is second.hosts[1]
