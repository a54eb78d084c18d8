"""Batched (cache-blocked) and threaded folds give exactly the sequential result."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aggregator import kernel_batch, kernels
from aggregator.spec import ModelSpec
from aggregator.strategies import FedAvg
from fedmq import compression
from fedmq.wire import Tensor

CODEC_OPTS: list[tuple[str, dict[str, object]]] = [
    ("fp32", {}), ("fp16", {}), ("int8", {"block": 256}), ("int8", {"block": 100}),
    ("topk", {"fraction": 0.05}),
]


def _tensor(rng: np.random.Generator, n: int, which: int) -> Tensor:
    codec, opts = CODEC_OPTS[which]
    return compression.encode("w", rng.standard_normal(n).astype(np.float32), codec,
                              **opts)  # type: ignore[arg-type]


def _assert_batched_equals_one_by_one(start: np.ndarray, items: list[tuple[Tensor, float]],
                                      ) -> None:
    """``fold_many`` from ``start`` gives the same bits as folding ``items`` one by one."""
    one_by_one = start
    batched = start.copy()
    for t, w in items:
        kernels.KERNELS[t.codec].fold(one_by_one, t, w)
    kernels.fold_many(batched, items)
    np.testing.assert_array_equal(batched, one_by_one)


# The fixture only sets a module constant that no example changes.
@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 3 * 4096 + 7), seed=st.integers(0, 2**32 - 1),
       kinds=st.lists(st.integers(0, len(CODEC_OPTS) - 1), min_size=1, max_size=6))
def test_fold_many_equals_folding_one_by_one(n: int, seed: int, kinds: list[int],
                                             monkeypatch_block: None) -> None:
    rng = np.random.default_rng(seed)
    items = [(_tensor(rng, n, k), float(rng.integers(1, 100))) for k in kinds]
    one_by_one = np.zeros(n)
    for t, w in items:
        kernels.KERNELS[t.codec].fold(one_by_one, t, w)
    batched = np.zeros(n)
    kernels.fold_many(batched, items)
    np.testing.assert_array_equal(batched, one_by_one)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 2 * 4096 + 300), seed=st.integers(0, 2**32 - 1),
       runs=st.lists(st.tuples(st.integers(0, len(CODEC_OPTS) - 1), st.integers(1, 9)),
                     min_size=1, max_size=4))
def test_grouped_kernels_equal_folding_one_by_one(n: int, seed: int, runs: list[tuple[int, int]],
                                                  monkeypatch_block: None) -> None:
    # Runs of one codec exercise the grouped kernels (groups of 4, 2 and a single remainder),
    # with sparse tensors and other int8 block sizes in between; weights and values are such
    # that rounding differs with the order of the additions, so equality means same order.
    rng = np.random.default_rng(seed)
    items = [(_tensor(rng, n, kind), float(rng.uniform(0.1, 1000.0)))
             for kind, length in runs for _ in range(length)]
    _assert_batched_equals_one_by_one(rng.standard_normal(n), items)


@pytest.mark.parametrize(("n", "blocks"), [(4097, (100,)), (9000, (100, 256)),
                                            (5000, (3000,)), (12_000, (5000, 7))])
def test_int8_blocks_that_do_not_divide_the_cache_block_keep_the_order(
        n: int, blocks: tuple[int, ...], monkeypatch_block: None) -> None:
    # Found by the property test above: an int8 step used to widen its range to whole scale
    # blocks on its own, so across a cache-block edge a later fp32 update was added before it.
    rng = np.random.default_rng(3)
    items = [(compression.encode("w", rng.standard_normal(n).astype(np.float32), "int8",
                                 block=b), float(rng.uniform(0.1, 1000.0))) for b in blocks]
    items += [(compression.encode("w", rng.standard_normal(n).astype(np.float32), "fp32"),
               float(rng.uniform(0.1, 1000.0))) for _ in range(2)]
    items.append(items[0])
    _assert_batched_equals_one_by_one(rng.standard_normal(n), items)


def test_fold_many_checks_every_item_before_folding() -> None:
    rng = np.random.default_rng(7)
    good = [(_tensor(rng, 600, 2), 2.0) for _ in range(5)]
    short = _tensor(rng, 599, 2)
    acc = np.ones(600)
    with pytest.raises(ValueError, match=r"599|600"):
        kernels.fold_many(acc, [*good, (short, 1.0), *good])
    np.testing.assert_array_equal(acc, np.ones(600))


@pytest.fixture
def monkeypatch_block() -> Iterator[None]:
    # Small cache blocks so that short tensors still cross several block boundaries.
    saved = kernel_batch.CACHE_BLOCK
    kernel_batch.CACHE_BLOCK = 4096
    yield
    kernel_batch.CACHE_BLOCK = saved


@pytest.fixture
def two_threads() -> Iterator[None]:
    saved = kernels.PARALLEL_MIN
    kernels.PARALLEL_MIN = 1000
    kernels.set_fold_threads(2)
    yield
    kernels.set_fold_threads(1)
    kernels.PARALLEL_MIN = saved


@pytest.mark.parametrize("which", range(len(CODEC_OPTS)))
def test_threaded_fold_equals_serial(which: int, two_threads: None) -> None:
    rng = np.random.default_rng(which)
    t = _tensor(rng, 5001, which)
    assert kernels.fold_threads() == 2
    threaded = np.zeros(5001)
    kernels.KERNELS[t.codec].fold(threaded, t, 3.0)
    kernels.set_fold_threads(1)
    serial = np.zeros(5001)
    kernels.KERNELS[t.codec].fold(serial, t, 3.0)
    np.testing.assert_array_equal(threaded, serial)


def test_fold_threads_rejects_negative() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        kernels.set_fold_threads(-1)


def test_strategy_fold_many_matches_fold() -> None:
    rng = np.random.default_rng(7)
    base = {"a": rng.standard_normal((30, 20)).astype(np.float32),
            "b": rng.standard_normal(20).astype(np.float32)}
    spec = ModelSpec.from_weights(base)
    # Scales below 1 are the norm bound's clipping; they multiply the weight in the kernel.
    updates = [(compression.encode_all({k: rng.standard_normal(v.shape) for k, v in base.items()},
                                       codec), float(n), scale)
               for codec, n, scale in (("fp32", 3, 1.0), ("int8", 5, 0.25), ("fp16", 7, 1.0),
                                       ("topk", 2, 0.5))]
    one, many = FedAvg(spec), FedAvg(spec)
    one.init(base)
    many.init(base)
    for tensors, w, scale in updates:
        one.fold(tensors, w, scale)
    many.fold_many(updates)
    assert (many.contributors, many.total_weight) == (one.contributors, one.total_weight)
    for name, value in one.finalize().items():
        np.testing.assert_array_equal(many.finalize()[name], value)
