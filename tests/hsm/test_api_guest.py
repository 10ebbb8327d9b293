"""Growing a running guest's disk after its storage grew out of band
(xtnd.hsm.growdisk), against one real guest shared by every test here.

The guest (xtnd.tools.rig.guest, hold + watch_size) prints XTND-SIZE
sectors=N whenever /sys/block/vda/size changes, so "the guest sees it" is
read from the guest itself. Its disks, all on volume links of a real block
domain (loop-activated LVs, 4 MiB extents):

- vda: a raw volume, grown by lvextend + refresh + blockResize;
- vdb: a qcow2 thin volume, monitored by the HSM;
- hdc: a cdrom on a volume link (a disk type that cannot be grown).

One in-process HSM (hold_host_id=False: no SPM is needed here) serves it.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import libvirt
import pytest
from testlib.hsmrun import running
from xtnd.common import stats
from xtnd.hsm import api, daemon, growdisk, links, udevwatch
from xtnd.hsm.daemon import HSM
from xtnd.hsm.libvirtconn import EventLoop
from xtnd.tools.rig import guest, hsmrig, loops
from xtnd.tools.rig.wait import wait_for

MiB = 1024**2
GiB = 1024**3
TOKEN = "s3cret-" + uuid.uuid4().hex
BODY_TIMEOUT = 1.0

pytestmark = [pytest.mark.root, pytest.mark.timeout(240)]


@dataclass
class Setup:
    pool: hsmrig.Pool
    hsm: HSM
    guest: guest.Guest
    stopped: guest.Guest  # defined, never started
    raw: str  # volume uuids
    thin: str
    cdrom: str
    api: api.ApiServer  # unix socket and TCP on 127.0.0.1 with TOKEN
    workdir: str
    loop_guest: guest.Guest  # its raw vda is loop_disk, a plain loop device
    loop_disk: guest.LoopDisk

    @property
    def vm(self) -> str:
        return str(self.guest.dom.UUIDString())

    def raw_extend(self, size: int) -> None:
        """What an orchestrator does: grow the LV (SPM side, metadata only)."""
        self.pool.domain.extend_volume(self.raw, size)

    def wait_guest_size(self, size: int, timeout: float = 60.0) -> None:
        wait_for(lambda: self.guest_sizes()[-1] == size, timeout=timeout, what=f"guest sees {size} bytes")

    def guest_sizes(self, g: guest.Guest | None = None) -> list[int]:
        text = (g or self.guest).console()
        return [int(n) * 512 for n in re.findall(r"XTND-SIZE sectors=(\d+)", text)]


def _add_disks(xml: str, thin_link: str, cdrom_link: str) -> str:
    root = ET.fromstring(xml)
    devices = root.find("devices")
    assert devices is not None
    disk = ET.SubElement(devices, "disk", type="block", device="disk")
    ET.SubElement(disk, "driver", name="qemu", type="qcow2", cache="none", io="native", error_policy="stop")
    ET.SubElement(disk, "source", dev=thin_link)
    ET.SubElement(disk, "target", dev="vdb", bus="virtio")
    cd = ET.SubElement(devices, "disk", type="file", device="cdrom")
    ET.SubElement(cd, "driver", name="qemu", type="raw")
    ET.SubElement(cd, "source", file=cdrom_link)
    ET.SubElement(cd, "target", dev="hdc", bus="ide")
    ET.SubElement(cd, "readonly")
    return ET.tostring(root, encoding="unicode")


@pytest.fixture(scope="module")
def setup(libvirtd: None, rig: guest.Rig, libvirt_events: EventLoop) -> Iterator[Setup]:
    workdir = loops.workdir("api-guest")
    conn = libvirt.open("qemu:///system")
    try:
        with hsmrig.pool(workdir) as pool, contextlib.ExitStack() as stack:
            d = pool.domain
            raw_link = pool.volume(16 * MiB, fmt="raw")
            # Room after the raw LV: a loop-mapped LV grows in place only.
            gap = uuid.uuid4()
            d.create_volume(gap, 1 * GiB, initial_size=128 * MiB)
            thin_link = pool.thin_volume(initial=16 * MiB)
            d.remove_volume(gap)
            iso = os.path.join(workdir, "cdrom.iso")
            with open(iso, "wb") as f:
                f.truncate(MiB)
            cdrom, cdrom_domain = uuid.uuid4(), uuid.uuid4()
            cdrom_link = links.create(cdrom_domain, cdrom, iso, pool.run_dir)
            stack.callback(links.remove, cdrom_domain, cdrom, pool.run_dir)

            config = pool.config(chunk_mb=16)
            hsm = stack.enter_context(running(config, libvirt_events)).hsm

            name = guest.DOMAIN_PREFIX + "api-" + uuid.uuid4().hex[:8]
            console = os.path.join(workdir, name + ".console")
            workload = guest.Workload(write_mb=1, hold=True, watch_size=True)
            xml = guest.domain_xml(name, rig, raw_link, workload, console, disk_format="raw")
            g = guest.Guest(conn, name, _add_disks(xml, thin_link, cdrom_link), console)
            stack.callback(g.remove)
            stopped = guest.Guest(conn, name + "-off", xml.replace(name, name + "-off"), console + "-off")
            stack.callback(stopped.remove)
            server = api.ApiServer(
                hsm.grower, os.path.join(workdir, "api.sock"), "127.0.0.1:0", TOKEN, body_timeout=BODY_TIMEOUT
            )
            server.start()
            stack.callback(server.stop)
            loop_disk = guest.LoopDisk(os.path.join(workdir, "lun"), 16 * MiB)
            stack.callback(loop_disk.detach)
            loop_name = name + "-loop"
            loop_console = os.path.join(workdir, loop_name + ".console")
            loop_xml = guest.domain_xml(loop_name, rig, loop_disk.device, workload, loop_console, disk_format="raw")
            loop_guest = guest.Guest(conn, loop_name, loop_xml, loop_console)
            stack.callback(loop_guest.remove)
            # Both boot at once: one boot's wall time for the module.
            g.start()
            loop_guest.start()
            g.wait_console("XTND-SIZE sectors=", timeout=180)
            loop_guest.wait_console("XTND-SIZE sectors=", timeout=180)
            raw, thin = (str(hsmrig.volume_of(pool, link)) for link in (raw_link, thin_link))
            yield Setup(pool, hsm, g, stopped, raw, thin, str(cdrom), server, workdir, loop_guest, loop_disk)
    finally:
        conn.close()
        shutil.rmtree(workdir, ignore_errors=True)


# The primitive (xtnd.hsm.growdisk)


def test_grow_raw_to_device(setup: Setup) -> None:
    """lvextend on the "SPM", then one call: refresh + blockResize; the guest sees it."""
    grower = setup.hsm.grower
    before = grower.device_size(setup.vm, setup.raw)
    assert setup.guest_sizes()[-1] == before
    setup.raw_extend(before + 8 * MiB)
    assert grower.device_size(setup.vm, setup.raw) == before  # not refreshed yet
    grown = grower.grow_to_device(setup.vm, setup.raw)
    assert (grown.before, grown.after, grown.device) == (before, before + 8 * MiB, before + 8 * MiB)
    assert grower.device_size(setup.vm, setup.raw) == before + 8 * MiB
    setup.wait_guest_size(before + 8 * MiB)
    # Again: nothing to do, nothing changes.
    again = grower.grow_to_device(setup.vm, setup.raw)
    assert not again.changed and again.after == before + 8 * MiB


def test_grow_qcow2_to_bytes_updates_drive(setup: Setup) -> None:
    """A qcow2 disk's virtual size grows; the monitor's drive follows."""
    grower = setup.hsm.grower
    vm = setup.vm

    def capacity() -> int:
        drives = setup.hsm.monitor.snapshot().get(vm, {})
        return drives["vdb"].capacity if "vdb" in drives else -1

    wait_for(lambda: capacity() == GiB, timeout=30)
    grown = grower.grow_to(vm, setup.thin, 2 * GiB)
    assert (grown.before, grown.after) == (GiB, 2 * GiB)
    wait_for(lambda: capacity() == 2 * GiB, timeout=30)
    drive = setup.hsm.monitor.snapshot()[vm]["vdb"]
    assert drive.state.value == "armed" and drive.threshold is not None


def test_grow_errors(setup: Setup) -> None:
    grower = setup.hsm.grower
    with pytest.raises(growdisk.NoSuchVM):
        grower.grow_to_device(str(uuid.uuid4()), setup.raw)
    with pytest.raises(growdisk.NoSuchVM):
        grower.grow_to_device("not-a-uuid", setup.raw)
    with pytest.raises(growdisk.NotRunning):
        grower.grow_to_device(setup.stopped.dom.UUIDString(), setup.raw)
    with pytest.raises(growdisk.NoSuchVolume):
        grower.grow_to_device(setup.vm, str(uuid.uuid4()))
    with pytest.raises(growdisk.UnsupportedDisk):
        grower.grow_to(setup.vm, setup.cdrom, 2 * MiB)
    size = grower.device_size(setup.vm, setup.raw)
    with pytest.raises(growdisk.StateNotAllowed, match="shrink"):
        grower.grow_to(setup.vm, setup.raw, size - MiB)
    with pytest.raises(growdisk.GrowFailed, match="blockResize"):
        grower.grow_to(setup.vm, setup.raw, size + 64 * MiB)  # raw past its device
    assert setup.guest_sizes()[-1] == size


# The host API over its real sockets (xtnd.hsm.api)


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 60.0):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


def call(
    setup: Setup,
    method: str,
    path: str,
    body: Any = None,
    tcp: bool = False,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    """One request; (status, parsed JSON body). body: bytes as is, else JSON."""
    if tcp:
        conn: http.client.HTTPConnection = http.client.HTTPConnection("127.0.0.1", setup.api.port, timeout=60)
    else:
        conn = UnixConnection(setup.api.socket_path)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    try:
        conn.request(method, path, body=data, headers=headers or {})
        response = conn.getresponse()
        raw = response.read()
    finally:
        conn.close()
    assert response.getheader("Content-Type", "").startswith("application/json"), raw
    return response.status, json.loads(raw)


def volume_path(setup: Setup, volume: str, vm: str | None = None) -> str:
    return f"/v1/servers/{vm or setup.vm}/volumes/{volume}"


def event(vm: str, volume: str, name: str = "volume-extended") -> dict[str, str]:
    return {"name": name, "server_uuid": vm, "tag": volume}


def get_size(setup: Setup, volume: str) -> int:
    status, body = call(setup, "GET", volume_path(setup, volume))
    assert status == 200, body
    assert body["volume_blockdev"]["id"] == volume
    return int(body["volume_blockdev"]["bytes"])


def assert_serving(setup: Setup) -> None:
    """The API still answers, on both transports."""
    assert setup.api.alive
    get_size(setup, setup.raw)
    status, _ = call(setup, "GET", volume_path(setup, setup.raw), tcp=True, headers=AUTH)
    assert status == 200


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_api_events_completed(setup: Setup) -> None:
    """volume-extended: refresh + grow; the guest sees the device's size."""
    before = get_size(setup, setup.raw)
    setup.raw_extend(before + 4 * MiB)
    assert get_size(setup, setup.raw) == before
    status, body = call(setup, "POST", "/v1/events", {"events": [event(setup.vm, setup.raw)]})
    assert status == 200, body
    [ev] = body["events"]
    assert (ev["status"], ev["code"], ev["bytes"], ev["tag"]) == ("completed", 200, before + 4 * MiB, setup.raw)
    setup.wait_guest_size(before + 4 * MiB)
    assert get_size(setup, setup.raw) == before + 4 * MiB


