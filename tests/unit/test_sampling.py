"""Server-free device selection: deterministic, exact at the extremes, fair in between."""

from __future__ import annotations

import hashlib
import math

import pytest

from fedmq.sampling import selected, uniform


def test_same_inputs_same_answer() -> None:
    for i in range(200):
        device = f"dev-{i}"
        assert uniform(9, 3, device) == uniform(9, 3, device)
        assert selected(9, 3, device, 0.5) == selected(9, 3, device, 0.5)


def test_seed_round_and_device_all_change_the_draw() -> None:
    base = uniform(1, 1, "a")
    assert uniform(2, 1, "a") != base
    assert uniform(1, 2, "a") != base
    assert uniform(1, 1, "b") != base


def test_rate_extremes() -> None:
    for i in range(2000):
        assert selected(5, 11, f"d{i}", 1.0) is True
        assert selected(5, 11, f"d{i}", 0.0) is False


@pytest.mark.parametrize("rate", [0.01, 0.1, 0.3, 0.5, 0.9, 0.99])
def test_empirical_fraction_matches_rate(rate: float) -> None:
    n = 10_000
    hits = sum(selected(2024, 17, f"sensor-{i:05d}", rate) for i in range(n))
    # Binomial std dev is at most 0.005 at n=10,000; 0.02 is four of them at the worst rate.
    assert abs(hits / n - rate) < 0.02


def test_selection_is_monotone_in_rate() -> None:
    # A device picked at some rate stays picked at any higher rate: raising the rate only adds.
    for i in range(1000):
        u = uniform(3, 4, f"x{i}")
        assert 0.0 <= u < 1.0
        assert selected(3, 4, f"x{i}", min(1.0, u + 1e-9))
        assert not selected(3, 4, f"x{i}", u)


@pytest.mark.parametrize("rate", [-0.01, 1.01, math.nan, math.inf, -math.inf])
def test_rate_outside_unit_interval_is_refused(rate: float) -> None:
    with pytest.raises(ValueError, match="sample rate"):
        selected(1, 1, "d", rate)


def test_golden_value() -> None:
    # Pinned so a change to the recipe (which devices in other languages implement) shows here.
    key = b"42:7:sensor-001"
    assert hashlib.sha256(key).hexdigest()[:16] == "756807daa308b2c9"
    expected = (0x756807DAA308B2C9 >> 11) / 2**53
    assert uniform(42, 7, "sensor-001") == expected == 0.45861863220037224
    assert selected(42, 7, "sensor-001", 0.4587)
    assert not selected(42, 7, "sensor-001", 0.4586)


def test_golden_value_negative_seed_and_unicode_device() -> None:
    # Decimal with a leading '-', device id as UTF-8 and allowed to contain ':'.
    assert uniform(-1, 0, "dev:ü") == 0.05733577671552803


def test_redraws_only_add_devices() -> None:
    from fedmq.sampling import uniform

    devices = [f"d{i}" for i in range(2000)]
    for draws in range(4):
        now = {d for d in devices if selected(7, 3, d, 0.1, draws)}
        later = {d for d in devices if selected(7, 3, d, 0.1, draws + 1)}
        assert now <= later
        assert len(later) > len(now)
    # draw 0 is the original recipe; draw j >= 1 appends ":j" to the key
    import hashlib

    digest = hashlib.sha256(b"7:3:d5:2").digest()
    assert uniform(7, 3, "d5", 2) == (int.from_bytes(digest[:8], "big") >> 11) / 2**53
