"""The metrics HTTP server: listen values, a busy port, a real scrape."""

from __future__ import annotations

import logging
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Counter
from xtnd.common import promhttp


@pytest.mark.parametrize(
    "text,expected",
    [
        ("", None),
        ("  ", None),
        ("127.0.0.1:9710", ("127.0.0.1", 9710)),
        ("[::1]:9711", ("::1", 9711)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
    ],
)
def test_parse_listen(text: str, expected: tuple[str, int] | None) -> None:
    assert promhttp.parse_listen(text) == expected


@pytest.mark.parametrize("text", ["9710", ":9710", "localhost:http", "127.0.0.1:70000", "127.0.0.1:-1"])
def test_parse_listen_bad(text: str) -> None:
    with pytest.raises(promhttp.ListenError):
        promhttp.parse_listen(text)


def test_serves_its_registry_and_survives_a_busy_port(caplog: pytest.LogCaptureFixture) -> None:
    registry = CollectorRegistry()
    Counter("xtnd_test_things", "things", registry=registry).inc(3)
    first = promhttp.MetricsServer("127.0.0.1:0", registry)
    assert first.start()
    try:
        assert first.port
        with urllib.request.urlopen(f"http://127.0.0.1:{first.port}/metrics", timeout=10) as r:
            assert "xtnd_test_things_total 3.0" in r.read().decode()
        second = promhttp.MetricsServer(f"127.0.0.1:{first.port}", CollectorRegistry())
        with caplog.at_level(logging.ERROR, "xtnd.metrics"):
            assert not second.start()
        assert "metrics disabled: cannot listen" in caplog.text
        assert second.port is None
        second.stop()
    finally:
        first.stop()
    assert first.port is None
