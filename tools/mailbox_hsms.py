"""The HSM clients of ``xtnd mailbox bench``: real HSMMailbox instances.

A process runs the HSMs of some host ids, each fully independent (its own
block, thread and file descriptors), and answers the bench's commands:
("round", M) submits M requests per HSM at once and returns the
latencies; ("flow", seconds, rate) submits at random intervals.
"""

from __future__ import annotations

import concurrent.futures
import math
import random
import time
import uuid
from collections.abc import Callable
from multiprocessing.connection import Connection

from xtnd.mailbox import codec, directio
from xtnd.mailbox.hsm import HSMConfig, HSMMailbox


def _stamp(finished: list[float], n: int) -> Callable[[concurrent.futures.Future[int]], None]:
    def done(_: concurrent.futures.Future[int]) -> None:
        finished[n] = time.monotonic()

    return done


def hsm_main(inbox_path: str, outbox_path: str, host_ids: list[int], config: HSMConfig, conn: Connection) -> None:
    """Run the HSMs of ``host_ids`` in this process, each fully independent."""
    hsms = []
    for host_id in host_ids:
        hsm = HSMMailbox(directio.DirectFile(inbox_path), directio.DirectFile(outbox_path), host_id, config)
        hsm.start()
        hsms.append(hsm)
    domain = uuid.uuid4()
    conn.send("ready")
    while True:
        cmd = conn.recv()
        if cmd[0] == "round":
            messages = cmd[1]
            started: list[float] = []
            finished: list[float] = []
            futures = []
            # Completion times are taken by callbacks in the mailbox threads,
            # so this thread wakes once per round, not once per request.
            for hsm in hsms:
                for _ in range(messages):
                    n = len(started)
                    started.append(time.monotonic())
                    finished.append(math.nan)
                    fut = hsm.submit(domain, uuid.uuid4(), 1024**3)
                    fut.add_done_callback(_stamp(finished, n))
                    futures.append(fut)
            concurrent.futures.wait(futures, timeout=120)
            failures = sum(1 for f in futures if not f.done() or f.exception() is not None)
            latencies = [t1 - t0 for t0, t1 in zip(started, finished, strict=True)]
            for hsm in hsms:
                hsm.wait_idle(timeout=60)
            conn.send((latencies, failures))
        elif cmd[0] == "flow":
            conn.send(_flow(hsms, domain, duration=cmd[1], rate=cmd[2]))
        elif cmd[0] == "stats":
            reads = writes = 0
            for hsm in hsms:
                reads += hsm._inbox.counters.reads + hsm._outbox.counters.reads
                writes += hsm._inbox.counters.writes + hsm._outbox.counters.writes
            conn.send({"reads": reads, "writes": writes})
        elif cmd[0] == "stop":
            for hsm in hsms:
                hsm.stop()
            conn.send("stopped")
            return


def _flow(hsms: list[HSMMailbox], domain: uuid.UUID, duration: float, rate: float) -> tuple[list[float], int]:
    """Each HSM submits requests at random intervals (``rate`` per second)."""
    rng = random.Random()
    deadline = time.monotonic() + duration
    pending: list[tuple[float, concurrent.futures.Future[int]]] = []
    volumes = [uuid.uuid4() for _ in range(8)]
    sizes = dict.fromkeys(volumes, 1024)
    next_at = [time.monotonic() + rng.expovariate(rate) for _ in hsms]
    latencies: list[float] = []
    finished: list[float] = []
    while time.monotonic() < deadline:
        now = time.monotonic()
        for n, hsm in enumerate(hsms):
            if now >= next_at[n]:
                volume = rng.choice(volumes)
                sizes[volume] += 512  # growing volumes, as guests write
                finished.append(math.nan)
                fut = hsm.submit(domain, volume, sizes[volume] * codec.MiB)
                fut.add_done_callback(_stamp(finished, len(finished) - 1))
                pending.append((now, fut))
                next_at[n] = now + rng.expovariate(rate)
        time.sleep(max(0.0, min(next_at) - time.monotonic()))
    concurrent.futures.wait([f for _, f in pending], timeout=60)
    failures = sum(1 for _, f in pending if not f.done() or f.exception() is not None)
    latencies = [t1 - t0 for (t0, _), t1 in zip(pending, finished, strict=True)]
    for hsm in hsms:
        hsm.wait_idle(timeout=30)
    return latencies, failures
