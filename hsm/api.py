"""The HSM's host API: HTTP/JSON for orchestrators that grow volumes themselves.

An orchestrator that grew a volume out of band (a Cinder-style LUN resize,
an lvextend of its own) tells this host to make the guest see it:

    POST /v1/events                                   {"events": [{"name": "volume-extended",
                                                        "server_uuid": VM, "tag": VOLUME}, ...]}
    PUT  /v1/servers/{vm}/volumes/{volume}/rescan     refresh the device on this host -> 202
    GET  /v1/servers/{vm}/volumes/{volume}            {"volume_blockdev": {"id": VOLUME, "bytes": N}}
    POST /v1/servers/{vm}/volumes/{volume}/extend     {"bytes": N}: grow the guest's disk to N

Each event is answered on its own ("status" completed/failed, "code" 200,
404 no such VM or volume, 422 the VM is not running here, 409/501/500 as
below); the request is 200 when all completed, 207 otherwise, 400 for a
malformed body or an unknown event name (then nothing is done). The
volume calls answer 404 (unknown VM or volume), 409 (the VM's state does
not allow it, or a shrink), 501 (the disk type cannot be grown), 500 (any
other failure) with {"error": {"code", "type", "message"}}. The work is
xtnd.hsm.growdisk's.

Transports: a unix socket (``[api] socket``, mode 0600, root peers only)
and, only when ``[api] listen`` is set, TCP where every request needs
``Authorization: Bearer <token>`` (``[api] token_file``): 401 without it,
403 with a wrong one.

aiohttp serves it (the HTTP parsing, keep-alive, many idle connections) on
its own asyncio loop in the thread "xtnd-hsm-api"; the blocking work runs
on a small pool ("xtnd-hsm-api-N") so a slow libvirt call never stalls the
loop. Bodies are capped (MAX_BODY, 413), must arrive within body_timeout
(408) and be whole (400): no input reaches the daemon's other threads.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hmac
import json
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from xtnd.common import promhttp
from xtnd.hsm import growdisk

log = logging.getLogger("xtnd.hsm.api")

DEFAULT_SOCKET = "/run/xtnd/hsm-api.sock"
MAX_BODY = 64 * 1024
# Connections the kernel queues before the loop accepts them (and accepts per
# wakeup): a unix socket client with a timeout gets EAGAIN, not a wait, when
# the queue is full, so it is large enough for bursts of many clients.
BACKLOG = 1024
VOLUME_EXTENDED = "volume-extended"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _OneLineLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """aiohttp's protocol logger: a malformed request is the client's
    problem, worth one line, never a traceback in the daemon's log."""

    def exception(self, msg: object, *args: object, exc_info: Any = True, **kw: Any) -> None:
        error = exc_info if isinstance(exc_info, BaseException) else None
        self.logger.warning("host api: %s: %s", msg, f"{type(error).__name__}: {error}" if error else "-")


class ApiStartError(Exception):
    """The API could not listen (socket path, address in use)."""


def error_status(e: growdisk.GrowError, event: bool = False) -> int:
    """The HTTP status of a growdisk error (event=True: inside POST /v1/events)."""
    if isinstance(e, (growdisk.NoSuchVM, growdisk.NoSuchVolume)):
        return 404
    if isinstance(e, growdisk.NotRunning) and event:
        return 422
    if isinstance(e, growdisk.StateNotAllowed):
        return 409
    if isinstance(e, growdisk.UnsupportedDisk):
        return 501
    return 500


