from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from xtnd.hsm import sizing
from xtnd.hsm.sizing import Action, Load, MiB, SizingConfig

GiB = 1024 * MiB
DEFAULT = SizingConfig()


def test_vdsm_defaults() -> None:
    assert DEFAULT.chunk() == 2560 * MiB
    assert DEFAULT.watermark() == 2048 * MiB
    assert DEFAULT.chunk(Load(replicating=True)) == 5120 * MiB
    assert DEFAULT.watermark(Load(replicating=True)) == 4096 * MiB


@pytest.mark.parametrize(
    "physical,expected",
    [
        (2560 * MiB, 512 * MiB),
        (5 * GiB, 3 * GiB),
        # Smaller than the watermark: any write triggers, never 0 or negative.
        (2048 * MiB, 1),
        (1 * GiB, 1),
    ],
)
def test_threshold(physical: int, expected: int) -> None:
    assert sizing.threshold(physical, DEFAULT) == expected


def test_max_size_adds_ten_percent_rounded_to_mib() -> None:
    assert sizing.max_size(10 * GiB) == 11 * GiB
    assert sizing.max_size(1 * GiB) == 1127 * MiB  # 1126.4 MiB rounded up
    assert sizing.max_size(1) == MiB
    # Exact in integers where float arithmetic would be off.
    huge = 2**60 + 1
    assert sizing.max_size(huge) == sizing.round_up(-(-huge * 11 // 10), MiB)


def test_next_size() -> None:
    assert sizing.next_size(2560 * MiB, 100 * GiB, DEFAULT) == 5120 * MiB
    # Unaligned physical sizes are rounded up to a MiB.
    assert sizing.next_size(2560 * MiB + 1, 100 * GiB, DEFAULT) == 5121 * MiB
    # Capped at max size.
    assert sizing.next_size(10 * GiB, 10 * GiB, DEFAULT) == 11 * GiB
    assert sizing.next_size(2560 * MiB, 100 * GiB, DEFAULT, sizing.REPLICATING) == 7680 * MiB


def test_decide_arm_when_enough_free() -> None:
    d = sizing.decide(100 * GiB, 1 * GiB, 5 * GiB, DEFAULT)
    assert d == sizing.Decision(Action.ARM, threshold=3 * GiB, new_size=7680 * MiB, chunk=2560 * MiB)


def test_decide_extend_below_watermark() -> None:
    d = sizing.decide(100 * GiB, 3 * GiB + 1, 5 * GiB, DEFAULT)
    assert d.action is Action.EXTEND
    assert d.new_size == 7680 * MiB
    # Exactly at the threshold is not yet below the watermark.
    assert sizing.decide(100 * GiB, 3 * GiB, 5 * GiB, DEFAULT).action is Action.ARM


def test_decide_at_max() -> None:
    assert sizing.decide(10 * GiB, 10 * GiB, 11 * GiB, DEFAULT).action is Action.AT_MAX


def test_decide_improbable_allocation() -> None:
    # A healthy image cannot have written beyond the size we would grow to.
    d = sizing.decide(100 * GiB, 7680 * MiB + 1, 5 * GiB, DEFAULT)
    assert d.action is Action.IMPROBABLE
    assert sizing.decide(100 * GiB, 7680 * MiB, 5 * GiB, DEFAULT).action is Action.EXTEND


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        SizingConfig(chunk_mb=0)
    with pytest.raises(ValueError):
        SizingConfig(utilization_percent=101)
    assert SizingConfig(utilization_percent=100).watermark() == 0


@given(
    capacity=st.integers(1, 2**50),
    physical=st.integers(1, 2**50),
    chunk_mb=st.integers(1, 10000),
    utilization=st.integers(0, 100),
    replicating=st.booleans(),
)
def test_sizes_are_consistent(capacity: int, physical: int, chunk_mb: int, utilization: int, replicating: bool) -> None:
    config = SizingConfig(chunk_mb=chunk_mb, utilization_percent=utilization)
    limit = sizing.max_size(capacity)
    new = sizing.next_size(physical, capacity, config, Load(replicating))
    assert limit % MiB == 0 and limit >= capacity * 1.1 - 1
    assert new <= limit
    assert new % MiB == 0
    if physical < limit:
        # Every extend below max size makes progress.
        assert new > physical
    assert 1 <= sizing.threshold(physical, config, Load(replicating)) <= max(1, physical)


def test_one_max_size_rule() -> None:
    """The HSM sizes with the rule the SPM validates with (storage.max_size)."""
    from xtnd import storage
    from xtnd.spm.domains import CachedLV

    assert sizing.max_size is storage.max_size
    lv = CachedLV("v", "VOLUME", size=MiB, capacity=10 * GiB + 1, extent_size=MiB)
    assert lv.max_size == sizing.max_size(10 * GiB + 1)


# Adaptive sizing

ADAPTIVE = SizingConfig(chunk_mb=2, utilization_percent=20, policy="adaptive", max_chunk_mb=64)
FIXED = SizingConfig(chunk_mb=2, utilization_percent=20, policy="fixed", max_chunk_mb=64)


def test_adaptive_is_the_default() -> None:
    assert SizingConfig().policy == "adaptive"


def test_fixed_ignores_the_rate() -> None:
    assert FIXED.chunk(Load(rate=100 * MiB, latency=1.0)) == 2 * MiB
    assert FIXED.watermark(Load(rate=100 * MiB, latency=1.0)) == 2 * MiB * 80 // 100


def test_adaptive_floor_without_a_rate_or_a_latency() -> None:
    assert ADAPTIVE.chunk() == 2 * MiB
    assert ADAPTIVE.chunk(Load(rate=10 * MiB)) == 2 * MiB
    assert ADAPTIVE.chunk(Load(latency=1.0)) == 2 * MiB
    # A slow guest: rate x latency x safety below the floor's headroom.
    assert ADAPTIVE.chunk(Load(rate=0.5 * MiB, latency=0.5)) == 2 * MiB


def test_adaptive_grows_with_the_rate() -> None:
    # 10 MiB/s x 0.5 s x 2 = 10 MiB kept free: the watermark (80% of the
    # chunk) must cover it, so the chunk is 12.5 MiB, rounded up to 13.
    assert ADAPTIVE.chunk(Load(rate=10 * MiB, latency=0.5)) == 13 * MiB
    assert ADAPTIVE.watermark(Load(rate=10 * MiB, latency=0.5)) >= 10 * MiB
    assert ADAPTIVE.chunk(Load(rate=20 * MiB, latency=0.5)) > ADAPTIVE.chunk(Load(rate=10 * MiB, latency=0.5))


def test_adaptive_cap_and_replication() -> None:
    assert ADAPTIVE.chunk(Load(rate=1000 * MiB, latency=1.0)) == 64 * MiB
    assert ADAPTIVE.chunk(Load(rate=1000 * MiB, latency=1.0, replicating=True)) == 128 * MiB
    assert ADAPTIVE.chunk(Load(rate=10 * MiB, latency=0.5, replicating=True)) == 26 * MiB
    # A cap below the floor leaves the floor.
    low = SizingConfig(chunk_mb=8, policy="adaptive", max_chunk_mb=4)
    assert low.chunk(Load(rate=1000 * MiB, latency=1.0)) == 8 * MiB


def test_adaptive_with_no_headroom_still_grows_the_chunk() -> None:
    config = SizingConfig(chunk_mb=2, utilization_percent=100, policy="adaptive", max_chunk_mb=64)
    assert config.chunk(Load(rate=10 * MiB, latency=0.5)) == 10 * MiB
    assert config.watermark(Load(rate=10 * MiB, latency=0.5)) == 0


def test_adaptive_decide_extends_earlier_for_a_fast_writer() -> None:
    capacity, physical = 1 * GiB, 16 * MiB
    allocation = physical - 4 * MiB  # 4 MiB free: above the floor's 1.6 MiB watermark
    slow = sizing.decide(capacity, allocation, physical, ADAPTIVE, Load(rate=0.1 * MiB, latency=0.5))
    assert slow.action is Action.ARM and slow.chunk == 2 * MiB
    fast = sizing.decide(capacity, allocation, physical, ADAPTIVE, Load(rate=10 * MiB, latency=0.5))
    assert fast.action is Action.EXTEND
    assert fast.chunk == 13 * MiB and fast.new_size == physical + 13 * MiB
    assert fast.threshold == physical - fast.chunk * 80 // 100


def test_adaptive_next_size_stops_at_max_size() -> None:
    capacity = 100 * MiB
    limit = sizing.max_size(capacity)
    assert sizing.next_size(limit - MiB, capacity, ADAPTIVE, Load(rate=1000 * MiB, latency=1.0)) == limit


def test_write_rate_takes_a_burst_at_once_and_decays_slowly() -> None:
    rate = sizing.write_rate(0.0, 0.0, 0, 1.0, 10 * MiB)
    assert rate == 10 * MiB
    # Idle for one decay time: down to 1/e of the burst, not to 0.
    idle = sizing.write_rate(rate, 1.0, 10 * MiB, 31.0, 10 * MiB, decay=30.0)
    assert idle == pytest.approx(10 * MiB / 2.718281828, rel=1e-6)
    # Much later it is gone.
    gone = sizing.write_rate(idle, 31.0, 10 * MiB, 331.0, 10 * MiB, decay=30.0)
    assert gone < 0.001 * MiB


def test_write_rate_ignores_shrinking_allocation_and_no_time() -> None:
    assert sizing.write_rate(5.0, 1.0, 100, 1.0, 200) == 5.0
    assert sizing.write_rate(0.0, 1.0, 100 * MiB, 2.0, 0) == 0.0


@given(
    chunk_mb=st.integers(1, 4096),
    max_chunk_mb=st.integers(1, 20000),
    utilization=st.integers(0, 100),
    rate=st.floats(0, 1e10),
    latency=st.floats(0, 600),
    replicating=st.booleans(),
)
def test_adaptive_chunk_bounds(
    chunk_mb: int, max_chunk_mb: int, utilization: int, rate: float, latency: float, replicating: bool
) -> None:
    config = SizingConfig(chunk_mb=chunk_mb, utilization_percent=utilization, max_chunk_mb=max_chunk_mb)
    factor = 2 if replicating else 1
    chunk = config.chunk(Load(replicating, rate, latency))
    assert chunk % MiB == 0
    assert chunk_mb * MiB * factor <= chunk <= max(chunk_mb, max_chunk_mb) * MiB * factor
    need = rate * latency * config.safety_factor
    if utilization < 100 and chunk < max_chunk_mb * MiB * factor:
        # Below the cap, the headroom covers what the guest writes meanwhile.
        assert config.watermark(Load(replicating, rate, latency)) >= min(need, chunk) - MiB


def test_config_rejects_bad_policy_options() -> None:
    with pytest.raises(ValueError, match="policy"):
        SizingConfig(policy="fast")
    with pytest.raises(ValueError, match="max_chunk_mb"):
        SizingConfig(max_chunk_mb=0)
    with pytest.raises(ValueError, match="safety_factor"):
        SizingConfig(safety_factor=0.5)


def test_adaptive_burst_widens_the_headroom() -> None:
    # The guest was already 1 MiB past the threshold when its event came:
    # (1 MiB/s x 0.2 s + 1 MiB) x 2 = 2.4 MiB kept free, chunk 3 MiB.
    assert ADAPTIVE.chunk(Load(rate=1 * MiB, latency=0.2, burst=1 * MiB)) == 3 * MiB
    assert FIXED.chunk(Load(rate=1 * MiB, latency=0.2, burst=1 * MiB)) == 2 * MiB


def test_adaptive_rate_does_not_widen_the_improbable_bound() -> None:
    physical = 16 * MiB
    d = sizing.decide(1 * GiB, 40 * MiB, physical, ADAPTIVE, Load(rate=100 * MiB, latency=1.0, burst=24 * MiB))
    assert d.action is Action.IMPROBABLE
