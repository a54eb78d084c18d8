"""Tests for the digits loader and the federated partitions."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import numpy.typing as npt
import pytest

from fedmq.datasets import load_digits_split, partition


def _labels(n: int, classes: int, seed: int) -> npt.NDArray[np.int64]:
    return np.random.default_rng(seed).integers(0, classes, size=n).astype(np.int64)


def _assert_exact_cover(parts: list[npt.NDArray[np.intp]], n: int) -> None:
    allidx = np.concatenate(parts)
    assert allidx.shape == (n,)
    np.testing.assert_array_equal(np.sort(allidx), np.arange(n))
    assert all(p.dtype == np.intp for p in parts)


def test_load_digits_split_shapes_scale_and_stratification() -> None:
    x_tr, y_tr, x_te, y_te = load_digits_split(seed=0)
    assert x_tr.shape[1] == x_te.shape[1] == 64
    assert x_tr.shape[0] + x_te.shape[0] == 1797
    assert x_te.shape[0] == pytest.approx(0.25 * 1797, abs=1)
    assert x_tr.dtype == x_te.dtype == np.float32
    assert y_tr.shape == (x_tr.shape[0],)
    assert y_te.shape == (x_te.shape[0],)
    assert x_tr.min() >= 0.0
    assert x_tr.max() == 1.0
    # Stratified: every class keeps roughly its share in both splits.
    tr_frac = np.bincount(y_tr, minlength=10) / len(y_tr)
    te_frac = np.bincount(y_te, minlength=10) / len(y_te)
    np.testing.assert_allclose(tr_frac, te_frac, atol=0.01)


def test_load_digits_split_is_seeded() -> None:
    a, b = load_digits_split(1), load_digits_split(1)
    c = load_digits_split(2, test_size=0.5)
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u, v)
    assert c[2].shape[0] in (898, 899)
    assert not np.array_equal(a[1], load_digits_split(2)[1])


@pytest.mark.parametrize("seed", [0, 1, 7, 2**32 - 1])
@pytest.mark.parametrize("test_size", [0.25, 0.5, 0.1, 0.9])
def test_split_is_scikit_learns_exactly(seed: int, test_size: float) -> None:
    """The packaged digits and the numpy split give what scikit-learn gave: the same examples."""
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    model_selection = pytest.importorskip("sklearn.model_selection")
    data = sklearn_datasets.load_digits()
    x = (np.asarray(data.data, dtype=np.float32) / np.float32(16)).astype(np.float32)
    y = np.asarray(data.target, dtype=np.int64)
    x_tr, x_te, y_tr, y_te = model_selection.train_test_split(
        x, y, test_size=test_size, random_state=seed, stratify=y)
    ours = load_digits_split(seed, test_size)
    for got, want in zip(ours, (x_tr, y_tr, x_te, y_te), strict=True):
        np.testing.assert_array_equal(got, want)


def test_digits_need_no_scikit_learn() -> None:
    """A device install has no scikit-learn: the data is package data, read with numpy."""
    code = ("import sys; sys.modules['sklearn'] = None; "
            "from fedmq.datasets import load_digits_split; "
            "x, y, _, _ = load_digits_split(0); print(x.shape, sorted(set(y.tolist())))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(1347, 64) [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]"


@pytest.mark.parametrize("test_size", [0.0, 1.0, -0.1, 1.5])
def test_load_digits_split_rejects_bad_test_size(test_size: float) -> None:
    with pytest.raises(ValueError, match="test_size"):
        load_digits_split(0, test_size=test_size)


@pytest.mark.parametrize(("n", "devices"), [(100, 20), (1347, 20), (101, 7), (5, 5)])
def test_iid_covers_and_balances(n: int, devices: int) -> None:
    parts = partition(_labels(n, 10, 0), devices, "iid", seed=3)
    assert len(parts) == devices
    _assert_exact_cover(parts, n)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_iid_mixes_labels() -> None:
    y = np.repeat(np.arange(10), 100)  # sorted labels: a non-shuffling split would be 1 label each
    parts = partition(y, 10, "iid", seed=0)
    assert all(len(np.unique(y[p])) >= 8 for p in parts)


@pytest.mark.parametrize("seed", range(5))
def test_shards_cover_and_give_about_two_labels(seed: int) -> None:
    y = np.repeat(np.arange(10), 135)[:1347]
    parts = partition(y, 20, "shards", seed=seed)
    assert len(parts) == 20
    _assert_exact_cover(parts, len(y))
    labels_per_device = [len(np.unique(y[p])) for p in parts]
    # A shard can straddle a label boundary, so a few devices see 3 or 4 labels; most see <= 2.
    assert max(labels_per_device) <= 4
    assert sum(k <= 2 for k in labels_per_device) >= 12
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 2


def test_partitions_are_seeded() -> None:
    y = _labels(500, 10, 1)
    for scheme in ("iid", "shards"):
        a = partition(y, 10, scheme, seed=4)
        b = partition(y, 10, scheme, seed=4)
        c = partition(y, 10, scheme, seed=5)
        assert all(np.array_equal(u, v) for u, v in zip(a, b, strict=True))
        assert not all(np.array_equal(u, v) for u, v in zip(a, c, strict=True))


def test_partition_rejects_bad_arguments() -> None:
    y = _labels(10, 3, 0)
    with pytest.raises(ValueError, match="scheme"):
        partition(y, 2, "dirichlet", seed=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_devices"):
        partition(y, 0, "iid", seed=0)
    with pytest.raises(ValueError, match="num_devices"):
        partition(y, 2.0, "iid", seed=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="11 devices"):
        partition(y, 11, "iid", seed=0)
    with pytest.raises(ValueError, match="2 examples per device"):
        partition(y, 6, "shards", seed=0)
    with pytest.raises(ValueError, match="1-D"):
        partition(y.reshape(2, 5), 2, "iid", seed=0)
