"""The daemons' local control sockets: JSON requests from root only.

Transport: a Unix stream socket (e.g. /run/xtnd/spm.sock), mode 0600, and
every peer's SO_PEERCRED uid must be 0: filesystem permissions alone would
let a process that inherited a descriptor in. A socket file left by a
killed daemon is replaced at start and removed on stop.

Protocol: JSON lines. Each request is one object with "op" and arguments;
each answer is one line, {"ok": true, "result": ...} or {"ok": false,
"error": "<exception class>", "message": "..."}. Each daemon brings its
table of ops (spm/control.py, hsm/control.py).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any

from xtnd.common.worker import Worker

log = logging.getLogger("xtnd.control")

MAX_LINE = 1 << 20
_UCRED = struct.Struct("3i")

Op = Callable[[dict[str, Any]], Any]


class ControlError(Exception):
    """The daemon refused or failed a control request (error: its exception class)."""

    peer = "daemon"

    def __init__(self, error: str, message: str):
        self.error = error
        self.message = message
        super().__init__(f"{self.peer}: {message}" if message else f"{self.peer}: {error}")


def peer_uid(conn: socket.socket) -> int:
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    _pid, uid, _gid = _UCRED.unpack(raw)
    return int(uid)


class ControlServer(Worker):
    """Accepts root clients and runs their requests, one thread per connection."""

    def __init__(self, path: str, ops: dict[str, Op], allowed_uid: int = 0, name: str = "control"):
        super().__init__(name)
        self.path = path
        self.ops = ops
        self.allowed_uid = allowed_uid
        self._sock: socket.socket | None = None

    def start(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", mode=0o755, exist_ok=True)
        # A socket file left by a killed daemon: nobody listens on it any more.
        if os.path.exists(self.path):
            os.unlink(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(self.path)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        sock.listen(16)
        self._sock = sock
        super().start()
        log.info("control socket listening path=%s", self.path)

    def stop(self, timeout: float = 10.0) -> bool:
        stopped = super().stop(timeout)
        log.info("control socket closed path=%s", self.path)
        return stopped

    def _wake(self) -> None:
        if self._sock is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        # shutdown() wakes the thread blocked in accept().
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._sock = None

    def _run(self) -> None:
        sock = self._sock  # stop() sets self._sock to None when it closes it
        assert sock is not None
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                if self.stopping:
                    return
                log.exception("control socket accept failed")
                return
            threading.Thread(target=self._serve, args=(conn,), name=f"{self.name}-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            uid = peer_uid(conn)
            reader = conn.makefile("rb")
            if uid != self.allowed_uid:
                log.warning("control connection refused uid=%d", uid)
                # Read the request first: closing with it unread would make
                # the client's send fail (EPIPE) before it sees the refusal.
                conn.settimeout(5.0)
                try:
                    reader.readline(MAX_LINE)
                except OSError:
                    pass  # the refusal below is all the peer gets anyway
                conn.sendall(_answer({"ok": False, "error": "PermissionError", "message": "root only"}))
                return
            for line in reader:
                if self.stopping:
                    return
                conn.sendall(_answer(self._call(line)))

    def _call(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
            op = request.pop("op")
            func = self.ops[op]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            return {"ok": False, "error": "BadRequest", "message": f"bad request: {e!r}"}
        try:
            result = func(request)
        except Exception as e:  # noqa: BLE001 - every failure goes back to the client
            log.warning("control request failed op=%s error=%s: %s", op, type(e).__name__, e)
            return {"ok": False, "error": type(e).__name__, "message": str(e)}
        log.info("control request done op=%s", op)
        return {"ok": True, "result": result}


def _answer(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj).encode() + b"\n"


class ControlClient:
    """Talks to a running daemon's control socket."""

    error: type[ControlError] = ControlError

    def __init__(self, path: str, timeout: float = 300.0):
        self.path = path
        self.timeout = timeout

    def call(self, op: str, **args: Any) -> Any:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(self.timeout)
            sock.connect(self.path)
            try:
                sock.sendall(_answer({"op": op, **args}))
            except (BrokenPipeError, ConnectionResetError):
                pass  # the daemon closed early; its answer, if any, is still readable
            with sock.makefile("rb") as f:
                line = f.readline(MAX_LINE)
        if not line:
            raise self.error("Disconnected", "the daemon closed the connection without answering")
        answer = json.loads(line)
        if not answer.get("ok"):
            raise self.error(answer.get("error", "Error"), answer.get("message", ""))
        return answer.get("result")


LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def set_log_level(args: dict[str, Any]) -> dict[str, str]:
    """The "log_level" op of both daemons: {"logger": NAME, "level": LEVEL}.

    Changes one logger of the running daemon (e.g. xtnd.mailbox to DEBUG
    while chasing a problem) until the next change or restart; "root" or ""
    names the root logger.
    """
    name = str(args.get("logger", ""))
    level = str(args.get("level", "")).upper()
    if level not in LEVELS:
        raise ValueError(f"unknown log level {args.get('level')!r}: use one of {', '.join(LEVELS)}")
    logger = logging.getLogger(None if name in ("", "root") else name)
    previous = logging.getLevelName(logger.getEffectiveLevel())
    logger.setLevel(level)
    log.warning("log level changed logger=%s level=%s previous=%s", logger.name, level, previous)
    return {"logger": logger.name, "level": level, "previous": previous}
