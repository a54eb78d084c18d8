"""Demo data: the digits (shipped with fedmq) and the standard federated partitions.

The 1,797 8x8 digits images are package data (``fedmq/data/digits.npz``, 45 kB, written from
scikit-learn's bundled copy by ``scripts/make_digits_npz.py``; origin and licence in
``fedmq/data/README.md``), so a device trains on them with numpy alone. The train/test split
reproduces scikit-learn's stratified ``train_test_split`` exactly (``_stratified_split``):
the same seed gives the same examples as before, without scikit-learn.
"""

from __future__ import annotations

import math
from importlib import resources
from typing import Literal

import numpy as np
import numpy.typing as npt

__all__ = ["load_digits", "load_digits_split", "partition"]

_DIGITS_MAX_PIXEL = 16.0  # the pixels are counts in 0..16


def load_digits() -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    """All 1,797 digits as (x: 1797 x 64 pixel counts 0..16, y: labels 0..9), both uint8."""
    with resources.files("fedmq.data").joinpath("digits.npz").open("rb") as fh, \
            np.load(fh, allow_pickle=False) as data:
        return np.asarray(data["x"]), np.asarray(data["y"])


def load_digits_split(
    seed: int, test_size: float = 0.25
) -> tuple[
    npt.NDArray[np.float32], npt.NDArray[np.int64], npt.NDArray[np.float32], npt.NDArray[np.int64]
]:
    """8x8 digits (1,797 images, 64 features, 10 classes) as ``x_train, y_train, x_test, y_test``.

    Pixels are scaled to [0, 1] float32; the split is stratified by label and fixed by ``seed``
    (the examples scikit-learn's ``train_test_split(..., random_state=seed, stratify=y)``
    picks). Needs no download and no scikit-learn.
    """
    if isinstance(test_size, bool) or not 0.0 < test_size < 1.0:
        raise ValueError(f"test_size must be a fraction in (0, 1), got {test_size!r}")
    pixels, labels = load_digits()
    x = (pixels.astype(np.float32) / np.float32(_DIGITS_MAX_PIXEL)).astype(np.float32)
    y = labels.astype(np.int64)
    train, test = _stratified_split(y, test_size, seed)
    return (
        np.ascontiguousarray(x[train], dtype=np.float32),
        y[train],
        np.ascontiguousarray(x[test], dtype=np.float32),
        y[test],
    )


def _stratified_split(
    y: npt.NDArray[np.int64], test_size: float, seed: int
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    """(train, test) indices, as scikit-learn's ``StratifiedShuffleSplit`` draws them.

    The same calls on the same ``np.random.RandomState(seed)`` in the same order (scikit-learn
    1.3 to 1.9; ``tests/unit/test_datasets.py`` compares with it when it is installed), so the
    split the demo and the devices used with scikit-learn is kept.
    """
    n = len(y)
    n_test = math.ceil(test_size * n)
    n_train = n - n_test
    _, y_indices, class_counts = np.unique(y, return_inverse=True, return_counts=True)
    class_indices = np.split(np.argsort(y_indices, kind="stable"), np.cumsum(class_counts)[:-1])
    rng = np.random.RandomState(seed)
    n_i = _approximate_mode(class_counts, n_train, rng)
    t_i = _approximate_mode(class_counts - n_i, n_test, rng)
    train: list[int] = []
    test: list[int] = []
    for i, count in enumerate(class_counts):
        chosen = class_indices[i].take(rng.permutation(count), mode="clip")
        train.extend(chosen[: n_i[i]])
        test.extend(chosen[n_i[i]: n_i[i] + t_i[i]])
    return rng.permutation(train), rng.permutation(test)


def _approximate_mode(
    class_counts: npt.NDArray[np.int64], n_draws: int, rng: np.random.RandomState
) -> npt.NDArray[np.int64]:
    """How many of ``n_draws`` each class gets: its share rounded down, the rest to the largest
    remainders (ties broken by ``rng``), as scikit-learn's ``_approximate_mode``."""
    continuous = class_counts / class_counts.sum() * n_draws
    floored = np.floor(continuous)
    need_to_add = int(n_draws - floored.sum())
    if need_to_add > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (inds,) = np.where(remainder == value)
            add_now = min(len(inds), need_to_add)
            floored[rng.choice(inds, size=add_now, replace=False)] += 1
            need_to_add -= add_now
            if need_to_add == 0:
                break
    counts: npt.NDArray[np.int64] = floored.astype(np.int64)
    return counts


def partition(
    y: npt.ArrayLike,
    num_devices: int,
    scheme: Literal["iid", "shards"],
    seed: int,
) -> list[npt.NDArray[np.intp]]:
    """Split example indices ``0..len(y)-1`` across ``num_devices`` devices.

    - ``"iid"``: shuffle, then cut into equal parts (sizes differ by at most one).
    - ``"shards"``: the pathological non-IID split of McMahan et al. 2017: sort by label, cut
      into ``2 * num_devices`` shards, give each device two random shards, so most devices see
      two labels.

    Every index lands on exactly one device; each device's indices are sorted.
    """
    labels = np.asarray(y)
    if labels.ndim != 1:
        raise ValueError(f"y must be a 1-D array of labels, got shape {labels.shape}")
    if isinstance(num_devices, bool) or not isinstance(num_devices, int) or num_devices < 1:
        raise ValueError(f"num_devices must be a positive integer, got {num_devices!r}")
    n = labels.shape[0]
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        if num_devices > n:
            raise ValueError(f"cannot give {num_devices} devices at least one of {n} examples")
        parts = np.array_split(rng.permutation(n), num_devices)
    elif scheme == "shards":
        num_shards = 2 * num_devices
        if num_shards > n:
            raise ValueError(
                f"'shards' needs at least 2 examples per device: {n} examples, "
                f"{num_devices} devices"
            )
        # Shuffle before the stable sort so which examples of a label share a shard is random.
        shuffled = rng.permutation(n)
        by_label = shuffled[np.argsort(labels[shuffled], kind="stable")]
        shards = np.array_split(by_label, num_shards)
        order = rng.permutation(num_shards)
        parts = [
            np.concatenate([shards[order[2 * d]], shards[order[2 * d + 1]]])
            for d in range(num_devices)
        ]
    else:
        raise ValueError(f"scheme must be 'iid' or 'shards', got {scheme!r}")
    return [np.sort(p).astype(np.intp) for p in parts]
