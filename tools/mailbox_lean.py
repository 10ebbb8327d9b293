"""The lean client of ``xtnd mailbox bench``: many hosts from one process.

On a real cluster every HSM has its own CPU and writes its own block. 2000
HSM interpreters on one small machine measure the machine, so this client
speaks the protocol for all hosts at once, doing the same handshake
(request, reply, clean, echo, free) at a fraction of the CPU:

- the blocks of hosts with adjacent ids go out in one write, as the SPM's
  replies do: 2000 hosts cost one write, not 2000 serial ones, so the
  client is not slower than the SPM it measures; then one event;
- it polls the block of the first host still waiting, and when that one
  is answered reads on from it 2 MiB at a time while the replies go on
  (everything waiting every 50 ms), backing off as an HSM does
  (HSMConfig's poll_min, poll_growth, poll_max), so its polling does not
  starve the SPM of CPU and storage on a small machine.

Latency is from the write of a host's block returning to its reply being
read; a wave is all hosts writing at the same moment.
"""

from __future__ import annotations

import time
import uuid
from multiprocessing.connection import Connection

from xtnd.mailbox import codec, directio
from xtnd.mailbox.hsm import HSMConfig
from xtnd.mailbox.outbox import runs

BLOCK = codec.BLOCK_SIZE
HEAD = codec.MESSAGE_HEAD_SIZE
# Seconds between reads of every waiting host's block when the first
# waiting host's stays unanswered (see _wait).
FULL_POLL = 0.05
# Blocks per read while following the SPM's replies (see _wait): 2 MiB,
# as the SPM reads and, after each inbox chunk, writes.
SPAN = 512


class LeanHosts:
    """Hosts ``host_ids`` over one inbox/outbox pair, driven round by round."""

    def __init__(self, inbox: directio.Storage, outbox: directio.Storage, host_ids: list[int]):
        self.inbox = inbox
        self.outbox = outbox
        self.host_ids = sorted(host_ids)
        self._runs = runs(self.host_ids, max_gap=0)
        self.domain = uuid.uuid4()
        self.poll = HSMConfig()
        self.timeline: dict[str, float] = {}

    def _write_all(self, blocks: dict[int, bytes]) -> float:
        """Write every host's block, one write per run of adjacent hosts,
        then one event; returns when the blocks were on storage."""
        written = 0.0
        for first, last in self._runs:
            self.inbox.write(first * BLOCK, b"".join(blocks[h] for h in range(first, last + 1)))
            written = time.monotonic()
        self.inbox.write(0, codec.encode_event())
        return written

    def _answered(self, data: bytes, base: int, expect: list[bytes], slots: set[int]) -> list[int]:
        """The slots among ``slots`` of the block at ``data[base:]`` whose
        message head matches ``expect``."""
        return [i for i in slots
                if data[base + i * codec.MESSAGE_SIZE : base + i * codec.MESSAGE_SIZE + HEAD] == expect[i][:HEAD]]

    def _wait(self, expect: dict[int, list[bytes]], deadline: float, sent: float) -> tuple[list[float], int, int]:
        """Poll until every host's slots show ``expect`` (compared on the
        message head); returns latencies, wrong sizes, and slots never seen.

        A poll reads the block of the first host still waiting. When that
        block got an answer, the waiting hosts' blocks are read from there
        SPAN blocks at a time, going on only while the last host of a span
        was answered too: the SPM writes the replies it has in ascending
        host order and its workers answer in the order it found the
        requests, so each of its writes answers a run of hosts from the
        first waiting one, and the client reads about what the SPM wrote
        (8 MiB a 2000-host wave), not the whole waiting span after each of
        its writes (~20 MiB, on the disk the SPM measures). Every
        FULL_POLL seconds everything waiting is read, which bounds how late
        a reply out of that order is seen.
        """
        waiting = {h: set(range(len(msgs))) for h, msgs in expect.items()}
        latencies: list[float] = []
        wrong = 0
        last_full = time.monotonic()
        while waiting and time.monotonic() < deadline:
            low = min(waiting)
            probe = self.outbox.read(low * BLOCK, BLOCK)
            full = time.monotonic() - last_full >= FULL_POLL
            if full or self._answered(probe, 0, expect[low], waiting[low]):
                if full:
                    last_full = time.monotonic()
                high = max(waiting)
                first = low
                while first <= high:
                    last = high if full else min(high, first + SPAN - 1)
                    data = self.outbox.read(first * BLOCK, (last + 1 - first) * BLOCK)
                    now = time.monotonic()
                    for h in range(first, last + 1):
                        if h not in waiting:
                            continue
                        base = (h - first) * BLOCK
                        for i in self._answered(data, base, expect[h], waiting[h]):
                            start = base + i * codec.MESSAGE_SIZE
                            wrong += data[start : start + codec.MESSAGE_SIZE] != expect[h][i]
                            latencies.append(now - sent)
                            waiting[h].discard(i)
                        if not waiting[h]:
                            del waiting[h]
                    if last in waiting:  # the SPM's writes end here (for now)
                        break
                    first = last + 1
            if waiting:
                cfg = self.poll
                time.sleep(min(max(cfg.poll_min, (time.monotonic() - sent) * cfg.poll_growth), cfg.poll_max))
        return latencies, wrong, sum(len(w) for w in waiting.values())

    def round(self, messages: int) -> tuple[list[float], int]:
        """Every host submits ``messages`` requests at once; returns the
        roundtrip latencies and the number of failures. ``timeline`` then
        says when (monotonic) the client began writing, its writes were
        done, and it had seen the last reply: the bench lines these up
        with the SPM's waves."""
        requests = {h: [codec.encode(codec.Extend(self.domain, uuid.uuid4(), 1024)) for _ in range(messages)]
                    for h in self.host_ids}
        deadline = time.monotonic() + 120
        blocks = {h: codec.build_block(r) for h, r in requests.items()}
        began = time.monotonic()
        sent = self._write_all(blocks)
        latencies, wrong, missing = self._wait(requests, deadline, sent)
        self.timeline = {"began": began, "sent": sent, "seen": sent + max(latencies, default=0.0)}
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
            conn.send((*hosts.round(cmd[1]), hosts.timeline))
