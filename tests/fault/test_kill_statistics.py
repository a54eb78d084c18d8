"""SIGKILL a statistics federation's aggregator mid-run and restart it (``faultkit.Drill``: the
aggregator a real process with durability on, devices driven from here): every round's result
equals the fault-free one, each device counted once, and the retained result republished."""

from __future__ import annotations

import random
import time
import uuid
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from fedmq import codec
from fedmq.broker import MosquittoBroker
from fedmq.statistics import (
    Summary,
    column_statistics,
    contribution_tensors,
    empty,
    equal_width_edges,
    merge,
    summarize,
)
from fedmq.transport import PahoTransport
from fedmq.wire import ModelUpdate, RoundAnnouncement, RoundSummary, StatisticsResult

from faultkit import F32, Drill, broker_config

F64 = npt.NDArray[np.float64]
#: Column -> [lo, hi, nbins]. ``pressure`` sits at 1e6 (the merge's hard case); both columns
#: have values outside their bins, so under- and overflow counters are exercised too.
COLUMNS = {"pressure": (1e6 - 2.0, 1e6 + 2.0, 16), "level": (-4.0, 4.0, 8)}


@dataclass
class StatisticsDrill(Drill):
    """``Drill`` with ``[task] kind = "statistics"``: each device sends a summary of its
    (round, device)-seeded values; every payload on the result topic is kept."""

    payloads: dict[int, list[bytes]] = field(default_factory=dict)  # round -> results seen

    def __post_init__(self) -> None:
        super().__post_init__()
        bins = "".join(f"{k} = [{lo!r}, {hi!r}, {n}]\n" for k, (lo, hi, n) in COLUMNS.items())
        with self.config.open("a") as f:
            f.write(f'[task]\nkind = "statistics"\ncolumns = {list(COLUMNS)}\n'
                    f"[task.column_bins]\n{bins}")

    def values(self, round_: int, device: int) -> dict[str, F64]:
        rng = np.random.default_rng(round_ * 1000 + device)
        n = 40 + 13 * device + round_
        return {"pressure": 1e6 + rng.normal(0.0, 1.0, n), "level": rng.normal(0.5, 2.0, n)}

    def summaries(self, round_: int, device: int) -> dict[str, Summary]:
        return {k: summarize(v, equal_width_edges(*COLUMNS[k]))
                for k, v in self.values(round_, device).items()}

    def _answer_announcements(self, driver: PahoTransport) -> None:
        """One contribution per loop turn, devices in order (as ``Drill`` sends updates)."""
        while not driver.inbox.empty():
            msg = driver.inbox.get_nowait()
            got = codec.decode(msg.payload) if msg.payload else None
            if isinstance(got, RoundAnnouncement):
                self._announcement = got
        self._collect()
        ann = self._announcement
        if ann is None or not ann.open or ann.round > self.rounds:
            return
        for d in range(self.devices):
            uid = self.update_id(ann.round, d)
            if uid in self.sent:
                continue
            u = ModelUpdate(federation=self.federation, device_id=f"d{d}", round=ann.round,
                            base_version=ann.base_version, update_id=uid, num_examples=1,
                            tensors=contribution_tensors(self.summaries(ann.round, d)))
            driver.publish(self.topics.update(f"d{d}"), codec.encode(u), qos=1)
            self.sent[uid] = ann.round
            return

    def fault_free(self, round_: int) -> StatisticsResult:
        """Round ``round_``'s result without faults: the devices' summaries merged in the
        order they are sent (the aggregator's fold, in this process)."""
        merged = {k: empty(n) for k, (_, _, n) in COLUMNS.items()}
        for d in range(self.devices):
            for k, s in self.summaries(round_, d).items():
                merged[k] = merge(merged[k], s)
        return StatisticsResult(
            federation=self.federation, round=round_, version=round_,
            devices=tuple(f"d{d}" for d in range(self.devices)),
            columns=tuple(column_statistics(k, equal_width_edges(*COLUMNS[k]), merged[k])
                          for k in COLUMNS))

    def run(self, kills: int, rng: random.Random, timeout: float = 120.0) -> dict[str, float]:
        """``Drill.run``, with a client on the result topic from before the aggregator starts
        until every round's result is in."""
        self._results = PahoTransport(self.broker, client_id=f"res-{uuid.uuid4().hex[:8]}")
        self._results.subscribe(self.topics.result)
        self._results.start()
        try:
            out = super().run(kills, rng, timeout)
            end = time.monotonic() + 10
            while len(self.payloads) < self.rounds and time.monotonic() < end:
                time.sleep(0.05)
                self._collect()
        finally:
            self._results.stop()
        return out | self._check_results()

    def _collect(self) -> None:
        while not self._results.inbox.empty():
            payload = self._results.inbox.get_nowait().payload
            got = codec.decode(payload) if payload else None
            if isinstance(got, StatisticsResult):
                self.payloads.setdefault(got.round, []).append(payload)

    def _account(self, final: dict[str, F32],
                 summaries: dict[int, RoundSummary]) -> dict[str, float]:
        """``Drill``'s keys but the model's (a placeholder here)."""
        folded = [uid for s in summaries.values() for _, uid in s.accepted]
        return {"sent": len(self.sent), "folded": len(folded),
                "lost": len(set(self.sent) - set(folded)),
                "double_counted": len(folded) - len(set(folded)),
                "kills": self.kills, "rounds": len(summaries)}

    def _check_results(self) -> dict[str, float]:
        """Results (every payload seen on the result topic) whose round, version, devices or
        columns differ from the fault-free one (``ts``, ``run`` and ``closed_by`` aside), those
        seen again byte for byte (republished), and the largest relative error of a mean or a
        variance against exact rational arithmetic."""
        differs, republished, worst = 0, 0, 0.0
        for r in range(1, self.rounds + 1):
            seen = self.payloads.get(r, [])
            if not seen:
                differs += 1
                continue
            republished += sum(p == seen[0] for p in seen[1:])
            want = self.fault_free(r)
            for payload in seen:
                got = codec.decode(payload)
                assert isinstance(got, StatisticsResult)
                if (got.round, got.version, got.devices, got.columns) != (
                        want.round, want.version, want.devices, want.columns):
                    differs += 1
            worst = max(worst, self._error_vs_exact(r, want))
        return {"results_seen": sum(len(v) for v in self.payloads.values()),
                "results_differing_from_fault_free": differs,
                "results_republished": republished,
                "max_rel_error_vs_exact": worst}

    def _error_vs_exact(self, round_: int, result: StatisticsResult) -> float:
        worst = 0.0
        for col in result.columns:
            x = [Fraction(float(v)) for d in range(self.devices)
                 for v in self.values(round_, d)[col.name]]
            mean = sum(x, Fraction(0)) / len(x)
            var = sum(((v - mean) ** 2 for v in x), Fraction(0)) / len(x)
            assert col.mean is not None
            assert col.variance is not None
            worst = max(worst, float(abs(Fraction(col.mean) - mean) / abs(mean)),
                        float(abs(Fraction(col.variance) - var) / var))
        return worst


@pytest.mark.broker
@pytest.mark.slow
def test_kill9_statistics_aggregator(mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    drill = StatisticsDrill(broker_config(mosquitto), tmp_path, devices=4, rounds=3,
                            federation=f"stats-kill-{uuid.uuid4().hex[:8]}")
    # The driver subscribes to results before the aggregator starts (Drill.run starts it).
    result = drill.run(kills=3, rng=random.Random(5))
    print(result)
    assert result["kills"] == 3
    assert result["rounds"] == 3
    assert result["sent"] == 12
    assert result["lost"] == 0
    assert result["double_counted"] == 0
    assert result["results_differing_from_fault_free"] == 0
    assert result["results_republished"] >= 1
    assert result["max_rel_error_vs_exact"] < 1e-12