def test_api_events_partial_failure(setup: Setup) -> None:
    events = [
        event(setup.vm, setup.raw),
        event(str(uuid.uuid4()), setup.raw),
        event(setup.vm, str(uuid.uuid4())),
        event(setup.stopped.dom.UUIDString(), setup.raw),
    ]
    status, body = call(setup, "POST", "/v1/events", {"events": events})
    assert status == 207, body
    assert [(e["status"], e["code"]) for e in body["events"]] == [
        ("completed", 200),
        ("failed", 404),
        ("failed", 404),
        ("failed", 422),
    ]
    assert "not running" in body["events"][3]["error"]


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b'{"events": [',
        [],
        {},
        {"events": "volume-extended"},
        {"events": [None]},
        {"events": [{"name": "volume-extended", "server_uuid": "x"}]},
        {"events": [{"name": "volume-extended", "server_uuid": 7, "tag": "y"}]},
        {"events": [{"name": "network-changed", "server_uuid": "x", "tag": "y"}]},
        b"\xff\xfe",
    ],
    ids=[
        "text",
        "truncated-json",
        "list",
        "no-events",
        "events-str",
        "event-null",
        "no-tag",
        "int-uuid",
        "name",
        "bin",
    ],
)
def test_api_events_malformed(setup: Setup, body: Any) -> None:
    status, answer = call(setup, "POST", "/v1/events", body)
    assert status == 400, answer
    assert answer["error"]["code"] == 400


