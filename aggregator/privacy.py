"""Differential privacy for training federations: DP-FedAvg (McMahan et al. 2018) with the
noise added once, at finalize, by the aggregator (docs/privacy.md).

The rule, with ``C`` = ``[privacy] clip_norm``, ``z`` = ``noise_multiplier`` and ``m`` =
``[rounds] min_updates`` (the quorum): every update's delta is clipped to L2 norm ``C`` (the
norm bound in force, ``aggregator.robust``), every update weighs 1, and the round's new mean
delta is ``(Σ clipped deltas + N(0, (z·C)² I)) / m``: a fixed denominator. Adding or removing one
device moves the sum by at most ``C``, so the sum's noise is ``z`` times its sensitivity
whatever the number of updates ``n ≥ m`` the round closed with. (Dividing by ``n`` instead
would make the denominator depend on who took part: its sensitivity is up to ``2·C/(n+1)``,
and the same noise would be worth only about ``z/2``.)

The noise of a round is drawn from a generator seeded with SHA-256 of (a secret kept in the
state directory, the run, the round), so replaying the write-ahead log after a crash finalizes a
round with the same bits, and the published model is the same model (exactly once).

The accountant (``dp-accounting``'s PLD accountant, imported only here) composes one
Poisson-subsampled Gaussian event per finalized round at ``q`` = ``[sampling] rate`` (with
``q = 1`` a plain Gaussian mechanism: no amplification). What it composed is a short list of
``(q, z, rounds)`` segments, kept in snapshots and rebuilt by the replay.

With secure aggregation the aggregator never holds the plain sum, so it adds no noise
(``GaussianSum(distributed=True)``): each device adds its share, ``N(0, (z·C)² / m)``
(``device_share_std``, announced in the signed announcement's ``train`` map; the device side is
``fedmq.secagg.noise``). The unmasked sum of ``n >= m`` survivors carries ``n/m`` times the
central noise's variance; fewer than ``m`` survivors is a round below quorum, never published
(docs/privacy.md, "With secure aggregation"). The accountant is the same.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from fedmq.config import AggregatorConfig, RobustConfig
from fedmq.errors import ConfigError
from fedmq.secagg.noise import device_std

if TYPE_CHECKING:
    from aggregator.service import AggregatorService

__all__ = ["NOISE_KEY_FILE", "PLD_GRID", "Accountant", "DifferentialPrivacy", "GaussianSum",
           "load_secret", "norm_config", "pld_epsilon", "stop_before"]

log = logging.getLogger("aggregator.service")

F64 = npt.NDArray[np.float64]

#: The secret the noise is derived from, in ``[durability] state_dir``.
NOISE_KEY_FILE = "dp_noise.key"
_KEY_BYTES = 32

#: The PLD accountant's value discretization interval. Coarser than dp-accounting's default
#: (1e-4) to keep a round's accounting well under a second; the PLD result is an upper bound on
#: epsilon either way (docs/privacy.md has both for the demo's settings).
PLD_GRID = 1e-3

Segment = tuple[float, float, int]  # (sampling rate q, noise multiplier z, rounds)


def norm_config(config: AggregatorConfig) -> RobustConfig:
    """The norm bound's settings: ``[privacy] clip_norm`` is the fixed bound when DP is on
    (``fedmq.config`` has refused a different ``[robust] clip_norm``)."""
    p = config.privacy
    if p.noise_multiplier > 0 and p.clip_norm is not None:
        return replace(config.robust, clip_norm=p.clip_norm)
    return config.robust


def load_secret(state_dir: Path | None) -> bytes:
    """The noise secret: read from the state directory, created there on first use (mode
    0600); without a state directory, a fresh random one (nothing is replayed then)."""
    if state_dir is None:
        return os.urandom(_KEY_BYTES)
    path = state_dir / NOISE_KEY_FILE
    state_dir.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        data = path.read_bytes()
        if len(data) != _KEY_BYTES:
            raise ConfigError(f"{path} holds {len(data)} bytes, not a {_KEY_BYTES}-byte noise "
                              "secret; restore it or start a new state_dir") from None
        return data
    secret = os.urandom(_KEY_BYTES)
    try:
        os.write(fd, secret)
        os.fsync(fd)
    finally:
        os.close(fd)
    return secret


class GaussianSum:
    """The round's noise: ``N(0, (z·C)² I)`` on the sum, derived from (secret, run, round)."""

    def __init__(self, noise_multiplier: float, clip_norm: float, quorum: int,
                 secret: bytes, distributed: bool = False) -> None:
        if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
            raise ValueError(f"noise_multiplier must be finite and > 0; got {noise_multiplier}")
        if not (math.isfinite(clip_norm) and clip_norm > 0) or quorum < 1:
            raise ValueError("clip_norm must be finite and > 0 and quorum >= 1")
        self.noise_multiplier = noise_multiplier
        self.clip_norm = clip_norm
        #: The fixed denominator of the mean: the round's quorum, every update weighing 1.
        self.denominator = float(quorum)
        self._secret = secret
        self._key = (0, 0)
        #: secure aggregation: the devices added the noise, the sum arrives with it
        self.distributed = distributed

    @property
    def std(self) -> float:
        """Standard deviation of each coordinate's noise on the sum."""
        return self.noise_multiplier * self.clip_norm

    @property
    def mean_std(self) -> float:
        """... and on the mean delta: ``z·C / m``."""
        return self.std / self.denominator

    def device_share_std(self) -> float:
        """Distributed noise (secure aggregation): each of ``m`` devices adds
        ``N(0, std² / m)`` so that a quorum's shares sum to the central noise."""
        return device_std(self.noise_multiplier, self.clip_norm, int(self.denominator))

    def at(self, run: int, round_: int) -> None:
        """The round whose noise ``noise`` draws next."""
        self._key = (run, round_)

    def noise(self, size: int) -> F64:
        """The round's noise vector (a new array): the same bits for the same round; zeros
        when the devices added it (``distributed``)."""
        if self.distributed:
            return np.zeros(size, dtype=np.float64)
        run, round_ = self._key
        digest = hashlib.sha256(b"fedmq/dp-noise/v1\0" + self._secret
                                + run.to_bytes(8, "big", signed=True)
                                + round_.to_bytes(8, "big", signed=True)).digest()
        rng = np.random.Generator(np.random.PCG64(int.from_bytes(digest, "big")))
        out: F64 = rng.standard_normal(size)
        out *= self.std
        return out


