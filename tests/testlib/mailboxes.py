"""Mailbox areas on real storage for tests: files, guarded loop devices."""

from __future__ import annotations

from collections.abc import Callable

from xtnd.mailbox import codec, directio

MAX_HOSTS = 250
AREA = 1024 * 1024  # (MAX_HOSTS + 1) blocks fit


class Areas:
    """An inbox/outbox pair; open() gives each "host" its own handles."""

    def __init__(self, opener: Callable[[str], directio.Storage], check: Callable[[], None] = lambda: None):
        self._opener = opener
        self.check = check
        self.handles: list[directio.Storage] = []

    def open(self) -> tuple[directio.Storage, directio.Storage]:
        pair = (self._opener("inbox"), self._opener("outbox"))
        self.handles.extend(pair)
        return pair

    def read_block(self, area: str, host: int) -> bytes:
        return self._opener(area).read(host * codec.BLOCK_SIZE, codec.BLOCK_SIZE)

    def write_block(self, area: str, host: int, data: bytes) -> None:
        self._opener(area).write(host * codec.BLOCK_SIZE, data)