def test_api_events_malformed_does_nothing(setup: Setup) -> None:
    """One bad event: the good one before it is not run either."""
    before = get_size(setup, setup.raw)
    setup.raw_extend(before + 4 * MiB)
    bad = {"events": [event(setup.vm, setup.raw), event(setup.vm, setup.raw, name="bogus")]}
    status, _ = call(setup, "POST", "/v1/events", bad)
    assert status == 400
    assert get_size(setup, setup.raw) == before
    # The rescan endpoint refreshes the device only: the guest keeps its size.
    status, body = call(setup, "PUT", volume_path(setup, setup.raw) + "/rescan")
    assert status == 202, body
    assert body == {"volume_blockdev": {"id": setup.raw, "bytes": before + 4 * MiB}}
    assert get_size(setup, setup.raw) == before + 4 * MiB
    assert setup.guest_sizes()[-1] == before
    status, body = call(setup, "POST", "/v1/events", {"events": [event(setup.vm, setup.raw)]})
    assert status == 200, body
    setup.wait_guest_size(before + 4 * MiB)


def test_api_volume_not_found(setup: Setup) -> None:
    for vm, volume in ((str(uuid.uuid4()), setup.raw), (setup.vm, str(uuid.uuid4())), ("x", "y")):
        for method, suffix, body in (("GET", "", None), ("PUT", "/rescan", None), ("POST", "/extend", {"bytes": GiB})):
            status, answer = call(setup, method, volume_path(setup, volume, vm) + suffix, body)
            assert status == 404, (method, suffix, answer)
            assert answer["error"]["type"] in ("NoSuchVM", "NoSuchVolume")


