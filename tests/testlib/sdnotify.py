"""systemd's side of Type=notify for daemon tests: the datagram socket that
NOTIFY_SOCKET names, where the daemon sends READY=1, WATCHDOG=1, STOPPING=1."""

from __future__ import annotations

import os
import socket


class NotifySocket:
    def __init__(self, path: str, timeout: float = 60.0):
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(path)
        self._sock.settimeout(timeout)

    def env(self, watchdog_usec: int | None = None) -> dict[str, str]:
        """Environment for the daemon: this socket, and WatchdogSec if given."""
        env = {"NOTIFY_SOCKET": self.path}
        if watchdog_usec is not None:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
        return env

    def recv(self) -> str:
        """The next message (socket.timeout after the timeout)."""
        return self._sock.recv(4096).decode()

    def until_ready(self) -> list[str]:
        """Every message up to the first with READY=1, that one included."""
        messages = [self.recv()]
        while "READY=1" not in messages[-1]:
            messages.append(self.recv())
        return messages

    def close(self) -> None:
        self._sock.close()
        if os.path.exists(self.path):
            os.unlink(self.path)
