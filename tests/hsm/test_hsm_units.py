"""Small pure parts of the HSM: config, links, disk XML, stats, metrics, notify."""

from __future__ import annotations

import math
import os
import socket
import uuid
import xml.etree.ElementTree as ET

import pytest
from testlib.hsmfakes import RUN, FakeDisk, FakeDomain, disk_xml
from xtnd.common import sdnotify as notify
from xtnd.common import stats as stats_mod
from xtnd.hsm import config as hsm_config
from xtnd.hsm import disks, links, metrics, stats

MiB = 1024**2

MASTER = "8adbc85e-e554-4ae0-b318-8a5465fe5fe1"


def test_config_defaults_file_and_dropins(tmp_path: str) -> None:
    path = os.path.join(tmp_path, "hsm.conf")
    with open(path, "w") as f:
        f.write(f"[host]\nhost_id = 7\nmaster_domain = {MASTER}\n[thin]\nchunk_mb = 64\n")
    os.mkdir(path + ".d")
    with open(os.path.join(path + ".d", "10-a.conf"), "w") as f:
        f.write("[thin]\nchunk_mb = 128\n[retry]\nbackoff_max = 5.5\n")
    with open(os.path.join(path + ".d", "20-b.conf"), "w") as f:
        f.write("[thin]\nutilization_percent = 50\n")
    c = hsm_config.load(path)
    assert (c.host.host_id, c.host.master_domain) == (7, MASTER)
    assert (c.thin.chunk_mb, c.thin.utilization_percent) == (128, 50)
    assert c.retry.backoff_max == 5.5
    assert c.monitor.stats_interval == 2.0
    c.validate()
    text = hsm_config.show(c)
    assert "# Size of one extend in MiB" in text and "chunk_mb = 128" in text
    # What --show-config prints reads back as the same configuration.
    again = os.path.join(tmp_path, "again.conf")
    with open(again, "w") as f:
        f.write(text)
    assert hsm_config.load(again) == c


@pytest.mark.parametrize(
    "text, error",
    [
        ("[hots]\nhost_id = 1\n", "unknown section"),
        ("[host]\nhostid = 1\n", "unknown option"),
        ("[host]\nhost_id = one\n", "not an integer"),
        ("[thin]\npolicy = fast\n", "must be one of 'fixed', 'adaptive'"),
        ("[thin]\nmax_chunk_mb = 0\n", "max_chunk_mb"),
        ("[thin]\nsafety_factor = 0.5\n", "safety_factor"),
    ],
)
def test_config_errors(tmp_path: str, text: str, error: str) -> None:
    path = os.path.join(tmp_path, "hsm.conf")
    with open(path, "w") as f:
        f.write(text)
    with pytest.raises(hsm_config.ConfigError, match=error):
        hsm_config.load(path)


def test_config_validate() -> None:
    with pytest.raises(hsm_config.ConfigError, match="host_id"):
        hsm_config.Config().validate()
    c = hsm_config.Config()
    c.host.host_id, c.host.master_domain, c.thin.utilization_percent = 1, MASTER, 101
    with pytest.raises(hsm_config.ConfigError, match="utilization"):
        c.validate()


def test_links(tmp_path: str) -> None:
    run = os.path.join(tmp_path, "run")
    sd, vol = uuid.uuid4(), uuid.uuid4()
    target = os.path.join(tmp_path, "dev")
    open(target, "w").close()
    path = links.create(sd, vol, target, run)
    assert path == os.path.join(run, str(sd), str(vol))
    assert os.readlink(path) == target
    assert links.create(sd, vol, target + "2", run) == path  # replaced in place
    assert os.readlink(path) == target + "2"
    assert links.parse(path, run) == (sd, vol)
    assert links.parse(path + "/x", run) is None
    assert links.parse("/dev/loop3", run) is None
    assert links.parse(os.path.join(run, "nope", str(vol)), run) is None
    links.remove(sd, vol, run)
    links.remove(sd, vol, run)
    assert not os.path.exists(os.path.dirname(path))


