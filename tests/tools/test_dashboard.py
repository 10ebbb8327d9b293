"""The Grafana dashboard asks only for metrics the daemons export."""

from __future__ import annotations

import json
import os
import re
import uuid

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from xtnd.hsm.metrics import HsmMetrics, Sources
from xtnd.mailbox.directio import Counters
from xtnd.spm.domains import DomainRegistry
from xtnd.spm.forecast import Forecast, Settings
from xtnd.spm.metrics import Metrics

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DASHBOARD = os.path.join(REPO, "grafana", "xtnd-dashboard.json")
MAILBOX_STATS = {"scans": 1, "event_reads": 1, "requests": 1, "replies": 1, "errors": 0}


def exported() -> set[str]:
    spm = Metrics()
    spm.watch("mailbox", lambda: MAILBOX_STATS)
    spm.watch("inbox", Counters().snapshot)
    spm.watch("outbox", Counters().snapshot)
    spm.started()
    spm.finished("refused", 1.0, None, {"queue": 0.1}, "unknown_volume")
    domain = uuid.uuid4()
    forecast = Forecast(DomainRegistry(lambda u: None, [domain], ttl=60), Settings())  # type: ignore[arg-type,return-value]
    forecast.register(spm.registry)
    forecast.sample(domain, 1 << 30)
    hsm = HsmMetrics(1)
    hsm.sources = Sources(
        counters=lambda: {"extends": 1},
        drive_states=lambda: ["armed"],
        in_flight=lambda: 0,
        io={"mailbox": lambda: {"submitted": 1, "errors": 0}, "inbox": Counters().snapshot,
            "outbox": Counters().snapshot},
    )  # fmt: skip
    names = set()
    for registry in (spm.registry, hsm.registry):
        for family in text_string_to_metric_families(generate_latest(registry).decode()):
            names.update(s.name for s in family.samples)
    return names


def test_every_dashboard_metric_is_exported() -> None:
    with open(DASHBOARD) as f:
        dashboard = json.load(f)
    names = exported()
    used = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\bxtnd_[a-z_]+", target["expr"])
    }
    assert len(used) >= 15
    assert used <= names, sorted(used - names)
    assert all(n.startswith("xtnd_") for n in names)
    titles = " ".join(p["title"] for p in dashboard["panels"])
    for topic in ("latency per phase", "by result", "pauses", "lease holder"):
        assert topic in titles.lower(), topic
