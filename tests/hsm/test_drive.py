from __future__ import annotations

import pytest
from xtnd.hsm.drive import DisabledReason, Drive, IllegalTransition, State
from xtnd.hsm.sizing import Action, MiB, SizingConfig

GiB = 1024 * MiB


def make_drive() -> Drive:
    d = Drive(vm_id="vm1", name="vda", index=1, path="/dev/vg/lv", domain_id="sd", volume_id="vol")
    d.update(capacity=100 * GiB, allocation=1 * GiB, physical=5 * GiB)
    return d


def test_full_cycle() -> None:
    d = make_drive()
    assert d.target == "vda[1]"
    decision = d.decide(SizingConfig())
    assert decision.action is Action.ARM
    d.arm(decision.threshold)
    assert (d.state, d.threshold) == (State.ARMED, 3 * GiB)

    assert d.exceeded() is True
    assert (d.state, d.threshold) == (State.EXCEEDED, None)
    d.begin_extend(7680 * MiB)
    assert (d.state, d.requested_size) == (State.EXTENDING, 7680 * MiB)
    # A late threshold event or an ENOSPC pause during the extend.
    assert d.exceeded() is False
    assert d.state is State.EXTENDING

    d.extend_done(7680 * MiB)
    assert (d.state, d.physical, d.requested_size) == (State.UNSET, 7680 * MiB, None)
    d.arm(d.decide(SizingConfig()).threshold)
    assert d.state is State.ARMED


def test_extend_failed_keeps_the_shortage() -> None:
    d = make_drive()
    d.exceeded()
    d.begin_extend(7680 * MiB)
    d.extend_failed()
    assert (d.state, d.requested_size) == (State.EXCEEDED, None)
    assert d.exceeded() is False
    d.begin_extend(7680 * MiB)
    assert d.state is State.EXTENDING


def test_disable_and_enable() -> None:
    d = make_drive()
    d.arm(3 * GiB)
    d.disable(DisabledReason.AT_MAX_SIZE)
    assert (d.state, d.threshold, d.monitored) == (State.DISABLED, None, False)
    assert d.disabled_reason is DisabledReason.AT_MAX_SIZE
    d.enable()
    assert (d.state, d.disabled_reason, d.monitored) == (State.UNSET, None, True)


@pytest.mark.parametrize(
    "setup,action",
    [
        ([], lambda d: d.begin_extend(6 * GiB)),
        ([], lambda d: d.extend_done(6 * GiB)),
        ([], lambda d: d.extend_failed()),
        ([], lambda d: d.enable()),
        (["exceeded"], lambda d: d.arm(1)),
        (["exceeded"], lambda d: d.reset()),
        (["exceeded", "extend"], lambda d: d.arm(1)),
        (["exceeded", "extend"], lambda d: d.disable(DisabledReason.AT_MAX_SIZE)),
        (["exceeded", "extend"], lambda d: d.begin_extend(7 * GiB)),
        (["disable"], lambda d: d.exceeded()),
        (["disable"], lambda d: d.arm(1)),
        (["disable"], lambda d: d.disable(DisabledReason.IMPROBABLE_ALLOCATION)),
    ],
)
def test_illegal_transitions(setup: list[str], action: object) -> None:
    d = make_drive()
    steps = {
        "exceeded": d.exceeded,
        "extend": lambda: d.begin_extend(6 * GiB),
        "disable": lambda: d.disable(DisabledReason.IMPROBABLE_ALLOCATION),
    }
    for step in setup:
        steps[step]()
    before = d.state
    with pytest.raises(IllegalTransition) as e:
        action(d)  # type: ignore[operator]
    assert e.value.state is before
    assert d.state is before
    assert "vm1/vda" in str(e.value)


def test_extend_must_grow() -> None:
    d = make_drive()
    d.exceeded()
    with pytest.raises(ValueError):
        d.begin_extend(5 * GiB)
    assert d.state is State.EXCEEDED


def test_drive_write_rate_from_allocation_samples() -> None:
    from xtnd.hsm.sizing import RATE_MIN_INTERVAL

    d = Drive("vm", "vda", 1, "/p", "dom", "vol")
    d.update(GiB, 0, 16 * MiB, now=10.0)
    assert d.write_rate == 0.0
    # Too close to rate: a burst over milliseconds is no rate.
    d.update(GiB, 4 * MiB, 16 * MiB, now=10.0 + RATE_MIN_INTERVAL / 2)
    assert d.write_rate == 0.0
    d.update(GiB, 8 * MiB, 16 * MiB, now=12.0)
    assert d.write_rate == 4 * MiB
    # Without a time (e.g. after an extend) the estimate stays.
    d.update(GiB, 8 * MiB, 32 * MiB)
    assert d.write_rate == 4 * MiB
    # The guest stops: the estimate decays but does not drop to 0 at once.
    d.update(GiB, 8 * MiB, 32 * MiB, now=14.0)
    assert 0 < d.write_rate < 4 * MiB


def test_drive_decide_uses_its_rate() -> None:
    config = SizingConfig(chunk_mb=2, policy="adaptive", max_chunk_mb=64)
    d = Drive("vm", "vda", 1, "/p", "dom", "vol")
    d.update(GiB, 0, 16 * MiB, now=0.0)
    d.update(GiB, 10 * MiB, 16 * MiB, now=1.0)
    assert d.decide(config).chunk == 2 * MiB  # no latency known yet
    assert d.decide(config, latency=0.5).chunk == 13 * MiB


def test_drive_burst_halves_per_event() -> None:
    d = Drive("vm", "vda", 1, "/p", "dom", "vol")
    d.saw_excess(4 * MiB)
    d.saw_excess(1 * MiB)
    assert d.burst == 2 * MiB
    d.saw_excess(0)
    assert d.burst == 1 * MiB


def test_drive_outran_grows_the_burst_to_the_chunk() -> None:
    config = SizingConfig(chunk_mb=1, policy="adaptive", max_chunk_mb=64)
    d = Drive("vm", "vda", 1, "/p", "dom", "vol")
    d.update(GiB, 0, 16 * MiB)
    before = d.decide(config, latency=0.3).chunk
    d.outran(4 * MiB)
    assert d.burst == 4 * MiB
    assert d.decide(config, latency=0.3).chunk >= 2 * 4 * MiB > before
