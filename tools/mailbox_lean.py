"""The lean client of ``xtnd mailbox bench``: many hosts from one process.

On a real cluster every HSM has its own CPU and writes its own block. 2000
HSM interpreters on one small machine measure the machine, so this client
speaks the protocol for all hosts at once, doing the same handshake
(request, reply, clean, echo, free) at a fraction of the CPU:

- the blocks of hosts with adjacent ids go out in one write, as the SPM's
  replies do: 2000 hosts cost one write, not 2000 serial ones, so the
  client is not slower than the SPM it measures; then one event;
- it polls the outbox with one read and looks only at the hosts still
  waiting.

Latency is from the write of a host's block returning to its reply being
read; a wave is all hosts writing at the same moment.
"""

from __future__ import annotations

import time
import uuid
from multiprocessing.connection import Connection

from xtnd.mailbox import codec, directio
from xtnd.mailbox.outbox import runs

BLOCK = codec.BLOCK_SIZE
HEAD = codec.MESSAGE_HEAD_SIZE


class LeanHosts:
    """Hosts ``host_ids`` over one inbox/outbox pair, driven round by round."""

    def __init__(self, inbox: directio.Storage, outbox: directio.Storage, host_ids: list[int]):
        self.inbox = inbox
        self.outbox = outbox
        self.host_ids = sorted(host_ids)
        self._runs = runs(self.host_ids, max_gap=0)
        self._length = (self.host_ids[-1] + 1) * BLOCK
        self.domain = uuid.uuid4()

    def _write_all(self, blocks: dict[int, bytes]) -> float:
        """Write every host's block, one write per run of adjacent hosts,
        then one event; returns when the blocks were on storage."""
        written = 0.0
        for first, last in self._runs:
            self.inbox.write(first * BLOCK, b"".join(blocks[h] for h in range(first, last + 1)))
            written = time.monotonic()
        self.inbox.write(0, codec.encode_event())
        return written

    def _wait(self, expect: dict[int, list[bytes]], deadline: float, sent: float) -> tuple[list[float], int, int]:
        """Poll until every host's slots show ``expect`` (compared on the
        message head); returns latencies, wrong sizes, and slots never seen."""
        waiting = {h: set(range(len(msgs))) for h, msgs in expect.items()}
        latencies: list[float] = []
        wrong = 0
        while waiting and time.monotonic() < deadline:
            data = self.outbox.read(0, self._length)
            now = time.monotonic()
            for h in list(waiting):
                base = h * BLOCK
                for i in list(waiting[h]):
                    raw = data[base + i * codec.MESSAGE_SIZE : base + (i + 1) * codec.MESSAGE_SIZE]
                    if raw[:HEAD] == expect[h][i][:HEAD]:
                        wrong += raw != expect[h][i]
                        latencies.append(now - sent)
                        waiting[h].discard(i)
                if not waiting[h]:
                    del waiting[h]
            if waiting:
                time.sleep(0.001)
        return latencies, wrong, sum(len(w) for w in waiting.values())

    def round(self, messages: int) -> tuple[list[float], int]:
        """Every host submits ``messages`` requests at once; returns the
        roundtrip latencies and the number of failures."""
        requests = {h: [codec.encode(codec.Extend(self.domain, uuid.uuid4(), 1024)) for _ in range(messages)]
                    for h in self.host_ids}
        deadline = time.monotonic() + 120
        sent = self._write_all({h: codec.build_block(r) for h, r in requests.items()})
        latencies, wrong, missing = self._wait(requests, deadline, sent)
        # Finish the handshake so the next round starts clean.
        cleans = [codec.CLEAN_MESSAGE] * messages
        sent = self._write_all({h: codec.build_block(cleans) for h in self.host_ids})
        self._wait(dict.fromkeys(self.host_ids, cleans), deadline, sent)
        self._write_all(dict.fromkeys(self.host_ids, codec.EMPTY_BLOCK))
        return latencies, wrong + missing


def lean_main(inbox_path: str, outbox_path: str, host_ids: list[int], conn: Connection) -> None:
    """Process body: serve the bench's commands over ``conn``."""
    inbox = directio.DirectFile(inbox_path)
    outbox = directio.DirectFile(outbox_path)
    hosts = LeanHosts(inbox, outbox, host_ids)
    conn.send("ready")
    while True:
        cmd = conn.recv()
        if cmd[0] == "stats":
            conn.send({"reads": inbox.counters.reads + outbox.counters.reads,
                       "writes": inbox.counters.writes + outbox.counters.writes})
        elif cmd[0] == "stop":
            conn.send("stopped")
            return
        else:
            conn.send(hosts.round(cmd[1]))
