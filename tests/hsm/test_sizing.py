from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from xtnd.hsm import sizing
from xtnd.hsm.sizing import Action, MiB, SizingConfig

GiB = 1024 * MiB
DEFAULT = SizingConfig()


def test_vdsm_defaults() -> None:
    assert DEFAULT.chunk() == 2560 * MiB
    assert DEFAULT.watermark() == 2048 * MiB
    assert DEFAULT.chunk(replicating=True) == 5120 * MiB
    assert DEFAULT.watermark(replicating=True) == 4096 * MiB


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
    assert sizing.next_size(2560 * MiB, 100 * GiB, DEFAULT, replicating=True) == 7680 * MiB


def test_decide_arm_when_enough_free() -> None:
    d = sizing.decide(100 * GiB, 1 * GiB, 5 * GiB, DEFAULT)
    assert d == sizing.Decision(Action.ARM, threshold=3 * GiB, new_size=7680 * MiB)


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
    new = sizing.next_size(physical, capacity, config, replicating)
    assert limit % MiB == 0 and limit >= capacity * 1.1 - 1
    assert new <= limit
    assert new % MiB == 0
    if physical < limit:
        # Every extend below max size makes progress.
        assert new > physical
    assert 1 <= sizing.threshold(physical, config, replicating) <= max(1, physical)


def test_one_max_size_rule() -> None:
    """The HSM sizes with the rule the SPM validates with (storage.max_size)."""
    from xtnd import storage
    from xtnd.spm.domains import CachedLV

    assert sizing.max_size is storage.max_size
    lv = CachedLV("v", "VOLUME", size=MiB, capacity=10 * GiB + 1, extent_size=MiB)
    assert lv.max_size == sizing.max_size(10 * GiB + 1)