def test_thin_disks_from_xml() -> None:
    a, b = FakeDisk("vda"), FakeDisk("vdb")
    cdrom = (
        "<disk type='file' device='cdrom'><driver type='qcow2'/><source file='x' index='9'/><target dev='hdc'/></disk>"
    )
    linked = FakeDisk("vde").path  # a file volume's link: it grows by itself, nothing to watch
    on_file = f"<disk type='file' device='disk'><driver type='qcow2'/><source file='{linked}' index='2'/>"
    on_file += "<target dev='vde'/></disk>"
    dom = FakeDomain("vm", a, b, extra_xml=disk_xml("vdc", 5, "/images/c.qcow2") + cdrom + on_file)
    found = disks.thin_disks(dom.XMLDesc(), RUN)
    assert [(d.name, d.index, d.domain, d.volume) for d in found] == [
        ("vda", 1, a.domain, a.volume),
        ("vdb", 1, b.domain, b.volume),
    ]


def test_disk_element_by_target() -> None:
    a = FakeDisk("vda")
    cdrom = "<disk type='file' device='cdrom'><target dev='hdc'/></disk><disk type='file'/>"
    root = ET.fromstring(FakeDomain("vm", a, extra_xml=cdrom).XMLDesc())
    vda = disks.disk_element(root, "vda")
    assert vda is not None and vda.get("type") == "block"
    hdc = disks.disk_element(root, "hdc")
    assert hdc is not None and hdc.get("device") == "cdrom"
    assert disks.disk_element(root, "vdz") is None


def test_stats_top_image_only() -> None:
    raw = {
        "state.state": 3,
        "state.reason": 5,
        "block.count": 3,
        "block.0.name": "vda",
        "block.0.path": "/run/xtnd/a/b",
        "block.0.backingIndex": 2,
        "block.0.capacity": 1024,
        "block.0.allocation": 10,
        "block.0.physical": 100,
        "block.0.threshold": 50,
        "block.1.name": "vda",
        "block.1.backingIndex": 1,
        "block.1.allocation": 999,
        "block.2.name": "vdb",
        "block.2.physical": 7,
    }
    st = stats.parse(raw)
    assert (st.state, st.reason) == (3, 5)
    assert st.blocks["vda"] == stats.BlockStats("vda", 2, "/run/xtnd/a/b", 1024, 10, 100, 50)
    assert st.blocks["vdb"].threshold is None and st.blocks["vdb"].physical == 7


def test_record_line_and_percentiles() -> None:
    r = metrics.ExtendRecord(
        "u", "vm1", "vda", "d", "v", "enospc", 16 * MiB, 32 * MiB, 1.0, 1.01, 1.2, 1.3, 1.35, True, 3.5 * MiB, 16 * MiB
    )
    fields = metrics.parse_line("12:00 INFO " + r.line())
    assert fields == {
        "vm": "vm1",
        "drive": "vda",
        "domain": "d",
        "volume": "v",
        "old_mb": "16",
        "new_mb": "32",
        "trigger": "enospc",
        "wait_ms": "10.0",
        "extend_ms": "190.0",
        "refresh_ms": "100.0",
        "resume_ms": "50.0",
        "total_ms": "350.0",
        "resumed": "yes",
        "rate_mbs": "3.50",
        "chunk_mb": "16",
    }
    assert stats_mod.percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert stats_mod.percentile([1.0, 2.0, 3.0, 4.0], 99) == 4.0
    assert math.isnan(stats_mod.percentile([], 50))
    assert stats_mod.json_number(stats_mod.percentile([], 50), 1) is None


