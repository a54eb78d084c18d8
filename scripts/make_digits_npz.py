"""Write ``fedmq/data/digits.npz`` from scikit-learn's bundled copy of the digits (run once).

The package then needs no scikit-learn to train on digits (``fedmq.datasets``): ``x`` is the
1,797 8x8 images as uint8 pixel counts 0..16 (1797 x 64, in scikit-learn's order), ``y`` the
labels 0..9 as uint8. Run ``python scripts/make_digits_npz.py`` with scikit-learn installed
(``pip install 'fedmq[dev]'``); the result is byte-for-byte the same each time.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "fedmq" / "data" / "digits.npz"


def main() -> int:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = np.asarray(data.data)
    y = np.asarray(data.target)
    # The pixels are small integer counts stored as float64: uint8 keeps them exactly.
    if not (np.array_equal(x, np.round(x)) and x.min() >= 0 and x.max() <= 16):
        print("unexpected pixel values in scikit-learn's digits", file=sys.stderr)
        return 1
    buf = io.BytesIO()
    np.savez_compressed(buf, x=x.astype(np.uint8), y=y.astype(np.uint8))
    OUT.write_bytes(buf.getvalue())
    print(f"wrote {OUT} ({OUT.stat().st_size:,} bytes: x {x.shape}, y {y.shape})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
