"""Scraping a daemon's Prometheus endpoint in tests."""

from __future__ import annotations

import logging
import re
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger("test.prom")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

LISTENING = r"metrics listening host=[\d.]+ port=(\d+)"


def port_in(log: str) -> int | None:
    """The port a daemon logged it listens on (it was given port 0)."""
    m = re.search(LISTENING, log)
    return int(m.group(1)) if m else None


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    log.debug("scrape port=%d\n%s", port, text)
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]
