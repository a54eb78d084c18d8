"""Bytes on the wire per codec, and what each codec costs in accuracy on the digits demo.

``wire_ratio_<codec>``: the size of an fp32 update of 1M parameters divided by the same update
encoded with the codec. ``accuracy_<codec>``: the demo's final held-out accuracy (20 devices,
iid, 20 rounds, same seed) with devices sending that codec. Top-k keeps the default
``[compression] fraction`` in both (1%; with error feedback in the demo).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np

from fedmq import codec, compression
from fedmq.cli import build_parser
from fedmq.config import CompressionConfig
from fedmq.demo import run as run_demo
from fedmq.wire import ModelUpdate

CODECS = ("fp32", "fp16", "int8", "topk")


def wire_bytes(params: int, codec_name: str, **opts: float | int | str) -> int:
    """Size of one encoded update of ``params`` normal-distributed deltas."""
    delta = (np.random.default_rng(0).standard_normal(params) * 0.01).astype(np.float32)
    tensor = compression.encode("w", delta, codec_name, **opts)  # type: ignore[arg-type]
    return len(codec.encode(ModelUpdate(
        federation="bench", device_id="d", round=1, base_version=0, update_id="u" * 32,
        num_examples=100, tensors=(tensor,))))


def demo_accuracy(codec_name: str, rounds: int, devices: int, seed: int) -> float:
    """Final accuracy of one demo run with ``codec_name``."""
    with TemporaryDirectory() as tmp:
        out = Path(tmp) / "demo.json"
        args = build_parser().parse_args([
            "demo", "--devices", str(devices), "--rounds", str(rounds), "--partition", "iid",
            "--seed", str(seed), "--codec", codec_name, "--json", str(out)])
        with contextlib.redirect_stdout(io.StringIO()):
            code = run_demo(args)
        if code != 0:
            raise RuntimeError(f"demo with {codec_name} exited with {code}")
        accuracy: float = json.loads(out.read_text())["final_accuracy"]
        return accuracy


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer rounds and devices")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    params = 1_000_000
    fraction = CompressionConfig().fraction  # the demo's default too
    sizes = {c: wire_bytes(params, c, **({"fraction": fraction} if c == "topk" else {}))
             for c in CODECS}
    result: dict[str, float] = {}
    print(f"{'codec':6} {'bytes/update':>13} {'ratio':>7} {'accuracy':>9}")
    rounds, devices = (5, 5) if args.quick else (20, 20)
    for c in CODECS:
        result[f"wire_ratio_{c}"] = round(sizes["fp32"] / sizes[c], 2)
        result[f"accuracy_{c}"] = round(demo_accuracy(c, rounds, devices, seed=0), 4)
        print(f"{c:6} {sizes[c]:13d} {result[f'wire_ratio_{c}']:7.2f} "
              f"{result[f'accuracy_{c}']:9.4f}", flush=True)
    result["accuracy_int8_minus_fp32"] = round(result["accuracy_int8"] - result["accuracy_fp32"],
                                               4)
    result["accuracy_topk_minus_fp32"] = round(result["accuracy_topk"] - result["accuracy_fp32"],
                                               4)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
