"""Reconnect back-off: full jitter in [0, min(cap, base * 2**attempt)] (fedmq/backoff.py)."""

from __future__ import annotations

import math
import random

import pytest

from fedmq.backoff import Backoff


class TopOfWindow(random.Random):
    """A ``Random`` whose ``uniform`` returns the upper bound: exposes the window itself."""

    def __init__(self) -> None:
        super().__init__(0)
        self.calls: list[tuple[float, float]] = []

    def uniform(self, a: float, b: float) -> float:
        self.calls.append((a, b))
        return b


def windows(backoff: Backoff, n: int) -> list[float]:
    return [backoff.next_delay() for _ in range(n)]


def test_window_doubles_then_caps() -> None:
    rng = TopOfWindow()
    b = Backoff(0.5, 10.0, rng)
    assert windows(b, 8) == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]
    assert all(lo == 0.0 for lo, _ in rng.calls)  # full jitter: always down to zero
    assert b.attempt == 8


def test_base_equal_to_cap_is_a_constant_window() -> None:
    b = Backoff(3.0, 3.0, TopOfWindow())
    assert windows(b, 4) == [3.0, 3.0, 3.0, 3.0]


def test_delays_stay_within_the_window() -> None:
    base, cap = 0.25, 5.0
    b = Backoff(base, cap, random.Random(1234))
    delays = windows(b, 200)
    for n, d in enumerate(delays):
        assert 0.0 <= d <= min(cap, base * 2**n), (n, d)
    # Jittered, not constant: the delays past the cap are spread over the window.
    capped = delays[10:]
    assert len(set(capped)) == len(capped)
    assert min(capped) < cap / 4
    assert max(capped) > 3 * cap / 4


def test_reset_starts_the_window_over() -> None:
    b = Backoff(1.0, 60.0, TopOfWindow())
    assert windows(b, 4) == [1.0, 2.0, 4.0, 8.0]
    b.reset()
    assert b.attempt == 0
    assert windows(b, 3) == [1.0, 2.0, 4.0]


def test_same_seed_same_delays() -> None:
    first = windows(Backoff(0.5, 30.0, random.Random(42)), 20)
    second = windows(Backoff(0.5, 30.0, random.Random(42)), 20)
    other = windows(Backoff(0.5, 30.0, random.Random(43)), 20)
    assert first == second
    assert first != other


def test_delays_are_uniform_draws_over_the_window() -> None:
    """Exactly ``rng.uniform(0, window)``: what a reader of the docstring would compute."""
    reference = random.Random(7)
    expected = [reference.uniform(0.0, min(8.0, 0.5 * 2**n)) for n in range(12)]
    assert windows(Backoff(0.5, 8.0, random.Random(7)), 12) == expected


def test_many_attempts_do_not_overflow() -> None:
    b = Backoff(0.5, 30.0, TopOfWindow())
    b.attempt = 5000  # 2.0 ** 5000 would raise OverflowError without the exponent clamp
    assert b.next_delay() == 30.0
    assert b.attempt == 5001


def test_default_rng_is_used_when_none_given() -> None:
    b = Backoff(1.0, 2.0)
    delays = windows(b, 50)
    assert all(0.0 <= d <= 2.0 for d in delays)
    assert len(set(delays)) > 1


@pytest.mark.parametrize(
    ("base", "cap"),
    [(0.0, 1.0), (-1.0, 1.0), (2.0, 1.0), (math.nan, 1.0), (1.0, math.nan), (-2.0, -1.0)],
    ids=["zero-base", "negative-base", "base-above-cap", "nan-base", "nan-cap", "negative"],
)
def test_invalid_arguments(base: float, cap: float) -> None:
    with pytest.raises(ValueError, match="0 < base_s <= cap_s"):
        Backoff(base, cap)
