"""Demo data: scikit-learn's bundled digits and the standard federated partitions.

scikit-learn is an optional dependency (``pip install 'fedmq[demo]'``) and is imported only
inside :func:`load_digits_split`, so devices never need it.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import numpy.typing as npt

__all__ = ["load_digits_split", "partition"]

_DIGITS_MAX_PIXEL = 16.0  # load_digits pixels are counts in 0..16


def load_digits_split(
    seed: int, test_size: float = 0.25
) -> tuple[
    npt.NDArray[np.float32], npt.NDArray[np.int64], npt.NDArray[np.float32], npt.NDArray[np.int64]
]:
    """8x8 digits (1,797 images, 64 features, 10 classes) as ``x_train, y_train, x_test, y_test``.

    Pixels are scaled to [0, 1] float32; the split is stratified by label and fixed by ``seed``.
    Needs no download (the data ships with scikit-learn).
    """
    if isinstance(test_size, bool) or not 0.0 < test_size < 1.0:
        raise ValueError(f"test_size must be a fraction in (0, 1), got {test_size!r}")
    try:
        # Lazy: scikit-learn is an optional extra that devices do not install.
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise ImportError(
            "the digits demo data needs scikit-learn: pip install 'fedmq[demo]'"
        ) from exc
    data = load_digits()
    x = (np.asarray(data.data, dtype=np.float32) / np.float32(_DIGITS_MAX_PIXEL)).astype(np.float32)
    y = np.asarray(data.target, dtype=np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_size, random_state=seed, stratify=y
    )
    return (
        np.ascontiguousarray(x_tr, dtype=np.float32),
        np.asarray(y_tr, dtype=np.int64),
        np.ascontiguousarray(x_te, dtype=np.float32),
        np.asarray(y_te, dtype=np.int64),
    )


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