def _error(status: int, kind: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": status, "type": kind, "message": message}}, status=status)


class BadRequest(Exception):
    """A malformed body; answered 400 with this message."""


def parse_events(body: Any) -> list[dict[str, str]]:
    """The events of a POST /v1/events body; BadRequest if any is malformed."""
    if not isinstance(body, dict) or not isinstance(body.get("events"), list):
        raise BadRequest('body must be an object with an "events" list')
    events = []
    for i, ev in enumerate(body["events"]):
        if not isinstance(ev, dict):
            raise BadRequest(f"event {i} is not an object")
        for key in ("name", "server_uuid", "tag"):
            if not isinstance(ev.get(key), str) or not ev[key]:
                raise BadRequest(f"event {i}: {key!r} must be a non-empty string")
        if ev["name"] != VOLUME_EXTENDED:
            raise BadRequest(f"event {i}: unknown event name {ev['name']!r}")
        events.append({"name": ev["name"], "server_uuid": ev["server_uuid"], "tag": ev["tag"]})
    return events


def parse_extend(body: Any) -> int:
    if not isinstance(body, dict) or "bytes" not in body:
        raise BadRequest('body must be an object with "bytes"')
    size = body["bytes"]
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise BadRequest('"bytes" must be a positive integer')
    return size


def _peer_uid(request: web.Request) -> int | None:
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


class ApiServer:
    def __init__(
        self,
        grower: growdisk.DiskGrower,
        socket_path: str = DEFAULT_SOCKET,
        listen: str = "",
        token: str = "",
        workers: int = 4,
        body_timeout: float = 10.0,
        allowed_uid: int = 0,
        name: str = "xtnd-hsm-api",
    ):
        """socket_path "": no unix socket; listen "": no TCP (else token is required)."""
        if listen and not token:
            raise ValueError("a TCP listener needs a token")
        self._grower = grower
        self.socket_path = socket_path
        self._listen = promhttp.parse_listen(listen) if listen else None
        self._token = token.encode()
        self._body_timeout = body_timeout
        self._allowed_uid = allowed_uid
        self._name = name
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix=f"{name}-")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runners: list[web.AppRunner] = []
        self.port: int | None = None  # the TCP port bound (listen may ask for 0)

    # Life cycle

    def start(self, timeout: float = 10.0) -> None:
        """Listen, or raise ApiStartError."""
        ready = concurrent.futures.Future[None]()
        self._thread = threading.Thread(target=self._run, args=(ready,), name=self._name, daemon=True)
        self._thread.start()
        try:
            ready.result(timeout)
        except Exception as e:  # noqa: BLE001 - whatever stopped the listener, said in one line
            self.stop()
            raise ApiStartError(f"host api cannot listen: {e}") from None

    def stop(self, timeout: float = 10.0) -> None:
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None and thread.is_alive():
            fut = asyncio.run_coroutine_threadsafe(self._cleanup(), loop)
            with contextlib.suppress(Exception):
                fut.result(timeout)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout)
        self._thread = None
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self.socket_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self, ready: concurrent.futures.Future[None]) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except Exception as e:  # noqa: BLE001 - reported to start()
            ready.set_exception(e)
            loop.close()
            return
        ready.set_result(None)
        try:
            loop.run_forever()
        finally:
            loop.close()
            log.info("host api stopped")

    async def _serve(self) -> None:
        if self.socket_path:
            runner = await self._runner(auth=False)
            await web.SockSite(runner, self._unix_socket(), backlog=BACKLOG).start()
            log.info("host api listening socket=%s", self.socket_path)
        if self._listen is not None:
            runner = await self._runner(auth=True)
            host, port = self._listen
            site = web.TCPSite(runner, host, port, reuse_address=True, backlog=BACKLOG)
            await site.start()
            server = site._server  # the bound port when listen asked for 0
            if isinstance(server, asyncio.base_events.Server) and server.sockets:
                self.port = server.sockets[0].getsockname()[1]
            log.info("host api listening address=%s port=%s (bearer token)", host, self.port)

    async def _cleanup(self) -> None:
        for runner in self._runners:
            await runner.cleanup()

    def _unix_socket(self) -> socket.socket:
        os.makedirs(os.path.dirname(self.socket_path) or ".", mode=0o755, exist_ok=True)
        # A socket file left by a killed daemon: nobody listens on it any more.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # never world-connectable, not even for a moment
        try:
            sock.bind(self.socket_path)
        finally:
            os.umask(old)
        os.chmod(self.socket_path, 0o600)
        sock.listen(BACKLOG)
        return sock

    async def _runner(self, auth: bool) -> web.AppRunner:
        middlewares = [self._errors, self._authorize] if auth else [self._errors, self._peer]
        app = web.Application(client_max_size=MAX_BODY, middlewares=middlewares)
        app.router.add_post("/v1/events", self._events)
        app.router.add_put("/v1/servers/{vm}/volumes/{volume}/rescan", self._rescan)
        app.router.add_get("/v1/servers/{vm}/volumes/{volume}", self._get)
        app.router.add_post("/v1/servers/{vm}/volumes/{volume}/extend", self._extend)
        # access_log=None: one line per request is logged by _errors.
        runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            keepalive_timeout=30.0,
            logger=_OneLineLog(log, {}),
        )
        await runner.setup()
        self._runners.append(runner)
        return runner

    # Middlewares

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every answer is JSON and logged in one line; no traceback leaves here."""
        start = time.monotonic()
        try:
            response = await handler(request)
        except web.HTTPException as e:
            response = _error(e.status, type(e).__name__, e.reason)
        except Exception as e:
            log.error("host api request failed method=%s path=%s error=%r", request.method, request.path, e)
            log.debug("host api failure", exc_info=True)
            response = _error(500, "InternalError", "internal error")
        log.info(
            "host api method=%s path=%s status=%d duration_ms=%.1f",
            request.method, request.path, response.status, (time.monotonic() - start) * 1000,
        )  # fmt: skip
        return response

    @web.middleware
    async def _authorize(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            response = _error(401, "Unauthorized", "a bearer token is required")
            response.headers["WWW-Authenticate"] = "Bearer"
            return response
        if not hmac.compare_digest(given.strip().encode(), self._token):
            return _error(403, "Forbidden", "wrong token")
        return await handler(request)

    @web.middleware
    async def _peer(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        uid = _peer_uid(request)
        if uid is not None and uid not in (0, self._allowed_uid):
            return _error(403, "Forbidden", f"uid {uid} may not use the host api")
        return await handler(request)

    # Handlers

    async def _body(self, request: web.Request) -> Any:
        try:
            raw = await asyncio.wait_for(request.read(), self._body_timeout)
        except TimeoutError:
            raise web.HTTPRequestTimeout(reason="body not received in time") from None
        except web.HTTPException:
            raise
        except Exception as e:  # noqa: BLE001 - aiohttp's payload errors (truncated, bad chunking)
            raise web.HTTPBadRequest(reason=f"incomplete body: {type(e).__name__}") from None
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise web.HTTPBadRequest(reason="body is not JSON") from None

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def _events(self, request: web.Request) -> web.StreamResponse:
        try:
            events = parse_events(await self._body(request))
        except BadRequest as e:
            return _error(400, "BadRequest", str(e))
        results = await self._call(self._run_events, events)
        ok = all(r["code"] == 200 for r in results)
        return web.json_response({"events": results}, status=200 if ok else 207)

    def _run_events(self, events: list[dict[str, str]]) -> list[dict[str, Any]]:
        results = []
        for ev in events:
            result: dict[str, Any] = dict(ev)
            try:
                grown = self._grower.grow_to_device(ev["server_uuid"], ev["tag"])
            except growdisk.GrowError as e:
                result.update(status="failed", code=error_status(e, event=True), error=str(e))
                log.warning(
                    "event failed name=%s vm=%s volume=%s code=%d error=%s",
                    ev["name"], ev["server_uuid"], ev["tag"], result["code"], e,
                )  # fmt: skip
            else:
                result.update(status="completed", code=200, bytes=grown.after)
            results.append(result)
        return results

    async def _get(self, request: web.Request) -> web.StreamResponse:
        try:
            size = await self._call(self._grower.device_size, *_ids(request))
        except growdisk.GrowError as e:
            return _grow_error(e)
        return web.json_response(_blockdev(request, size))

    async def _rescan(self, request: web.Request) -> web.StreamResponse:
        try:
            size = await self._call(self._grower.rescan, *_ids(request))
        except growdisk.GrowError as e:
            return _grow_error(e)
        return web.json_response(_blockdev(request, size), status=202)

    async def _extend(self, request: web.Request) -> web.StreamResponse:
        try:
            size = parse_extend(await self._body(request))
        except BadRequest as e:
            return _error(400, "BadRequest", str(e))
        try:
            grown = await self._call(self._grower.grow_to, *_ids(request), size)
        except growdisk.GrowError as e:
            return _grow_error(e)
        body = _blockdev(request, grown.device)
        body["disk"] = {"drive": grown.drive, "before": grown.before, "bytes": grown.after}
        return web.json_response(body)


def _ids(request: web.Request) -> tuple[str, str]:
    return request.match_info["vm"], request.match_info["volume"]


def _grow_error(e: growdisk.GrowError) -> web.Response:
    return _error(error_status(e), type(e).__name__, str(e))


def _blockdev(request: web.Request, size: int) -> dict[str, Any]:
    return {"volume_blockdev": {"id": request.match_info["volume"], "bytes": size}}