def test_api_extend(setup: Setup) -> None:
    """extend: 200 (qcow2 grows), 409 (stopped vm, shrink), 501 (cdrom), 500 (raw past its device)."""
    status, body = call(setup, "POST", volume_path(setup, setup.thin) + "/extend", {"bytes": 3 * GiB})
    assert status == 200, body
    assert body["disk"]["bytes"] == 3 * GiB and body["volume_blockdev"]["id"] == setup.thin
    status, body = call(setup, "POST", volume_path(setup, setup.thin) + "/extend", {"bytes": 3 * GiB})
    assert status == 200 and body["disk"]["before"] == body["disk"]["bytes"] == 3 * GiB
    stopped = setup.stopped.dom.UUIDString()
    status, body = call(setup, "POST", volume_path(setup, setup.raw, stopped) + "/extend", {"bytes": GiB})
    assert status == 409 and body["error"]["type"] == "NotRunning", body
    status, body = call(setup, "POST", volume_path(setup, setup.thin) + "/extend", {"bytes": GiB})
    assert status == 409 and "shrink" in body["error"]["message"], body
    status, body = call(setup, "POST", volume_path(setup, setup.cdrom) + "/extend", {"bytes": 2 * MiB})
    assert status == 501 and body["error"]["type"] == "UnsupportedDisk", body
    size = get_size(setup, setup.raw)
    status, body = call(setup, "POST", volume_path(setup, setup.raw) + "/extend", {"bytes": size + 64 * MiB})
    assert status == 500 and body["error"]["type"] == "GrowFailed", body
    assert setup.guest_sizes()[-1] == size


