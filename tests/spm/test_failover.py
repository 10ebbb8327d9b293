"""Two SPM candidates, each with its own sanlock daemon (own mount namespace).

Both run the real daemon on the same pool; the standby waits in acquire.
Assertions come from the daemons' own "serving started/stopped" lines
(CLOCK_MONOTONIC is shared by every process of the machine) plus the
moment the test killed a daemon, and from lvs.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future

import pytest
from xtnd.common import faults
from xtnd.lvm import loop
from xtnd.mailbox.hsm import HSMMailbox
from xtnd.spm.control import ControlClient, ControlError
from xtnd.tools.rig import loops, sanlockd
from xtnd.tools.rig.spmd import EXTENT, IO_TIMEOUT, MiB, Pool, SpmProcess, assert_never_both, intervals

log = logging.getLogger("xtnd.tests.failover")

# sanlock's host_dead_seconds: leases of a host that stopped renewing are
# free for others after this.
HOST_DEAD = 8 * IO_TIMEOUT + 60


def submit_burst(
    pool: Pool, hsm_id: int, volumes: list[uuid.UUID], steps: int
) -> tuple[HSMMailbox, dict[tuple[uuid.UUID, int], Future[int]]]:
    """An HSM sending steps increasing sizes for every volume, all at once."""
    hsm = pool.hsm(host_id=hsm_id, reoffer_timeout=60.0)
    hsm.start()
    futures = {}
    for step in range(1, steps + 1):
        for vol in volumes:
            size = 8 * MiB + step * EXTENT
            futures[(vol, size)] = hsm.submit(pool.uuid, vol, size)
    return hsm, futures


@pytest.fixture
def two_spms(
    pool: Pool, sanlock_hosts: Callable[[int], list[sanlockd.SanlockDaemon]], workdir: str
) -> Iterator[tuple[SpmProcess, SpmProcess]]:
    host1, host2 = sanlock_hosts(2)
    # SPM 1's second extend stops after its lvextend, before its reply: the
    # SIGKILL always finds a request in flight, however fast the others go.
    in_flight = {faults.ENV: "spm.after_lvextend=sleep:120@2"}
    spm1 = SpmProcess(host1, pool.spm_config(1), os.path.join(workdir, "spm1.log"), env=in_flight)
    spm1.wait_serving()
    spm2 = SpmProcess(host2, pool.spm_config(2), os.path.join(workdir, "spm2.log"))
    spm2.wait_log("SPM lease busy, waiting")
    yield spm1, spm2


def test_sigkill_failover(pool: Pool, two_spms: tuple[SpmProcess, SpmProcess]) -> None:
    spm1, spm2 = two_spms
    # The standby refuses volume commands instead of letting them run locally.
    standby = ControlClient(os.path.join(pool.workdir, "spm2.sock"))
    assert standby.call("stats")["lease_held"] is False
    with pytest.raises(ControlError) as e:
        standby.call("volume_list", domain=str(pool.uuid))
    assert e.value.error == "NotSpm"
    volumes = [pool.create_volume(capacity=100 * MiB, size=8 * MiB) for _ in range(6)]
    free = pool.free_extents()
    hsm, futures = submit_burst(pool, 3, volumes, steps=3)
    try:
        # Kill the SPM as soon as it has served something: the rest is in flight.
        spm1.wait_log("extend done result=extended")
        killed = spm1.kill()
        served_by_1 = spm1.log().count("extend done result=")
        log.info("killed spm1 after %d extends", served_by_1)
        takeover = spm2.wait_serving(timeout=60)
        log.info("spm2 serving %.3fs after the kill", takeover - killed)
        for (vol, size), future in futures.items():
            assert future.result(timeout=60) >= size, (vol, size)
    finally:
        hsm.stop()
    assert served_by_1 < len(futures), "nothing was left in flight"
    assert "extend done result=" in spm2.log()
    # No request lost, nothing beyond what was asked.
    for vol in volumes:
        assert pool.lv_size(vol) == 8 * MiB + 3 * EXTENT
    assert pool.free_extents() == free - len(volumes) * 3
    assert_never_both(intervals((spm1, killed), (spm2, None)))
    assert [v["uuid"] for v in standby.call("volume_list", domain=str(pool.uuid))] == sorted(map(str, volumes))
    assert spm2.terminate() == 0
    assert_never_both(intervals((spm1, killed), (spm2, None)))


@pytest.fixture
def failable_two_spms(
    pool: Pool, sanlock_hosts: Callable[[int], list[sanlockd.SanlockDaemon]], workdir: str
) -> Iterator[tuple[SpmProcess, SpmProcess, str]]:
    """SPM 1 reaches the PV through a loop device of its own, which can fail.

    Failing it (sanlockd.fail_storage) makes every read past the first
    sector fail for host 1 only: its sanlock renewals, its mailbox I/O and
    its LVM commands, as when one host loses its SAN paths.
    """
    host1, host2 = sanlock_hosts(2)
    pv_file = os.path.join(workdir, "pv0")
    device = loops.attach_loop(pv_file)
    try:
        spm1 = SpmProcess(host1, pool.spm_config(1, pvs=[device]), os.path.join(workdir, "spm1.log"))
        spm1.wait_serving()
        spm2 = SpmProcess(host2, pool.spm_config(2), os.path.join(workdir, "spm2.log"))
        spm2.wait_log("SPM lease busy, waiting")
        yield spm1, spm2, device
    finally:
        host1.stop()
        host2.stop()
        loops.restore_storage(device)
        for dev in loop.devices():
            if loop.over(dev, device):
                loops.detach(dev.path)
        loops.detach(device)


def lose_storage(spm1: SpmProcess, spm2: SpmProcess, device: str) -> float:
    """Fail host 1's storage; return when its SPM stopped serving."""
    failed = time.monotonic()
    loops.fail_storage(device)
    rc = spm1.wait(timeout=8 * IO_TIMEOUT + 30)
    assert rc == 3, spm1.log()[-2000:]
    [(_, _, started), (what, _, stopped)] = spm1.serving()
    assert what == "stopped"
    assert "reason=lease-lost" in spm1.log()
    log.info("host 1 stopped serving %.3fs after its storage failed", stopped - failed)
    # Before sanlock would have killed it (8 x io_timeout without renewal).
    assert stopped - failed < 8 * IO_TIMEOUT
    return stopped


