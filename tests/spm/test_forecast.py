"""The domain fill forecast: the estimator (pure logic) and its warning."""

from __future__ import annotations

import logging
import math
import pathlib
import uuid

import pytest
from prometheus_client import generate_latest
from xtnd.spm import domains as doms
from xtnd.spm.forecast import Estimator, Forecast, Settings, fit_rate

MiB = 1024 * 1024
DOM = uuid.UUID("8adbc85e-e554-4ae0-b318-8a5465fe5fe1")


def test_fit_rate_of_a_steady_line() -> None:
    samples = [(float(t), 1000 * MiB - t * 2 * MiB) for t in range(0, 30)]
    assert fit_rate(samples) == pytest.approx(2 * MiB)


def test_fit_rate_never_negative_and_needs_two_times() -> None:
    assert fit_rate([(0.0, 10), (1.0, 20)]) == 0.0
    assert fit_rate([(5.0, 10)]) == 0.0
    assert fit_rate([(5.0, 10), (5.0, 5)]) == 0.0


def test_no_forecast_before_the_minimum_span() -> None:
    est = Estimator(window=600, min_span=60)
    est.sample(0.0, 1000 * MiB)
    est.extended(1.0, "v1", 100 * MiB)  # one big extend makes no forecast
    assert est.rate(1.0) == 0.0
    assert math.isinf(est.seconds_to_full(1.0))
    est.extended(61.0, "v1", 100 * MiB)
    assert est.rate(61.0) > 0
    assert est.seconds_to_full(61.0) < math.inf


def test_no_forecast_when_nothing_is_consumed() -> None:
    est = Estimator(window=600, min_span=10)
    for t in range(0, 100, 10):
        est.sample(float(t), 500 * MiB)
    assert est.rate(100.0) == 0.0
    assert math.isinf(est.seconds_to_full(100.0))


def test_steady_extends_forecast_the_end() -> None:
    # 4 MiB every 2 s from 1000 MiB: full at t = 500 s.
    est = Estimator(window=120, min_span=30)
    est.sample(0.0, 1000 * MiB)
    for i in range(1, 31):
        est.extended(2.0 * i, f"v{i % 3}", 4 * MiB)
    now = 60.0
    assert est.free == 880 * MiB
    assert now + est.seconds_to_full(now) == pytest.approx(500, rel=0.02)


def test_the_window_forgets_an_old_burst() -> None:
    est = Estimator(window=100, min_span=10)
    est.sample(0.0, 1000 * MiB)
    est.extended(1.0, "burst", 500 * MiB)
    for t in range(10, 400, 10):
        est.sample(float(t), 500 * MiB)
    assert est.rate(400.0) == 0.0
    assert est.top_volumes(400.0) == []


def test_storage_samples_correct_the_extend_estimate() -> None:
    # Another writer (a create) takes space the extends do not show.
    est = Estimator(window=600, min_span=10)
    est.sample(0.0, 1000 * MiB)
    est.extended(5.0, "v", 10 * MiB)
    est.sample(10.0, 800 * MiB)
    assert est.free == 800 * MiB
    assert est.rate(10.0) > 10 * MiB


def test_top_volumes_orders_by_growth() -> None:
    est = Estimator(window=600, min_span=0)
    est.sample(0.0, 1000 * MiB)
    for t, v, n in [(1, "a", 1), (2, "b", 5), (3, "a", 1), (4, "c", 3)]:
        est.extended(float(t), v, n * MiB)
    assert est.top_volumes(5.0, 2) == [("b", 5 * MiB), ("c", 3 * MiB)]


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_warning_names_domain_and_volumes_and_is_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    clock = _Clock()
    registry = doms.DomainRegistry(lambda u: None, [DOM], ttl=60)  # type: ignore[arg-type,return-value]
    fc = Forecast(registry, Settings(window=100, min_span=10, full_warning=300, warning_interval=50), clock)
    fc.sample(DOM, 100 * MiB)
    caplog.set_level(logging.WARNING, logger="xtnd.spm.forecast")
    for i in range(1, 41):
        clock.now = float(i)
        fc.extended(DOM, uuid.UUID(int=i % 2 + 1), 0, (1 + i % 2) * MiB)
    lines = [r.getMessage() for r in caplog.records if "domain filling" in r.getMessage()]
    # First warning once the span reached 10 s, then at most one per 50 s.
    assert len(lines) == 1, lines
    assert f"domain={DOM}" in lines[0]
    assert f"fastest_volumes={uuid.UUID(int=2)}:" in lines[0]
    clock.now = 70.0
    fc.extended(DOM, uuid.UUID(int=2), 0, MiB)
    lines = [r.getMessage() for r in caplog.records if "domain filling" in r.getMessage()]
    assert len(lines) == 2 and "similar messages suppressed" in lines[1]


