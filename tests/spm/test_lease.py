"""The SPM lease against real sanlock daemons.

Single-host tests use the `sanlockd` daemon in the pytest process's own
namespace. Multi-host tests start one daemon per host (`sanlock_hosts`) and
hold leases in LeaseAgent child processes inside each host's namespace.
Every daemon runs with io_timeout=1, so joining takes ~3 s.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import stat
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
from testlib.lease_agent import AgentError, LeaseAgent
from xtnd.spm import lease as spm_lease
from xtnd.storage import sanlockdirect, sanlockutil
from xtnd.tools.rig import loops, sanlockd
from xtnd.tools.rig.wait import wait_for

log = logging.getLogger("xtnd.tests.lease")

IO_TIMEOUT = 1
# sanlock's host_dead_seconds: a dead host's leases are free after this.
HOST_DEAD = 8 * IO_TIMEOUT + 60


class Domain:
    """ids and leases files of a master domain, formatted for sanlock."""

    def __init__(self, workdir: str):
        self.lockspace = str(uuid.uuid4())
        self.ids = os.path.join(workdir, "ids")
        self.leases = os.path.join(workdir, "leases")
        for path, size in ((self.ids, 8 << 20), (self.leases, 2 << 20)):
            with open(path, "wb") as f:
                f.truncate(size)
        sanlockdirect.init_lockspace(self.lockspace, self.ids, io_timeout=IO_TIMEOUT)
        sanlockdirect.init_resource(self.lockspace, spm_lease.SDM_RESOURCE, self.leases, spm_lease.SDM_OFFSET)

    def lease(self, host_id: int = 1, **kw: object) -> spm_lease.SpmLease:
        return spm_lease.SpmLease(self.lockspace, host_id, self.ids, self.leases, io_timeout=IO_TIMEOUT, **kw)  # type: ignore[arg-type]


@pytest.fixture
def domain(workdir: str) -> Domain:
    return Domain(workdir)


@pytest.fixture(scope="module")
def joined_domain(sanlockd: sanlockd.SanlockDaemon) -> Iterator[Domain]:
    """A domain whose lockspace host 1 joins once for the module's
    single-host tests (a join costs ~3 s, a leave ~2 s): each test gets its
    own registration and lease object (``joined``), the lockspace stays."""
    os.makedirs(loops.BASE, exist_ok=True)
    path = loops.workdir("test_lease-joined")
    try:
        domain = Domain(path)
        lease = domain.lease()
        start = time.monotonic()
        lease.join()
        log.info("add_lockspace took %.3fs", time.monotonic() - start)
        try:
            yield domain
        finally:
            lease.leave()
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def joined(joined_domain: Domain) -> Iterator[spm_lease.SpmLease]:
    """A lease of host 1 whose lockspace is joined in the root daemon."""
    lease = joined_domain.lease()
    # Joined already: sanlock answers EEXIST, which join() takes as done.
    lease.join()
    yield lease
    # Release before the lockspace is left (at the module's end): removing
    # a lockspace with a lease still held makes sanlock kill the holder,
    # here the pytest process. Releasing here also leaves the lease free
    # for the next test's registration.
    lease.close()
    assert not lease.held


# Status parsing (no daemon).

STATUS = """\
daemon 0a1b.vm
    our_host_name=0a1b.vm
    monotime=1000
p -1 helper
    ci=0
s other:1:/dev/x:0
    renewal_last_result=1
    renewal_last_success=10
s pool:3:/var/tmp/a\\:b/ids:0
    space_dead=0
    killing_pids=0
    renew_fail=0
    corrupt_result=0
    renewal_last_result=-90
    renewal_last_success=996