@pytest.mark.timeout(300)
def test_storage_loss_takeover(pool: Pool, failable_two_spms: tuple[SpmProcess, SpmProcess, str]) -> None:
    """One real trial (default suite, ~80 s: it waits out host_dead_seconds).

    Host 1 loses its storage and stops serving before sanlock would kill
    it; host 2 cannot have the lease before host 1's delta lease expires,
    then takes over and serves every pending request.
    """
    spm1, spm2, device = failable_two_spms
    volumes = [pool.create_volume(capacity=100 * MiB, size=8 * MiB) for _ in range(3)]
    stopped = lose_storage(spm1, spm2, device)
    # Not before host_dead_seconds: the other candidate is still waiting.
    assert spm2.serving() == [] and spm2.proc.poll() is None
    hsm, futures = submit_burst(pool, 3, volumes, steps=2)
    try:
        started = spm2.wait_serving(timeout=HOST_DEAD + 60)
        log.info("host 2 took over %.3fs after host 1 stopped", started - stopped)
        for (_, size), future in futures.items():
            assert future.result(timeout=60) >= size
    finally:
        hsm.stop()
    for vol in volumes:
        assert pool.lv_size(vol) == 8 * MiB + 2 * EXTENT
    assert spm2.terminate() == 0
    assert_never_both(intervals((spm1, None), (spm2, None)))