def test_notify(tmp_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not notify.notify("READY=1")
    path = os.path.join(tmp_path, "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(path)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert notify.notify("READY=1")
        assert s.recv(100) == b"READY=1"


def test_daemon_health_for_the_watchdog() -> None:
    from types import SimpleNamespace

    from xtnd.hsm import daemon

    now = 1000.0
    monitor = SimpleNamespace(alive=True, heartbeat=now - 5, clock=lambda: now)
    mailbox = SimpleNamespace(alive=True)
    config = SimpleNamespace(monitor=SimpleNamespace(stats_interval=2.0))
    watch = SimpleNamespace(lost=None, alive=True)
    resizes = SimpleNamespace(alive=True)
    hsm = SimpleNamespace(monitor=monitor, mailbox=mailbox, config=config, host_id_watch=watch, resizes=resizes)
    assert daemon.HSM.health(hsm) == (True, "")  # type: ignore[arg-type]
    resizes.alive = False
    assert daemon.HSM.health(hsm) == (False, "the resize watcher thread is gone")  # type: ignore[arg-type]
    resizes.alive = True
    watch.alive = False
    assert daemon.HSM.health(hsm) == (False, "the host id watch thread is gone")  # type: ignore[arg-type]
    watch.alive = True
    monitor.heartbeat = now - daemon.STUCK_AFTER - 1
    assert daemon.HSM.health(hsm) == (False, "the stats loop has not gone round for 121s")  # type: ignore[arg-type]
    monitor.heartbeat = now
    mailbox.alive = False
    assert daemon.HSM.health(hsm) == (False, "the mailbox thread is gone")  # type: ignore[arg-type]
    monitor.alive = False
    assert daemon.HSM.health(hsm) == (False, "the monitor's stats thread is gone")  # type: ignore[arg-type]


def test_config_api(tmp_path: str) -> None:
    """[api]: TCP needs a readable, non-empty token file; the defaults need none."""
    c = hsm_config.Config()
    c.host.host_id, c.host.master_domain = 1, MASTER
    assert (c.api.socket, c.api.listen, c.api.token_file, c.api.udev) == ("/run/xtnd/hsm-api.sock", "", "", False)
    c.validate()
    c.api.listen = "127.0.0.1:9712"
    with pytest.raises(hsm_config.ConfigError, match=r"\[api\] listen.*needs token_file"):
        c.validate()
    token = os.path.join(tmp_path, "token")
    c.api.token_file = token
    with pytest.raises(hsm_config.ConfigError, match="cannot read the token"):
        c.validate()
    with open(token, "w") as f:
        f.write("  \n")
    with pytest.raises(hsm_config.ConfigError, match="empty"):
        c.validate()
    with open(token, "w") as f:
        f.write("abc123\n")
    c.validate()
    assert hsm_config.read_token(token) == "abc123"
    path = os.path.join(tmp_path, "hsm.conf")
    with open(path, "w") as f:
        f.write(f"[host]\nhost_id = 1\nmaster_domain = {MASTER}\n[api]\nlisten = nowhere\n")
    with pytest.raises(hsm_config.ConfigError, match="HOST:PORT"):
        hsm_config.load(path)
    with open(path, "w") as f:
        f.write(f"[host]\nhost_id = 1\nmaster_domain = {MASTER}\n[api]\nudev = maybe\n")
    with pytest.raises(hsm_config.ConfigError, match="udev"):
        hsm_config.load(path)


def test_metrics_show_the_adaptive_sizing() -> None:
    from prometheus_client import generate_latest

    m = metrics.HsmMetrics(1)
    m.sources = metrics.Sources(
        counters=dict,
        drive_states=list,
        in_flight=lambda: 0,
        io={},
        drive_sizing=lambda: [("vm1", "vda", 3.5 * MiB, 16 * MiB)],
        extend_latency=lambda: 0.25,
    )
    times = (1.0, 1.01, 1.2, 1.3, 1.3)
    m.record(
        metrics.ExtendRecord("u", "vm1", "vda", "d", "v", "stats", 0, 32 * MiB, *times, False, 3.5 * MiB, 16 * MiB)
    )
    from prometheus_client.parser import text_string_to_metric_families

    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(generate_latest(m.registry).decode())
        for s in family.samples
    }
    drive = (("drive", "vda"), ("vm", "vm1"))
    assert samples[("xtnd_hsm_drive_write_rate_bytes_per_second", drive)] == 3.5 * MiB
    assert samples[("xtnd_hsm_drive_chunk_bytes", drive)] == 16 * MiB
    assert samples[("xtnd_hsm_extend_latency_p99_seconds", ())] == 0.25
    assert samples[("xtnd_hsm_extend_chunk_bytes_count", ())] == 1
    assert samples[("xtnd_hsm_extend_chunk_bytes_bucket", (("le", "8.388608e+06"),))] == 0
