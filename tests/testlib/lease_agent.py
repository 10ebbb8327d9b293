"""A process holding the SPM lease for one simulated host, driven by a test.

The child side (`python -m testlib.lease_agent ...`, started in a host's
mount namespace by SanlockDaemon.popen) reads one JSON command per line on
stdin and answers one JSON line on stdout; it also writes unsolicited event
lines: {"event": "lost"} from its lease watchdog and {"event": "sigterm"}
when sanlock (or anyone) sends SIGTERM. Every line carries "t", the
child's time.monotonic(): CLOCK_MONOTONIC is shared by all processes, so a
test can order what happened in different hosts.

The test side is LeaseAgent. It is the building block for failover tests:
start one per host, SIGKILL one, watch the other take over.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from xtnd.tools.rig.sanlockd import SanlockDaemon

TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class AgentError(Exception):
    """A command failed in the agent; carries the lease error's fields."""

    def __init__(self, reply: dict[str, Any]):
        self.reply = reply
        self.error: str = reply.get("error", "")
        self.reason: str = reply.get("reason", "")
        self.owners: list[dict[str, int]] = reply.get("owners", [])
        super().__init__(f"{self.error}: {self.reason}")


class LeaseAgent:
    """Test side: a lease agent process in host's namespace."""

    def __init__(
        self,
        host: SanlockDaemon,
        lockspace: str,
        host_id: int,
        ids_path: str,
        leases_path: str,
        io_timeout: int = 1,
        interval: float | None = None,
        stall_timeout: float | None = None,
    ):
        self.host = host
        self.host_id = host_id
        cmd = [
            sys.executable,
            "-m",
            "testlib.lease_agent",
            f"--lockspace={lockspace}",
            f"--host-id={host_id}",
            f"--ids={ids_path}",
            f"--leases={leases_path}",
            f"--io-timeout={io_timeout}",
        ]
        if interval is not None:
            cmd.append(f"--interval={interval}")
        if stall_timeout is not None:
            cmd.append(f"--stall-timeout={stall_timeout}")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (TESTS_DIR, env.get("PYTHONPATH")) if p)
        self.proc = host.popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._replies: queue.Queue[dict[str, Any]] = queue.Queue()
        self._events: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, name=f"lease-agent-{host_id}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            msg = json.loads(line)
            if "event" in msg:
                with self._cond:
                    self._events.append(msg)
                    self._cond.notify_all()
            else:
                self._replies.put(msg)
        self._replies.put({"ok": False, "error": "exited", "reason": "agent exited"})
        with self._cond:
            self._events.append({"event": "exit", "t": time.monotonic()})
            self._cond.notify_all()

    def call(self, op: str, timeout: float = 60.0) -> dict[str, Any]:
        """Run op in the agent; return the reply, raise AgentError if it failed."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op}) + "\n")
        self.proc.stdin.flush()
        try:
            reply = self._replies.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"agent {self.host_id} did not answer {op} in {timeout}s") from None
        if not reply["ok"]:
            raise AgentError(reply)
        return reply

    def event(self, name: str, timeout: float = 60.0) -> dict[str, Any]:
        """Wait for the first event called name; return it."""
        with self._cond:
            found = self._cond.wait_for(lambda: self._find(name), timeout)
        if not found:
            raise TimeoutError(f"agent {self.host_id}: no {name} event in {timeout}s, events={self._events}")
        return found

    def _find(self, name: str) -> dict[str, Any] | None:
        return next((e for e in self._events if e["event"] == name), None)

    def kill(self) -> float:
        """SIGKILL the agent; return when it is gone (its monotonic time)."""
        self.proc.kill()
        self.proc.wait()
        return time.monotonic()


# Child side.


def _emit(msg: dict[str, Any]) -> None:
    msg["t"] = time.monotonic()
    with _out_lock:
        sys.stdout.write(json.dumps(msg) + "\n")
        sys.stdout.flush()


_out_lock = threading.Lock()


def main() -> None:
    from xtnd.spm import lease as spm_lease

    parser = argparse.ArgumentParser()
    parser.add_argument("--lockspace", required=True)
    parser.add_argument("--host-id", type=int, required=True)
    parser.add_argument("--ids", required=True)
    parser.add_argument("--leases", required=True)
    parser.add_argument("--io-timeout", type=int, default=1)
    parser.add_argument("--interval", type=float)
    parser.add_argument("--stall-timeout", type=float)
    args = parser.parse_args()

    # The reason sanlock kills us when it gives up on the lockspace.
    signal.signal(signal.SIGTERM, lambda signo, frame: (_emit({"event": "sigterm"}), os._exit(143)))

    lease = spm_lease.SpmLease(args.lockspace, args.host_id, args.ids, args.leases, io_timeout=args.io_timeout)
    watchdog = spm_lease.LeaseWatchdog(
        lease, lambda reason: _emit({"event": "lost", "reason": reason}), args.interval, args.stall_timeout
    )
    ops = {
        "join": lease.join,
        "acquire": lease.acquire,
        "check": lease.check,
        "release": lease.release,
        "leave": lease.leave,
        "watch": watchdog.start,
        "unwatch": watchdog.stop,
    }
    for line in sys.stdin:
        op = json.loads(line)["op"]
        try:
            result = ops[op]()
        except spm_lease.LeaseError as e:
            owners = [vars(o) for o in getattr(e, "owners", [])]
            _emit({"op": op, "ok": False, "error": type(e).__name__, "reason": e.reason, "owners": owners})
        else:
            _emit({"op": op, "ok": True, "result": result})


if __name__ == "__main__":
    main()