@functools.lru_cache(maxsize=64)
def pld_epsilon(segments: tuple[Segment, ...], delta: float, grid: float = PLD_GRID) -> float:
    """Epsilon at ``delta`` after the rounds ``segments`` describe (PLD accountant, add/remove
    one device neighbouring)."""
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant

    events: list[dp_accounting.DpEvent] = []
    for q, z, rounds in segments:
        if rounds <= 0:
            continue
        event: dp_accounting.DpEvent = dp_accounting.GaussianDpEvent(z)
        if q < 1.0:
            event = dp_accounting.PoissonSampledDpEvent(q, event)
        events.append(dp_accounting.SelfComposedDpEvent(event, rounds))
    if not events:
        return 0.0
    accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=grid)
    accountant.compose(dp_accounting.ComposedDpEvent(events))
    return float(accountant.get_epsilon(delta))


class Accountant:
    """The privacy spent so far: finalized rounds as ``(q, z, rounds)`` segments."""

    def __init__(self, rate: float, noise_multiplier: float, delta: float) -> None:
        self.rate = rate
        self.noise_multiplier = noise_multiplier
        self.delta = delta
        self.segments: list[Segment] = []

    @property
    def rounds(self) -> int:
        return sum(n for _, _, n in self.segments)

    def _with(self, extra: int) -> tuple[Segment, ...]:
        segs = list(self.segments)
        if extra:
            if segs and segs[-1][:2] == (self.rate, self.noise_multiplier):
                segs[-1] = (self.rate, self.noise_multiplier, segs[-1][2] + extra)
            else:
                segs.append((self.rate, self.noise_multiplier, extra))
        return tuple(segs)

    def epsilon(self, extra: int = 0) -> float:
        """Epsilon now, or after ``extra`` more rounds at the current (q, z)."""
        return pld_epsilon(self._with(extra), self.delta)

    def spend(self) -> float:
        """One more round was finalized with noise: epsilon after it."""
        self.segments = list(self._with(1))
        return self.epsilon()

    def export(self) -> list[list[float]]:
        return [[q, z, n] for q, z, n in self.segments]

    def restore(self, saved: Sequence[Sequence[Any]]) -> None:
        """A snapshot's segments (checked: a damaged one is a ConfigError, not a guess)."""
        segs: list[Segment] = []
        for item in saved:
            q, z, n = float(item[0]), float(item[1]), int(item[2])
            if not (0 < q <= 1 and math.isfinite(z) and z > 0 and n >= 0):
                raise ConfigError(f"the snapshot's privacy record {list(item)} is not valid")
            segs.append((q, z, n))
        self.segments = segs


