"""A small domain filled by a steady writer through a real ``xtnd spm``.

Real sanlock, real LVM on a loop PV, real mailbox extend requests (the HSM
mailbox API). The forecast read early from ``xtnd status``'s control op
must be within 20% of the moment extends start failing, and the full
warning must be logged and rate-limited.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future

import pytest
from xtnd import lvm
from xtnd.spm.control import ControlClient
from xtnd.tools.rig import sanlockd
from xtnd.tools.rig.spmd import MiB, Pool, SpmProcess

EXTENT = 4 * MiB
FREE_EXTENTS = 40  # 160 MiB left for the writer
TICK = 0.5  # each tick: one extent more for each volume -> 16 MiB/s
WARNING_INTERVAL = 4.0


@pytest.fixture
def vols(pool: Pool) -> list[uuid.UUID]:
    """Two volumes and a filler leaving FREE_EXTENTS, made before the SPM
    starts (space taken while it runs counts as consumption)."""
    made = [pool.create_volume(capacity=2000 * MiB, size=8 * MiB) for _ in range(2)]
    lvm.lvcreate(pool.domain.runner, pool.domain.vg, "filler", (pool.free_extents() - FREE_EXTENTS) * EXTENT)
    return made


@pytest.fixture
def spm(
    pool: Pool, vols: list[uuid.UUID], sanlock_hosts: Callable[[int], list[sanlockd.SanlockDaemon]], workdir: str
) -> Iterator[SpmProcess]:
    [host] = sanlock_hosts(1)
    config = pool.spm_config(
        1,
        **{
            "spm.forecast_interval": "1",
            "spm.forecast_window": "4",
            "spm.forecast_min_span": "3",
            "spm.full_warning_interval": str(WARNING_INTERVAL),
        },
    )
    proc = SpmProcess(host, config, os.path.join(workdir, "spm1.log"))
    proc.wait_serving()
    yield proc
    if proc.proc.poll() is None:
        proc.kill()


def _forecast(sock: str, domain: uuid.UUID) -> float | None:
    status = ControlClient(sock).call("status")
    for d in status["domains"]:
        if d["domain"] == str(domain):
            value = d["seconds_to_full"]
            return None if value is None else float(value)
    return None


def test_forecast_of_a_steady_fill(pool: Pool, vols: list[uuid.UUID], spm: SpmProcess) -> None:
    sock = os.path.join(pool.workdir, "spm1.sock")
    # Before any consumption there is no forecast.
    assert _forecast(sock, pool.uuid) is None
    hsm = pool.hsm(host_id=2)
    hsm.start()
    sent: list[tuple[float, Future[int]]] = []
    forecast_at = predicted_end = None
    first_failure = None
    try:
        start = time.monotonic()
        size = 8 * MiB
        for tick in range(1, 4 * FREE_EXTENTS):
            time.sleep(max(0.0, start + tick * TICK - time.monotonic()))
            size += EXTENT
            now = time.monotonic()
            sent += [(now, hsm.submit(pool.uuid, v, size)) for v in vols]
            if predicted_end is None:
                left = _forecast(sock, pool.uuid)
                if left is not None:
                    forecast_at = time.monotonic()
                    predicted_end = forecast_at + left
            failed = [t for t, f in sent if f.done() and f.exception() is not None]
            if failed:
                first_failure = min(failed)
                break
        else:
            pytest.fail("the domain never filled")
    finally:
        hsm.stop()
    assert forecast_at is not None and predicted_end is not None
    assert first_failure is not None
    actual = first_failure - forecast_at
    forecast = predicted_end - forecast_at
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    print(
        f"forecast made {forecast_at - start:.1f}s after the writer started: full in {forecast:.1f}s; "
        f"extends started failing {actual:.1f}s after it (error {100 * (forecast - actual) / actual:+.1f}%) "
        f"load={' '.join(load)}"
    )
    assert abs(forecast - actual) <= 0.2 * actual
    assert pool.free_extents() == 0
    # The warning names the domain and the fastest volumes, at most once per interval.
    spm.wait_log(r"domain filling domain=" + str(pool.uuid))
    log = spm.log()
    lines = re.findall(r"domain filling domain=\S+ .*", log)
    assert all(any(str(v) in line for v in vols) for line in lines)
    assert len(lines) <= (time.monotonic() - start) / WARNING_INTERVAL + 1
    assert "similar messages suppressed" in log
