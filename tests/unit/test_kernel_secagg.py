"""The masked-input fold against numpy's wrapping uint32 addition, in any order and by chunks."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.kernel_secagg import fold_masked, warmup_masked


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 3000), devices=st.integers(1, 12), seed=st.integers(0, 2**32 - 1),
       chunk=st.integers(1, 4000))
def test_fold_equals_numpy_in_any_order_and_chunking(n: int, devices: int, seed: int,
                                                     chunk: int) -> None:
    rng = np.random.default_rng(seed)
    vectors = [rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)
               for _ in range(devices)]
    ref = np.zeros(n, dtype=np.uint32)
    for v in vectors:
        ref += v  # numpy wraps uint32 arrays mod 2^32
    acc = np.zeros(n, dtype=np.uint32)
    for i in rng.permutation(devices):
        raw = vectors[i].astype("<u4").tobytes()
        for start in range(0, n, chunk):
            fold_masked(acc, memoryview(raw)[4 * start: 4 * min(n, start + chunk)], start)
    assert np.array_equal(acc, ref)


def test_wraps_at_the_ring_edge() -> None:
    acc = np.array([2**32 - 1, 5, 2**31], dtype=np.uint32)
    fold_masked(acc, np.array([1, 2**32 - 5, 2**31], dtype=np.uint32))
    assert acc.tolist() == [0, 0, 0]


def test_arguments_are_checked() -> None:
    warmup_masked()
    acc = np.zeros(4, dtype=np.uint32)
    with pytest.raises(ValueError, match="does not fit"):
        fold_masked(acc, bytes(8), 3)
    with pytest.raises(ValueError, match="whole number"):
        fold_masked(acc, bytes(7))
    with pytest.raises(ValueError, match="uint32"):
        fold_masked(np.zeros(4, dtype=np.int64), bytes(8))
    ro = np.zeros(4, dtype=np.uint32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        fold_masked(ro, bytes(8))
    with pytest.raises(ValueError, match="does not fit"):
        fold_masked(acc, bytes(4), -1)
