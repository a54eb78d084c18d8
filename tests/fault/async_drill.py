"""``kill9_aggregator --mode async``: the driver drill (``faultkit.Drill``) on buffered
asynchronous rounds (FedBuff), with updates of several staleness values in every buffer.

Every buffer ``r`` (model version ``r - 1``) gets ``devices`` fresh updates (``d0``, ``d1``, ...)
and one from a slow device: slow device ``j = r mod slow`` sends an update trained ``min(slow -
1, r - 1)`` versions back, so each buffer folds staleness 0 and 0..slow-1 with the weight
1/sqrt(1 + s), and no device ever repeats a base version. ``buffer_size`` is ``devices + 1``: a
buffer closes when the driver's updates for it are in, as a sync round would. The reference is
the same fold written in numpy; the drill also reports the fault-free run's model when given one
(``fault_free``), to say whether the killed run gave the same bits.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedmq import codec, compression
from fedmq.broker import MosquittoBroker, default_config_dir
from fedmq.models import init_mlp
from fedmq.transport import PahoTransport
from fedmq.wire import ModelUpdate, RoundAnnouncement, RoundSummary

from faultkit import (
    ADAPT_RATE,
    CLIP_MULTIPLIER,
    F32,
    MAX_NORM,
    SEED,
    Drill,
    broker_config,
    naive,
)

#: (device id, index for ``Drill.delta``, base version, examples) of one update.
Planned = tuple[str, int, int, int]


@dataclass
class AsyncDrill(Drill):
    """``Drill`` in async mode (see the module)."""

    #: Slow devices; they lag up to ``slow - 1`` versions.
    slow: int = 3
    #: The fault-free run's final model, to compare bits with (``max_abs_diff_vs_fault_free``).
    fault_free: dict[str, F32] | None = None
    final: dict[str, F32] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        k = self.buffer_size
        text = self.config.read_text()
        rounds = (f'[rounds]\nmode = "async"\nbuffer_size = {k}\nmax_staleness = {self.slow}\n'
                  f"min_updates = {k}\n")
        lines = [ln.strip() + "\n" for ln in text.splitlines()
                 if not ln.strip().startswith(("min_updates =", "max_updates =", "grace_s ="))]
        self.config.write_text("".join(lines).replace("[rounds]\n", rounds, 1))

    @property
    def buffer_size(self) -> int:
        return self.devices + 1

    def _initial_norm(self) -> float | None:
        return None  # every buffer of the run bootstraps from all of buffer 1 (k <= 32)

    def plan(self, round_: int) -> list[Planned]:
        """Round ``round_``'s updates, in the order they are sent."""
        base = round_ - 1
        out = [(f"d{d}", d, base, d + 1) for d in range(self.devices)]
        j = round_ % self.slow
        lag = min(self.slow - 1, base)
        out.append((f"s{j}", self.devices + j, base - lag, self.devices + 1 + j))
        return out

    def update_id(self, round_: int, device: int) -> str:
        return f"r{round_}-u{device}"

    def _answer_announcements(self, driver: PahoTransport) -> None:
        while not driver.inbox.empty():
            msg = driver.inbox.get_nowait()
            ann = codec.decode(msg.payload) if msg.payload else None
            if isinstance(ann, RoundAnnouncement):
                self._announcement = ann
        ann = self._announcement
        if ann is None or not ann.open or ann.round > self.rounds:
            return
        assert ann.mode == "async", ann
        assert ann.base_version == ann.round - 1, "a buffer was abandoned: the plan is off"
        for device, index, base, examples in self.plan(ann.round):
            uid = self.update_id(ann.round, index)
            if uid in self.sent:
                continue
            u = ModelUpdate(federation=self.federation, device_id=device, round=ann.round,
                            base_version=base, update_id=uid, num_examples=examples,
                            tensors=compression.encode_all(self.delta(ann.round, index)))
            driver.publish(self.topics.update(device), codec.encode(u), qos=1)
            self.sent[uid] = ann.round
            if not self.burst:
                return

    def reference(self) -> dict[str, F32]:
        """The fault-free model in numpy: per buffer, the adaptive norm bound's clip factor
        (docs/robustness.md, as in ``Drill.reference``) times the staleness weight, folded into
        Σ n·w·Δ / Σ n, added to the model (FedAvg, server_lr 1)."""
        model = init_mlp(self.layers, SEED)
        estimate: float | None = None
        for r in range(1, self.rounds + 1):
            plan = self.plan(r)
            deltas = [self.delta(r, index) for _, index, _, _ in plan]
            norms = [math.sqrt(sum(naive.lane_sq_norm(a) for a in d.values())) for d in deltas]
            first = estimate is None
            if estimate is None:
                estimate = float(np.median(norms))
            bound = min(CLIP_MULTIPLIER * estimate, MAX_NORM)
            factors = [(1.0 if n <= bound else bound / n) / math.sqrt(1.0 + (r - 1 - base))
                       for n, (_, _, base, _) in zip(norms, plan, strict=True)]
            total = float(sum(n for _, _, _, n in plan))
            model = {k: (v.astype(np.float64) + sum(
                d[k].astype(np.float64) * (n * f)
                for d, f, (_, _, _, n) in zip(deltas, factors, plan, strict=True)) / total
            ).astype(np.float32) for k, v in model.items()}
            if not first:
                below = sum(n <= estimate for n in norms) / len(norms)
                estimate *= math.exp(-ADAPT_RATE * (below - 0.5))
        return model

    def _account(self, final: dict[str, F32],
                 summaries: dict[int, RoundSummary]) -> dict[str, float]:
        self.final = final
        result = super()._account(final, summaries)
        result["staleness_max"] = max(s.metrics.get("staleness_max", 0.0)
                                      for s in summaries.values())
        if self.fault_free is not None:
            result["max_abs_diff_vs_fault_free"] = max(
                float(np.abs(final[k].astype(np.float64) - v.astype(np.float64)).max())
                for k, v in self.fault_free.items())
            result["bit_identical_to_fault_free"] = all(
                final[k].tobytes() == v.tobytes() for k, v in self.fault_free.items())
        return result


def kill9_async(opts: dict[str, int], rng: random.Random, tmp: Path) -> dict[str, Any]:
    """``scripts/faults kill9_aggregator --mode async``: the fault-free run, then the same plan
    with ``kills`` SIGKILLs, on one Mosquitto; both against the numpy reference."""
    with MosquittoBroker(default_config_dir() / "dev.conf") as broker:
        cfg = broker_config(broker)
        clean = AsyncDrill(cfg, tmp / "fault-free", devices=opts["devices"],
                           rounds=opts["rounds"])
        clean_result = clean.run(kills=0, rng=random.Random(0), timeout=900)
        drill = AsyncDrill(cfg, tmp / "killed", devices=opts["devices"], rounds=opts["rounds"],
                           fault_free=clean.final)
        result: dict[str, Any] = dict(drill.run(kills=opts["kills"], rng=rng, timeout=900))
    result["rounds_expected"] = opts["rounds"]
    result["mode"] = "async"
    result["buffer_size"] = drill.buffer_size
    result["max_staleness"] = drill.slow
    result["fault_free_lost"] = clean_result["lost"]
    result["fault_free_max_abs_diff_vs_reference"] = clean_result["max_abs_diff_vs_reference"]
    return result