@pytest.mark.parametrize(
    "body",
    [{}, {"bytes": "1G"}, {"bytes": True}, {"bytes": -1}, {"bytes": 0}, {"bytes": 1.5}, {"bytes": None}, [1], b"{"],
)
def test_api_extend_malformed(setup: Setup, body: Any) -> None:
    status, answer = call(setup, "POST", volume_path(setup, setup.thin) + "/extend", body)
    assert status == 400, answer


def test_api_unknown_paths(setup: Setup) -> None:
    for method, path in (("GET", "/"), ("GET", "/v1/events/x"), ("POST", "/v2/events"), ("GET", "/v1/servers/x")):
        status, body = call(setup, method, path)
        assert status == 404 and body["error"]["code"] == 404
    status, _ = call(setup, "DELETE", volume_path(setup, setup.raw))
    assert status == 405


def test_api_tcp_token(setup: Setup) -> None:
    path = volume_path(setup, setup.raw)
    assert call(setup, "GET", path, tcp=True)[0] == 401
    assert call(setup, "GET", path, tcp=True, headers={"Authorization": f"Basic {TOKEN}"})[0] == 401
    assert call(setup, "GET", path, tcp=True, headers={"Authorization": "Bearer "})[0] == 401
    assert call(setup, "GET", path, tcp=True, headers={"Authorization": "Bearer wrong"})[0] == 403
    assert call(setup, "POST", "/v1/events", {"events": []}, tcp=True, headers={"Authorization": "Bearer x"})[0] == 403
    assert call(setup, "GET", "/nowhere", tcp=True)[0] == 401  # no path probing without a token
    status, body = call(setup, "GET", path, tcp=True, headers=AUTH)
    assert status == 200 and body["volume_blockdev"]["id"] == setup.raw


def test_api_socket_root_only(setup: Setup) -> None:
    assert stat.S_IMODE(os.stat(setup.api.socket_path).st_mode) == 0o600
    probe = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n    s.connect(sys.argv[1])\nexcept PermissionError:\n    sys.exit(13)\n"
    )
    nobody = subprocess.run(
        [sys.executable, "-c", probe, setup.api.socket_path], user=65534, capture_output=True, check=False
    )
    assert nobody.returncode == 13, nobody.stderr