def test_metrics_and_snapshot() -> None:
    clock = _Clock()
    registry = doms.DomainRegistry(lambda u: None, [DOM], ttl=60)  # type: ignore[arg-type,return-value]
    fc = Forecast(registry, Settings(window=100, min_span=10), clock)
    from prometheus_client import CollectorRegistry

    reg = CollectorRegistry()
    fc.register(reg)
    fc.sample(DOM, 100 * MiB)
    text = generate_latest(reg).decode()
    assert f'xtnd_domain_seconds_to_full{{domain="{DOM}"}} +Inf' in text
    clock.now = 20.0
    fc.sample(DOM, 80 * MiB)
    snap = fc.snapshot()[0]
    assert snap["seconds_to_full"] == pytest.approx(80.0)
    assert snap["rate_bytes_per_s"] == pytest.approx(MiB)
    text = generate_latest(reg).decode()
    assert f'xtnd_domain_consumption_bytes_per_second{{domain="{DOM}"}} 1.048576e+06' in text


def test_status_shows_time_to_full() -> None:
    from xtnd.tools.status_cli import render

    spm = {
        "role": "serving", "host_id": 1, "lease_holder": 1, "lease_holder_since": 0.0, "in_flight": 0,
        "domains": [
            {"domain": str(DOM), "free_bytes": 512 * MiB, "rate_bytes_per_s": 2 * MiB, "seconds_to_full": 256.0},
            {"domain": "other", "free_bytes": None, "rate_bytes_per_s": 0.0, "seconds_to_full": None},
        ],
    }  # fmt: skip
    text = render({"spm": spm, "hsm": None, "problems": [], "status": "healthy"}, now=10.0)
    assert f"domain {DOM} free 512M  consumed 2.00 MiB/s  time to full: 4.3m" in text
    assert "domain other free ?  consumed 0.00 MiB/s  time to full: no forecast" in text


@pytest.mark.parametrize(
    ("text", "key"),
    [("full_warning = -1", "full_warning"), ("forecast_window = 10\nforecast_min_span = 20", "forecast_min_span")],
)
def test_config_errors(tmp_path: pathlib.Path, text: str, key: str) -> None:
    from xtnd.spm import config

    path = f"{tmp_path}/spm.conf"
    with open(path, "w") as f:
        f.write(f"[spm]\nhost_id = 1\nmaster_domain = {DOM}\n{text}\n")
    with pytest.raises(config.ConfigError) as e:
        config.load(path)
    assert key in str(e.value)


def test_config_defaults() -> None:
    from xtnd.spm.config import SpmSection

    s = SpmSection()
    assert (s.full_warning, s.forecast_window, s.forecast_min_span) == (3600.0, 900.0, 60.0)


def _two_pass_rate(samples: list[tuple[float, int]]) -> float:
    """The plain least-squares fit, centred first (the reference)."""
    n = len(samples)
    mt = sum(t for t, _ in samples) / n
    mf = sum(f for _, f in samples) / n
    var = sum((t - mt) ** 2 for t, _ in samples)
    cov = sum((t - mt) * (f - mf) for t, f in samples)
    return max(0.0, -cov / var) if n > 1 and var > 0 else 0.0


def test_running_fit_matches_a_full_refit_as_samples_come_and_go() -> None:
    # Days of uptime (large monotonic times), a 10 TiB domain, a window and
    # the sample cap both dropping samples: the running sums must give the
    # fit of exactly the samples kept.
    import random

    from xtnd.spm import forecast

    rng = random.Random(7)
    est = Estimator(window=300, min_span=0)
    t, free = 350_000.123, 10 * 1024**4
    capped = False
    for i in range(3 * forecast.MAX_SAMPLES):
        # Fast samples first (the cap drops them), then slow ones (the window does).
        t += rng.uniform(0.001, 0.1) if i < 2 * forecast.MAX_SAMPLES else rng.uniform(0.5, 1.5)
        capped = capped or len(est._samples) == forecast.MAX_SAMPLES
        if i % 7:
            est.extended(t, f"v{i % 5}", rng.randrange(1, 64) * MiB)
        else:
            free = (est.free or free) - rng.randrange(0, 256) * MiB
            est.sample(t, free)
        if i % 97 == 0:
            kept = list(est._samples)
            assert len(kept) <= forecast.MAX_SAMPLES
            assert est.rate(t) == pytest.approx(_two_pass_rate(kept), rel=1e-6)
    assert capped and len(est._samples) < forecast.MAX_SAMPLES  # both dropped samples


def test_running_fit_forgets_exactly_what_it_dropped() -> None:
    est = Estimator(window=10, min_span=0)
    est.sample(0.0, 1000 * MiB)
    est.sample(1.0, 0)  # a steep drop, then the window moves past it
    for t in range(2, 40):
        est.sample(float(t), 0)
    assert est.rate(40.0) == 0.0


def test_sampling_thread_stops_during_its_interval() -> None:
    """The thread waits an hour between samples; stop() must cut that wait."""
    registry = doms.DomainRegistry(lambda u: None, [DOM], ttl=60)  # type: ignore[arg-type,return-value]
    fc = Forecast(registry, Settings(interval=3600.0))
    fc.start()
    assert fc.alive
    assert fc.stop(timeout=10.0)
    assert not fc.alive
