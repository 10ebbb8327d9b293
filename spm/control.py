"""The SPM's local control socket: volume commands go through the lease holder.

Only the SPM may change LVM metadata while a pool runs, so ``xtnd volume
create/remove`` on the SPM host send their request here instead of running
LVM themselves (xtnd.tools.domain_cli picks this when the socket exists).

Transport: a Unix stream socket (default /run/xtnd/spm.sock), mode 0600,
and every peer's SO_PEERCRED uid must be 0: filesystem permissions alone
would let a process that inherited a descriptor in. The socket exists only
while the daemon serves (created after the lease is acquired, removed on
stop), so its presence means "an SPM runs here".

Protocol: JSON lines. Each request is one object with "op" and arguments;
each answer is one line, {"ok": true, "result": ...} or {"ok": false,
"error": "<exception class>", "message": "..."}. Ops (see ops.py):
ping, stats, volume_create, volume_remove, volume_info, volume_list.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import threading
import uuid as uuidlib
from collections.abc import Callable
from typing import Any

from xtnd import storage

log = logging.getLogger("xtnd.spm.control")

DEFAULT_SOCKET = "/run/xtnd/spm.sock"
ENV = "XTND_SPM_SOCKET"
MAX_LINE = 1 << 20
_UCRED = struct.Struct("3i")

Op = Callable[[dict[str, Any]], Any]


def default_path() -> str:
    return os.environ.get(ENV, DEFAULT_SOCKET)


class ControlError(storage.StorageError):
    """The SPM refused or failed a control request (error: its exception class)."""

    def __init__(self, error: str, message: str):
        self.error = error
        self.message = message
        super().__init__(f"SPM: {message}" if message else f"SPM: {error}")


def peer_uid(conn: socket.socket) -> int:
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    _pid, uid, _gid = _UCRED.unpack(raw)
    return int(uid)


class ControlServer:
    """Accepts root clients and runs their requests, one thread per connection."""

    def __init__(self, path: str, ops: dict[str, Op], allowed_uid: int = 0):
        self.path = path
        self.ops = ops
        self.allowed_uid = allowed_uid
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    def start(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", mode=0o755, exist_ok=True)
        # A socket file left by a killed SPM: nobody listens on it any more.
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
        self._thread = threading.Thread(target=self._accept, name="spm-control", daemon=True)
        self._thread.start()
        log.info("control socket listening path=%s", self.path)

    def stop(self) -> None:
        self._stopping.set()
        if self._sock is not None:
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
        if self._thread is not None:
            self._thread.join(10)
        log.info("control socket closed path=%s", self.path)

    def _accept(self) -> None:
        assert self._sock is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                log.exception("control socket accept failed")
                return
            threading.Thread(target=self._serve, args=(conn,), name="spm-control-conn", daemon=True).start()

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
                if self._stopping.is_set():
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
    """Talks to a running SPM's control socket."""

    def __init__(self, path: str | None = None, timeout: float = 300.0):
        self.path = path or default_path()
        self.timeout = timeout

    def call(self, op: str, **args: Any) -> Any:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(self.timeout)
            sock.connect(self.path)
            try:
                sock.sendall(_answer({"op": op, **args}))
            except (BrokenPipeError, ConnectionResetError):
                pass  # the SPM closed early; its answer, if any, is still readable
            with sock.makefile("rb") as f:
                line = f.readline(MAX_LINE)
        if not line:
            raise ControlError("Disconnected", "the SPM closed the connection without answering")
        answer = json.loads(line)
        if not answer.get("ok"):
            raise ControlError(answer.get("error", "Error"), answer.get("message", ""))
        return answer.get("result")


def volume_from_dict(d: dict[str, Any]) -> storage.VolumeInfo:
    """Inverse of VolumeInfo.to_dict() (which adds max_size)."""
    return storage.VolumeInfo(
        uuid=uuidlib.UUID(d["uuid"]),
        domain=uuidlib.UUID(d["domain"]),
        format=storage.Format(d["format"]),
        capacity=int(d["capacity"]),
        size=int(d["size"]),
        image=uuidlib.UUID(d["image"]) if d.get("image") else None,
        path=d.get("path"),
    )