def _raw(setup: Setup, data: bytes, shutdown: bool = False, timeout: float = 30.0) -> bytes:
    """Send data as is on a new unix connection; what comes back until the server closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(setup.api.socket_path)
        s.sendall(data)
        if shutdown:
            s.shutdown(socket.SHUT_WR)
        out = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(65536):
                out += chunk
                if b"\r\n\r\n" in out and not shutdown:
                    break
        return out


def test_api_bad_input(setup: Setup) -> None:
    """Huge, truncated, slow and garbage requests get an answer or a closed
    connection; the API keeps serving."""
    huge = b"x" * (api.MAX_BODY + 1)
    head = f"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Length: {len(huge)}\r\n\r\n".encode()
    assert _raw(setup, head + huge).startswith(b"HTTP/1.1 413")
    assert_serving(setup)
    # Declares 100 bytes, sends 10 and ends its side: 400 or just closed.
    head = b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
    answer = _raw(setup, head + b'{"events":', shutdown=True)
    assert answer == b"" or answer.startswith(b"HTTP/1.1 400"), answer
    assert_serving(setup)
    # Declares a body and stalls: 408 after the body timeout.
    head = b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
    assert _raw(setup, head + b'{"ev').startswith(b"HTTP/1.1 408")
    assert_serving(setup)
    assert _raw(setup, b"NOT HTTP AT ALL\r\n\r\n").startswith(b"HTTP/1.0 400")
    assert _raw(setup, b"GET / HTTP/1.1\r\n" + b"X: " + b"y" * 70000 + b"\r\n\r\n").startswith(b"HTTP/1.0 400")
    assert_serving(setup)


def _connected(s: socket.socket, path: str) -> bool:
    try:
        s.connect(path)
    except BlockingIOError:
        return False
    return True


def test_api_many_connections(setup: Setup) -> None:
    """300 idle connections (and some half-sent requests) do not stop others being served."""
    idle = []
    try:
        for i in range(300):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            idle.append(s)
            # A full listen backlog answers EAGAIN at once (the loop accepts
            # in batches): a client tries again, as this one does.
            wait_for(lambda s=s: _connected(s, setup.api.socket_path), timeout=30, what="connection accepted")
            if i % 3 == 0:
                s.sendall(b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Le")
        for _ in range(50):
            idle.append(socket.create_connection(("127.0.0.1", setup.api.port or 0)))
        assert_serving(setup)
        status, body = call(setup, "POST", "/v1/events", {"events": [event(setup.vm, setup.raw)]})
        assert status == 200, body
    finally:
        for s in idle:
            s.close()
    assert_serving(setup)


def test_api_from_config(setup: Setup) -> None:
    """[api] as the daemon reads it: the unix socket at [api] socket."""
    config = setup.pool.config(chunk_mb=16)
    config.api.socket = os.path.join(setup.workdir, "from-config.sock")
    server = daemon.start_api(config, setup.hsm)
    assert server is not None
    assert daemon.services_health(setup.hsm, server, None) == setup.hsm.health()
    try:
        conn = UnixConnection(config.api.socket)
        conn.request("GET", volume_path(setup, setup.raw))
        response = conn.getresponse()
        assert response.status == 200 and json.loads(response.read())["volume_blockdev"]["id"] == setup.raw
        conn.close()
    finally:
        server.stop()
    assert not os.path.exists(config.api.socket)
    # The systemd watchdog hears of an API thread that is gone.
    assert daemon.services_health(setup.hsm, server, None) == (False, "the host api thread is gone")
    config.api.socket = ""
    assert daemon.start_api(config, setup.hsm) is None
    # TCP only, the token read from token_file.
    config.api.listen = "127.0.0.1:0"
    config.api.token_file = os.path.join(setup.workdir, "token")
    with open(config.api.token_file, "w") as f:
        f.write("from-file\n")
    server = daemon.start_api(config, setup.hsm)
    assert server is not None and server.port
    try:
        for token, expected in (("from-file", 200), ("wrong", 403)):
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
            conn.request("GET", volume_path(setup, setup.raw), headers={"Authorization": f"Bearer {token}"})
            assert conn.getresponse().status == expected
            conn.close()
    finally:
        server.stop()


# Automatic mode (xtnd.hsm.udevwatch)


@contextlib.contextmanager
def watching(setup: Setup) -> Iterator[tuple[udevwatch.UdevWatcher, list[float]]]:
    """A udev watcher on the shared HSM; the times (monotonic) it grew a disk."""
    grown_at: list[float] = []

    def on_grown(device: str, grown: list[growdisk.Grown], seconds: float) -> None:
        if any(g.changed for g in grown):
            grown_at.append(time.monotonic())

    watcher = udevwatch.UdevWatcher(setup.hsm.grower, on_grown=on_grown)
    watcher.start()
    try:
        yield watcher, grown_at
    finally:
        watcher.stop()
    assert not watcher.alive


def test_udev_loop_device_grows_guest(setup: Setup) -> None:
    """losetup -c after the backing file grew: the guest sees the new size, no API call."""
    with watching(setup) as (watcher, grown_at):
        before = setup.loop_disk.size
        assert setup.guest_sizes(setup.loop_guest)[-1] == before
        setup.loop_disk.grow(before + 4 * MiB)
        wait_for(lambda: setup.guest_sizes(setup.loop_guest)[-1] == before + 4 * MiB, timeout=30, what="guest size")
        # The guest may print its size before blockResize returns to the watcher.
        wait_for(lambda: grown_at, timeout=30, what="the watcher's report")
        assert len(grown_at) == 1 and watcher.resizes >= 1
        # Another VM's disk on another device is left alone.
        assert setup.guest_sizes()[-1] == get_size(setup, setup.raw)


def test_udev_lv_refresh_grows_guest(setup: Setup) -> None:
    """An orchestrator's lvextend + refresh of the loop-activated LV: same path."""
    with watching(setup):
        before = get_size(setup, setup.raw)
        setup.raw_extend(before + 4 * MiB)
        setup.pool.domain.refresh_volume(setup.raw)
        setup.wait_guest_size(before + 4 * MiB, timeout=30)


