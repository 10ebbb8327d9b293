"""systemd's sd_notify protocol (READY=1, STOPPING=1) without libsystemd.

With Type=notify, systemd passes a datagram socket in $NOTIFY_SOCKET
(a path, or an abstract name starting with '@'). Outside systemd the
variable is unset and notify() does nothing. The one helper both daemons
use (READY, STOPPING, STATUS and the watchdog pings).
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("xtnd.sdnotify")


def notify(state: str) -> bool:
    """Send state (e.g. "READY=1"); True if a service manager got it."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(state.encode(), address)
    except OSError as e:
        log.warning("cannot notify service manager state=%s: %s", state, e)
        return False
    return True
