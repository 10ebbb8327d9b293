"""Serving one daemon's Prometheus metrics over HTTP (``[metrics] listen``).

Each daemon keeps its metrics in its own CollectorRegistry (no module
state: tests run several daemons in one process) and serves it in the
Prometheus text format at ``http://HOST:PORT/metrics`` from one named
daemon thread. A daemon that cannot listen logs an error and goes on
without metrics: extending disks matters more than being watched.
"""

from __future__ import annotations

import http.server
import logging
import socket
import threading

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import MetricsHandler

log = logging.getLogger("xtnd.metrics")

# Upper bounds (seconds) of the extend latency histograms of both daemons:
# from a sub-millisecond SPM phase to an HSM extend waiting on a slow SPM.
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)


class ListenError(ValueError):
    """A ``[metrics] listen`` value that is not HOST:PORT."""


def parse_listen(text: str) -> tuple[str, int] | None:
    """ "HOST:PORT" (IPv6 as "[::1]:PORT") -> (host, port); "" -> None (disabled)."""
    text = text.strip()
    if not text:
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ListenError(f"not HOST:PORT: {text!r}")
    host = host.strip("[]")
    try:
        number = int(port)
    except ValueError:
        raise ListenError(f"bad port in {text!r}") from None
    if not 0 <= number <= 65535:
        raise ListenError(f"port out of range in {text!r}")
    return host, number


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        log.warning("metrics request failed client=%s", client_address, exc_info=True)


class _Handler(MetricsHandler):
    def log_message(self, format: str, *args: object) -> None:
        log.debug("metrics request client=%s " + format, self.client_address[0], *args)


class MetricsServer:
    """HTTP server of one registry; start() never raises for a busy port."""

    def __init__(self, listen: str, registry: CollectorRegistry, name: str = "xtnd-metrics"):
        self.address = parse_listen(listen)
        self.registry = registry
        self.name = name
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int | None:
        """The bound port (useful with port 0), None when not serving."""
        return self._server.server_address[1] if self._server else None

    def start(self) -> bool:
        if self.address is None:
            log.info("metrics disabled")
            return False
        handler = type("Handler", (_Handler,), {"registry": self.registry})
        server = type(
            "Server", (_Server,), {"address_family": socket.AF_INET6 if ":" in self.address[0] else socket.AF_INET}
        )
        try:
            self._server = server(self.address, handler)
        except OSError as e:
            log.error("metrics disabled: cannot listen host=%s port=%d: %s", *self.address, e)
            return False
        self._thread = threading.Thread(target=self._server.serve_forever, name=self.name, daemon=True)
        self._thread.start()
        log.info("metrics listening host=%s port=%d", self.address[0], self.port)
        return True

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)
        self._server = None
