"""The kill -9 drill with differential privacy on (``scripts/faults kill9_aggregator
--noise-multiplier Z``): the aggregator adds Gaussian noise at each round's finalize, so the
reference here re-derives that noise from docs/privacy.md's rule, written out independently of
aggregator/privacy.py: SHA-256 of ("fedmq/dp-noise/v1\\0", the secret in the state directory,
the run and the round as signed 8-byte big-endian integers) seeds numpy's PCG64, whose standard
normals times z·C are the noise on the flat sum; every update weighs 1 and is clipped to C; the
mean is (Σ + noise) / min_updates. Each round's summary must also carry the epsilon that
dp-accounting, used directly, gives for that many rounds: a killed and restarted aggregator
continues the same epsilon.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import dp_accounting
import numpy as np
import numpy.typing as npt
from dp_accounting.pld import pld_privacy_accountant

from fedmq.config import StrategyConfig
from fedmq.models import init_mlp
from fedmq.wire import RoundSummary

from faultkit import F32, SEED, Drill, naive, server_opt_reference

__all__ = ["DP_CLIP", "DpDrill", "expected_epsilon"]

#: The drill's clip: below device 0's 20x updates (clipped), above the others (not clipped).
DP_CLIP = 1.0
DELTA = 1e-5
#: aggregator/privacy.py's PLD grid, restated.
PLD_GRID = 1e-3


def expected_epsilon(z: float, rounds: int) -> float:
    """Every device in every round: q = 1, ``rounds`` Gaussian mechanisms of multiplier z."""
    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=PLD_GRID)
    acc.compose(dp_accounting.GaussianDpEvent(z), rounds)
    return float(acc.get_epsilon(DELTA))


@dataclass
class DpDrill(Drill):
    """``Drill`` with ``[privacy] noise_multiplier`` and a fixed clip."""

    noise_multiplier: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        with self.config.open("a") as f:
            f.write(f"[privacy]\nnoise_multiplier = {self.noise_multiplier}\n"
                    f"clip_norm = {DP_CLIP}\ndelta = {DELTA}\n")

    def _robust_toml(self) -> str:
        return ""  # the privacy clip is the bound

    def noise(self, run: int, round_: int, size: int) -> npt.NDArray[np.float64]:
        secret = (self.state_dir / "state" / "dp_noise.key").read_bytes()
        digest = hashlib.sha256(b"fedmq/dp-noise/v1\0" + secret
                                + run.to_bytes(8, "big", signed=True)
                                + round_.to_bytes(8, "big", signed=True)).digest()
        rng = np.random.Generator(np.random.PCG64(int.from_bytes(digest, "big")))
        return rng.standard_normal(size) * (self.noise_multiplier * DP_CLIP)

    def reference(self) -> dict[str, F32]:
        assert self._announcement is not None
        run = self._announcement.run
        model = init_mlp(self.layers, SEED)
        names = list(model)
        sizes = [model[k].size for k in names]
        optimizer = server_opt_reference.ServerOptimizer(
            self.strategy, **StrategyConfig(name=self.strategy).settings())  # type: ignore[arg-type]
        for r in range(1, self.rounds + 1):
            deltas = [self.delta(r, d) for d in range(self.devices)]
            norms = [math.sqrt(sum(naive.lane_sq_norm(a) for a in delta.values()))
                     for delta in deltas]
            scales = [1.0 if n <= DP_CLIP else DP_CLIP / n for n in norms]
            flat = sum(np.concatenate([deltas[d][k].ravel() for k in names]).astype(np.float64)
                       * scales[d] for d in range(self.devices))
            noisy = (self.noise(run, r, sum(sizes)) + flat) / self.devices  # quorum = devices
            parts = np.split(noisy, np.cumsum(sizes)[:-1])
            mean = {k: p.reshape(model[k].shape) for k, p in zip(names, parts, strict=True)}
            model = {k: v.astype(np.float32) for k, v in optimizer.step(model, mean).items()}
        return model

    def _account(self, final: dict[str, F32],
                 summaries: dict[int, RoundSummary]) -> dict[str, float]:
        result = super()._account(final, summaries)
        got = {s.round: s.metrics.get("dp_epsilon") for s in summaries.values()}
        want = {r: expected_epsilon(self.noise_multiplier, r) for r in got}
        result["epsilon_mismatches"] = sum(
            g is None or abs(g - want[r]) > 1e-9 * want[r] for r, g in got.items())
        result["final_epsilon"] = got.get(self.rounds) or math.nan
        result["noise_multiplier"] = self.noise_multiplier
        return result