def test_udev_ignores_other_events(setup: Setup) -> None:
    """Changes that are no resize, and devices under no VM, grow nothing."""
    watcher = udevwatch.UdevWatcher(setup.hsm.grower)
    assert daemon.services_health(setup.hsm, None, watcher) == (False, "the udev watcher thread is gone")
    assert watcher.step("add", setup.loop_disk.device, "1") == []
    assert watcher.step("change", setup.loop_disk.device, None) == []
    assert watcher.step("change", "/dev/null", "1") == []
    [same] = watcher.step("change", setup.loop_disk.device, "1")  # already at the device's size
    assert not same.changed and same.after == setup.loop_disk.size
    assert watcher.resizes == 2


# Latency (figures, not assertions): pytest -m soak -s -k bench


def _figures(name: str, values: list[float]) -> str:
    ms = sorted(v * 1000 for v in values)
    return (
        f"{name}: n={len(ms)} p50={stats.percentile(ms, 50):.1f}ms p99={stats.percentile(ms, 99):.1f}ms "
        f"max={ms[-1]:.1f}ms"
    )


@pytest.mark.soak
@pytest.mark.timeout(900)
def test_bench_latency(setup: Setup) -> None:
    """API events path (POST -> the guest sees the size) and udev path
    (losetup -c -> the guest sees it), TRIALS each, printed with the load."""
    trials = int(os.environ.get("XTND_BENCH_TRIALS", "30"))
    api_response, api_seen, udev_seen = [], [], []
    for _ in range(trials):
        size = get_size(setup, setup.raw) + 4 * MiB
        setup.raw_extend(size)
        start = time.monotonic()
        status, _ = call(setup, "POST", "/v1/events", {"events": [event(setup.vm, setup.raw)]})
        api_response.append(time.monotonic() - start)
        assert status == 200
        wait_for(lambda s=size: setup.guest_sizes()[-1] == s, timeout=30, interval=0.002)
        api_seen.append(time.monotonic() - start)
    with watching(setup):
        for _ in range(trials):
            size = setup.loop_disk.size + MiB
            with open(setup.loop_disk.path, "r+b") as f:
                f.truncate(size)
            start = time.monotonic()
            subprocess.run(["losetup", "--set-capacity", setup.loop_disk.device], check=True)
            wait_for(lambda s=size: setup.guest_sizes(setup.loop_guest)[-1] == s, timeout=30, interval=0.002)
            udev_seen.append(time.monotonic() - start)
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    print()
    print(_figures("api events: POST -> 200", api_response))
    print(_figures("api events: POST -> guest sees size", api_seen))
    print(_figures("udev: losetup -c -> guest sees size", udev_seen))
    print(f"load average {' '.join(load)} (shared machine)")