class DifferentialPrivacy:
    """What the service holds when ``[privacy] noise_multiplier`` > 0."""

    def __init__(self, config: AggregatorConfig, state_dir: Path | None) -> None:
        p = config.privacy
        assert p.clip_norm is not None  # fedmq.config refuses noise without a clip
        try:
            import dp_accounting  # noqa: F401
        except ImportError:
            raise ConfigError("[privacy] noise_multiplier needs the dp-accounting package: "
                              "pip install 'fedmq[aggregator]'") from None
        self.noise = GaussianSum(p.noise_multiplier, p.clip_norm, config.rounds.min_updates,
                                 load_secret(state_dir), distributed=p.secure_aggregation)
        self.accountant = Accountant(config.sampling.rate, p.noise_multiplier, p.delta)
        self.target = p.target_epsilon
        self.epsilon = 0.0

    @classmethod
    def attach(cls, svc: AggregatorService) -> DifferentialPrivacy | None:
        """The service's DP when its config asks for noise: every update then weighs 1 and
        the strategy adds the noise at finalize."""
        if svc.config.privacy.noise_multiplier <= 0:
            return None
        from aggregator.strategies import StreamingFold

        dp = cls(svc.config, svc.state_dir)
        assert isinstance(svc.strategy, StreamingFold)  # DP is refused for statistics
        svc.strategy.noisy = dp.noise
        svc.folder.unit_weight = True
        return dp

    def finalized(self, round_: int) -> dict[str, float]:
        """A round was finalized (its noisy result published, or abandoned after the noise):
        spend it, say so, and return the metrics its summary carries."""
        self.epsilon = self.accountant.spend()
        log.info("round %d: differential privacy epsilon %.4g at delta %g after %d noisy "
                 "rounds (q %g, noise multiplier %g)", round_, self.epsilon,
                 self.accountant.delta, self.accountant.rounds, self.accountant.rate,
                 self.noise.noise_multiplier)
        return self.metrics()

    def next_epsilon(self) -> float:
        return self.accountant.epsilon(extra=1)

    def exhausted(self) -> bool:
        """Whether one more round would take epsilon past ``target_epsilon``."""
        return self.target is not None and self.next_epsilon() > self.target

    def metrics(self) -> dict[str, float]:
        """For the round summary and the model's metrics."""
        return {"dp_epsilon": self.epsilon, "dp_delta": self.accountant.delta,
                "dp_noise_multiplier": self.noise.noise_multiplier,
                "dp_noise_std": self.noise.mean_std, "dp_rounds": float(self.accountant.rounds)}

    def export(self) -> list[list[float]]:
        return self.accountant.export()

    def restore(self, saved: Sequence[Sequence[Any]]) -> None:
        self.accountant.restore(saved)
        self.epsilon = self.accountant.epsilon()


def stop_before(svc: AggregatorService, now: float) -> bool:
    """Before a round opens: end the run instead when that round would take epsilon past
    ``[privacy] target_epsilon`` (one line says so)."""
    dp = svc.privacy
    if dp is None or not dp.exhausted():
        return False
    log.warning("privacy budget: one more round would take epsilon from %.4g to %.4g, above "
                "[privacy] target_epsilon = %g (delta %g); stopping after %d noisy rounds",
                dp.epsilon, dp.next_epsilon(), dp.target, dp.accountant.delta,
                dp.accountant.rounds)
    svc._announce(now, open_=False)  # late devices: there is nothing to train
    if svc._replay_now is None and svc.telemetry.evaluation.versions:
        svc._final_at = svc.clock()  # as after max_rounds: the devices score the last model
    else:
        svc.done.set()
        svc._stopping.set()
    return True