r pool:SDM:/var/tmp/leases:1048576:1 p 42
"""


def test_parse_status() -> None:
    status = sanlockutil.parse_status(STATUS, "pool", 3)
    assert status is not None
    assert status.monotime == 1000
    assert status.renewal_last_success == 996
    assert status.renewal_last_result == -90
    assert status.renewal_age == 5
    assert status.trouble() is None
    assert sanlockutil.parse_status(STATUS, "pool", 1) is None
    assert sanlockutil.parse_status(STATUS, "missing", 3) is None


def test_parse_status_trouble() -> None:
    text = STATUS.replace("killing_pids=0", "killing_pids=1")
    status = sanlockutil.parse_status(text, "pool", 3)
    assert status is not None
    assert status.trouble() == "sanlock is killing the lease holders"


def test_parse_status_adding() -> None:
    text = STATUS.replace("s pool:3:/var/tmp/a\\:b/ids:0", "s pool:3:/var/tmp/a\\:b/ids:0 ADD")
    status = sanlockutil.parse_status(text, "pool", 3)
    assert status is not None and status.adding


def test_max_renewal_age_bounds(domain: Domain) -> None:
    with pytest.raises(ValueError):
        domain.lease(max_renewal_age=8 * IO_TIMEOUT)
    with pytest.raises(ValueError):
        domain.lease(max_renewal_age=3 * IO_TIMEOUT)


# One host, the pytest process as client.


def test_acquire_check_release(joined: spm_lease.SpmLease) -> None:
    start = time.monotonic()
    joined.acquire()
    log.info("acquire took %.3fs", time.monotonic() - start)
    assert joined.held
    valid_for = joined.check()
    assert 0 < valid_for <= joined.max_renewal_age
    joined.fence()
    joined.release()
    assert not joined.held
    with pytest.raises(spm_lease.LeaseLost, match="not acquired"):
        joined.fence()
    # Released leases can be taken again by the same registration.
    joined.acquire()
    joined.fence()


def test_join_twice(joined: spm_lease.SpmLease) -> None:
    joined.join()


def test_acquire_without_lockspace(sanlockd: sanlockd.SanlockDaemon, domain: Domain) -> None:
    lease = domain.lease()
    try:
        with pytest.raises(spm_lease.LeaseError) as e:
            lease.acquire()
        assert not isinstance(e.value, spm_lease.LeaseBusy)
    finally:
        lease.close()


class FakeClock:
    def __init__(self) -> None:
        self.now = time.monotonic()

    def __call__(self) -> float:
        return self.now


def failing_sanlock(workdir: str) -> tuple[str, str, str]:
    """A sanlock command that fails while a flag file exists; it appends a
    line to a file per run. Returns (command, flag, runs file)."""
    flag = os.path.join(workdir, "status-fails")
    runs = os.path.join(workdir, "status-runs")
    script = os.path.join(workdir, "sanlock")
    with open(script, "w") as f:
        f.write(
            f'#!/bin/sh\necho run >>"{runs}"\n'
            f'[ -e "{flag}" ] && {{ echo "injected failure" >&2; exit 1; }}\nexec sanlock "$@"\n'
        )
    os.chmod(script, stat.S_IRWXU)
    return script, flag, runs


def test_status_errors_tolerated_within_bound(joined: spm_lease.SpmLease, joined_domain: Domain, workdir: str) -> None:
    clock = FakeClock()
    script, flag, _ = failing_sanlock(workdir)
    lease = joined_domain.lease(joined.host_id, sanlock_cmd=script, clock=clock)
    try:
        lease.acquire()
        valid_for = lease.check()
        open(flag, "w").close()
        # The last confirmation still proves the lease valid for a while.
        clock.now += valid_for - 0.1
        assert lease.fence() == pytest.approx(0.1)
        clock.now += 0.2
        with pytest.raises(spm_lease.LeaseLost, match="injected failure"):
            lease.fence()
        # Loss is sticky, even when sanlock answers again.
        os.unlink(flag)
        with pytest.raises(spm_lease.LeaseLost):
            lease.fence()
        assert not lease.held
    finally:
        lease.close()


def _runs(path: str) -> int:
    try:
        with open(path) as f:
            return len(f.readlines())
    except FileNotFoundError:
        return 0


def test_fence_reuses_fresh_status(joined: spm_lease.SpmLease, joined_domain: Domain, workdir: str) -> None:
    """fence() asks the daemon about the lease every time, but reads the
    renewal status (a subprocess) only when the last one is stale."""
    clock = FakeClock()
    script, flag, runs = failing_sanlock(workdir)
    lease = joined_domain.lease(joined.host_id, status_max_age=1.0, fence_margin=0.5, sanlock_cmd=script, clock=clock)
    try:
        lease.acquire()
        valid_for = lease.check()
        assert valid_for > 1.5
        before = _runs(runs)
        for _ in range(20):
            clock.now += 0.04
            lease.fence()
        assert _runs(runs) == before
        # Stale status: fence reads it again (and here it fails, tolerated
        # within the bound as in check()).
        open(flag, "w").close()
        clock.now += 0.5
        left = lease.fence()
        assert _runs(runs) == before + 1
        assert left == pytest.approx(valid_for - 1.3)
        # Close to the end of the proven window fence reads the status
        # even if it is fresh.
        os.unlink(flag)
        lease.check()
        clock.now = lease.valid_until - 0.4
        before = _runs(runs)
        lease.fence()
        assert _runs(runs) == before + 1
    finally:
        lease.close()


def test_fence_sees_dropped_lease_at_once(joined: spm_lease.SpmLease) -> None:
    """With a fresh status, fence() still notices a lease sanlock dropped."""
    joined.acquire()
    joined.check()
    import sanlock

    with joined._lock:
        assert joined._fd is not None
        sanlock.release(joined.lockspace.encode(), b"SDM", [(joined.leases_path, joined.offset)], slkfd=joined._fd)
    with pytest.raises(spm_lease.LeaseLost, match="no longer lists"):
        joined.fence()


def test_fence_cost(joined: spm_lease.SpmLease) -> None:
    """fence() right after check() costs one inquire, not a confirmation.

    The bound asserted is the path taken, not a time: a fence within
    status_max_age of a check reuses that check's renewal status (its time
    and the proven validity do not move); only a check confirms anew. The
    timings are logged for reading (speed belongs to benches).
    """
    joined.acquire()
    joined.check()
    fences, checks = [], []
    for _ in range(30):
        checked = time.perf_counter()
        joined.check()
        checks.append(time.perf_counter() - checked)
        confirmed = (joined.valid_until, joined._status_at)
        start = time.perf_counter()
        remaining = joined.fence()
        fences.append(time.perf_counter() - start)
        if start - checked < joined.status_max_age:  # else a loaded machine made the status stale
            assert (joined.valid_until, joined._status_at) == confirmed, "fence() confirmed anew"
        assert remaining >= joined.fence_margin
    fences.sort()
    checks.sort()
    log.info(
        "fence p50=%.3fms max=%.3fms; check p50=%.3fms max=%.3fms",
        fences[15] * 1e3,
        fences[-1] * 1e3,
        checks[15] * 1e3,
        checks[-1] * 1e3,
    )


def test_watchdog_stop_wakes_at_once(joined: spm_lease.SpmLease) -> None:
    joined.acquire()
    lost: list[str] = []
    watchdog = spm_lease.LeaseWatchdog(joined, lost.append, interval=3600)
    watchdog.start()
    wait_for(lambda: not watchdog._thread.is_alive() or joined._valid_until > 0, what="first check")
    start = time.monotonic()
    watchdog.stop(timeout=30)
    assert not watchdog._thread.is_alive()
    assert time.monotonic() - start < 5
    assert lost == []


def test_watchdog_reports_loss(joined: spm_lease.SpmLease) -> None:
    joined.acquire()
    lost: list[str] = []
    watchdog = spm_lease.LeaseWatchdog(joined, lost.append, interval=0.05)
    watchdog.start()
    try:
        # Losing it behind the SPM's back: the daemon forgets the lease.
        import sanlock

        # Under the lease's lock: requests must not interleave on the
        # registered connection (the watchdog uses it too).
        with joined._lock:
            assert joined._fd is not None
            sanlock.release(joined.lockspace.encode(), b"SDM", [(joined.leases_path, joined.offset)], slkfd=joined._fd)
        wait_for(lambda: lost, timeout=30, what="watchdog to report the loss")
        # sanlock answers an empty list or EPERM (no resources) here.
        assert len(lost) == 1
        with pytest.raises(spm_lease.LeaseLost):
            joined.fence()
    finally:
        watchdog.stop(timeout=30)


# Several hosts: one daemon per host, leases held by agent processes.


@pytest.fixture
def two_hosts(
    sanlock_hosts: Callable[[int], list[sanlockd.SanlockDaemon]], domain: Domain
) -> Iterator[tuple[LeaseAgent, LeaseAgent]]:
    host1, host2 = sanlock_hosts(2)
    agents = (
        LeaseAgent(host1, domain.lockspace, 1, domain.ids, domain.leases),
        LeaseAgent(host2, domain.lockspace, 2, domain.ids, domain.leases),
    )
    yield agents


def join_all(*agents: LeaseAgent) -> None:
    # Joins one by one: on 2 cores, parallel joins only make both slower.
    for agent in agents:
        agent.call("join")


def acquire_when_free(agent: LeaseAgent, timeout: float) -> float:
    """Retry acquire until it succeeds; return the time it did."""

    def attempt() -> float | None:
        try:
            return float(agent.call("acquire")["t"])
        except AgentError as e:
            if e.error != "LeaseBusy":
                raise
            return None

    return wait_for(attempt, timeout=timeout, interval=0.1, what=f"host {agent.host_id} to acquire")


def test_busy_until_released(two_hosts: tuple[LeaseAgent, LeaseAgent]) -> None:
    """Busy for the other host until released; then SIGKILL of the holder
    (the SPM process; its daemon lives on and frees the lease): the other
    host takes over. (The kill was a test of its own, which started and
    joined the same two hosts, ~6 s, again.)"""
    agent1, agent2 = two_hosts
    join_all(agent1, agent2)
    agent1.call("acquire")
    with pytest.raises(AgentError) as e:
        agent2.call("acquire")
    assert e.value.error == "LeaseBusy"
    assert [o["host_id"] for o in e.value.owners] == [1]
    agent1.call("release")
    agent2.call("acquire")
    agent2.call("check")
    with pytest.raises(AgentError) as e:
        agent1.call("acquire")
    assert e.value.error == "LeaseBusy"
    # The holder killed: the other takes over.
    killed = agent2.kill()
    acquired = acquire_when_free(agent1, timeout=60)
    log.info("takeover after holder SIGKILL took %.3fs", acquired - killed)
    assert acquired > killed
    agent1.call("check")


@pytest.fixture
def failable_hosts(
    sanlock_hosts: Callable[[int], list[sanlockd.SanlockDaemon]], domain: Domain
) -> Iterator[tuple[LeaseAgent, LeaseAgent, list[str]]]:
    """Host 1 reaches the domain through loop devices that can fail."""
    host1, host2 = sanlock_hosts(2)
    devices = [loops.attach_loop(domain.ids), loops.attach_loop(domain.leases)]
    try:
        agent1 = LeaseAgent(host1, domain.lockspace, 1, devices[0], devices[1], interval=0.2)
        agent2 = LeaseAgent(host2, domain.lockspace, 2, domain.ids, domain.leases)
        yield agent1, agent2, devices
    finally:
        # Kill the hosts before detaching the devices they hold open.
        host1.stop()
        host2.stop()
        for device in devices:
            loops.restore_storage(device)
            loops.detach(device)


def test_storage_loss_detected_before_sanlock_kills(
    failable_hosts: tuple[LeaseAgent, LeaseAgent, list[str]],
) -> None:
    fence_on_storage_loss(*failable_hosts)


def fence_on_storage_loss(agent1: LeaseAgent, agent2: LeaseAgent, devices: list[str]) -> float:
    """The holder's storage fails: it fences itself before sanlock gives up.

    sanlock kills the holder 8 x io_timeout after the last good renewal;
    other hosts may take over only after 8 x io_timeout + 60 s. The
    watchdog must report the loss first, and fence() must then refuse.
    """
    join_all(agent1, agent2)
    agent1.call("acquire")
    agent1.call("watch")
    failed = time.monotonic()
    loops.fail_storage(*devices)
    lost = agent1.event("lost", timeout=60)
    with pytest.raises(AgentError) as e:
        agent1.call("check")
    assert e.value.error == "LeaseLost"
    killed = agent1.event("sigterm", timeout=60)
    log.info(
        "storage loss: watchdog reported after %.3fs (%s), sanlock SIGTERM after %.3fs",
        lost["t"] - failed,
        lost["reason"],
        killed["t"] - failed,
    )
    assert failed < lost["t"] < killed["t"]
    assert lost["t"] - failed < 8 * IO_TIMEOUT
    return lost["t"]


def test_stalled_sanlock_is_a_loss(
    sanlock_hosts: Callable[[int], list[sanlockd.SanlockDaemon]], domain: Domain
) -> None:
    """The sanlock daemon stops answering (SIGSTOP): the binding would wait
    forever, so the watchdog's stall guard reports the loss, and the lease
    stays lost after the daemon answers again."""
    (host,) = sanlock_hosts(1)
    agent = LeaseAgent(host, domain.lockspace, 1, domain.ids, domain.leases, stall_timeout=1.5)
    agent.call("join")
    agent.call("acquire")
    agent.call("watch")
    stopped = time.monotonic()
    os.kill(host.pid, signal.SIGSTOP)
    try:
        lost = agent.event("lost", timeout=30)
    finally:
        os.kill(host.pid, signal.SIGCONT)
    log.info("sanlock stopped: loss reported after %.3fs (%s)", lost["t"] - stopped, lost["reason"])
    assert "stalled" in lost["reason"]
    assert lost["t"] - stopped < 8 * IO_TIMEOUT
    with pytest.raises(AgentError) as e:
        agent.call("check")
    assert e.value.error == "LeaseLost"
    assert "stalled" in e.value.reason


@pytest.mark.soak
def test_storage_loss_takeover_after_fence(
    failable_hosts: tuple[LeaseAgent, LeaseAgent, list[str]],
) -> None:
    """The other host gets the lease only long after the holder fenced itself.

    sanlock's acquire waits for the failing owner's delta lease to expire
    (8 x io_timeout + 60 s after its last renewal), so this takes ~70 s.
    """
    agent1, agent2, devices = failable_hosts
    lost = fence_on_storage_loss(agent1, agent2, devices)
    acquired = float(agent2.call("acquire", timeout=2 * HOST_DEAD)["t"])
    log.info("storage loss: host 2 acquired %.3fs after host 1 fenced itself", acquired - lost)
    assert acquired - lost > 60


@pytest.mark.soak
def test_host_killed_other_takes_over(two_hosts: tuple[LeaseAgent, LeaseAgent]) -> None:
    """The whole host dies (daemon and SPM): the lease expires, ~70 s."""
    agent1, agent2 = two_hosts
    join_all(agent1, agent2)
    agent1.call("acquire")
    killed = time.monotonic()
    agent1.host.kill()
    agent1.kill()
    acquired = float(agent2.call("acquire", timeout=2 * HOST_DEAD)["t"])
    log.info("takeover after host death took %.3fs", acquired - killed)
    assert acquired - killed > 8 * IO_TIMEOUT
