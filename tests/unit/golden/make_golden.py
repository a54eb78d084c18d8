"""Write one golden ``<kind>.msgpack`` per message kind next to this file.

The files are checked in; ``tests/unit/test_codec.py`` asserts that encoding ``golden_messages()``
still gives exactly those bytes. Rerun this only on purpose, after a schema change, from the repo
root (``PYTHONPATH=. python tests/unit/golden/make_golden.py``), and review the diff it makes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedmq.codec import encode
from fedmq.compression import encode_all
from fedmq.wire import (
    DeviceStatus,
    GlobalModel,
    Message,
    ModelUpdate,
    RoundAnnouncement,
    RoundSummary,
    model_digest,
)

HERE = Path(__file__).resolve().parent


def golden_messages() -> dict[str, Message]:
    """One message per kind, keyed by the file stem; every float is exact in binary."""
    weights = encode_all(
        {
            "dense/kernel": np.array([[0.5, -1.0, 2.0], [0.25, 0.0, -0.125]]),
            "dense/bias": np.array([1.5, -2.5, 0.75]),
        }
    )
    deltas = encode_all(
        {
            "dense/kernel": np.array([[0.0625, 0.0, -0.5], [1.0, -0.25, 0.125]]),
            "dense/bias": np.array([-0.5, 0.25, 0.0]),
        }
    )
    digest = model_digest(weights)
    return {
        "round": RoundAnnouncement(
            federation="demo",
            round=3,
            base_version=2,
            model_sha256=digest,
            deadline=1_700_000_060.5,
            min_updates=2,
            max_updates=10,
            train={"epochs": 1, "lr": 0.0625, "optimizer": "sgd"},
            sample_seed=42,
            sample_rate=0.5,
            codec="fp32",
            open=True,
        ),
        "model": GlobalModel(
            federation="demo",
            version=2,
            round=2,
            tensors=weights,
            sha256=digest,
            metrics={"accuracy": 0.875, "loss": 0.25},
            created=1_700_000_000.25,
        ),
        "update": ModelUpdate(
            federation="demo",
            device_id="sensor-07",
            round=3,
            base_version=2,
            update_id="3f2a9c1e-r3",
            num_examples=120,
            tensors=deltas,
            metrics={"loss": 0.5},
        ),
        "status": DeviceStatus(
            federation="demo",
            device_id="sensor-07",
            state="training",
            agent_version="0.1.0",
            capabilities=("fp32",),
            ts=1_700_000_001.0,
        ),
        "summary": RoundSummary(
            federation="demo",
            round=3,
            version=3,
            participants=2,
            closed_by="grace",
            accepted=(("sensor-07", "3f2a9c1e-r3"), ("sensor-11", "77b04d2a-r3")),
            rejected={"stale": 1, "non_finite": 1},
            bytes_in=1234,
            duration_s=12.5,
            metrics={"loss": 0.375, "accuracy": 0.9375},
        ),
    }


def main() -> None:
    for stem, msg in golden_messages().items():
        path = HERE / f"{stem}.msgpack"
        path.write_bytes(encode(msg))
        print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
