"""The peer benchmark's bookkeeping: which heap state each key comes from, and the resident-set
probe it relies on (the timings themselves are the benchmark's business, not the suite's)."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.bench_peer import Measured, keys, resident_growth

SIDES = ("peer", "ours", "numpy_stream")


def measured(cold: bool) -> Measured:
    """Distinct made-up medians per state, so a key taken from the wrong state shows."""
    warm = {"peer": (0.24, 0), "ours": (0.12, 0), "numpy_stream": (0.20, 0)}
    trim = {"peer": (0.45, 9), "ours": (0.15, 1), "numpy_stream": (0.30, 1)}
    return Measured(
        peaks={"peer": 800 << 20, "ours": 24 << 20, "numpy_stream": 16 << 20},
        diffs={"ours": 1e-8, "numpy_stream": 2e-8},
        errors={name: 1e-8 for name in SIDES},
        runs={},
        med=warm,
        med_trim=trim,
        med_cold=({"peer": (3.0, 9), "ours": (0.15, 1), "numpy_stream": (0.2, 1)}
                  if cold else None),
        rss_cold=({"peer": 768 << 20, "ours": 24 << 20, "numpy_stream": 16 << 20}
                  if cold else {}),
    )


def test_headline_time_ratio_is_the_new_process_state_and_warm_is_reported_beside_it() -> None:
    out = keys(measured(cold=True), 200, 1_000_000, 4, 5)
    assert out["time_ratio_peer_over_ours"] == pytest.approx(3.0 / 0.15)
    assert out["time_ratio_cold_peer_over_ours"] == pytest.approx(3.0 / 0.15)
    assert out["time_ratio_warm_peer_over_ours"] == pytest.approx(0.24 / 0.12)
    assert out["time_ratio_trimmed_peer_over_ours"] == pytest.approx(0.45 / 0.15)
    assert out["calibration_peer_over_numpy_stream_cold"] == pytest.approx(3.0 / 0.2)
    assert out["calibration_peer_over_numpy_stream_warm"] == pytest.approx(0.24 / 0.20)
    assert out["rss_growth_ratio_peer_over_numpy_stream_cold"] == pytest.approx(48.0)
    assert out["rss_growth_ratio_peer_over_ours_cold"] == pytest.approx(32.0)
    assert out["peak_mem_ratio_peer_over_ours"] == pytest.approx(800 / 24)


def test_without_the_new_process_pass_the_headline_is_absent_not_borrowed() -> None:
    out = keys(measured(cold=False), 200, 1_000_000, 4, 5)
    assert "time_ratio_peer_over_ours" not in out
    assert out["time_ratio_warm_peer_over_ours"] == pytest.approx(2.0)
    assert not any(k.endswith("_cold") for k in out)


def test_resident_growth_sees_memory_touched_inside_the_call() -> None:
    size = 64 << 20

    def touch() -> list[np.ndarray]:
        return [np.ones(size // 8)]

    def idle() -> list[np.ndarray]:
        return []

    _, _, grown = resident_growth(touch)
    _, _, still = resident_growth(idle)
    assert grown is not None
    assert still is not None
    assert grown >= size * 0.9
    assert still < size // 4
