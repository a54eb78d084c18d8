"""FedBuff's server step: each buffer's staleness-weighted mean goes through the strategy, so
``server_lr`` is FedBuff's server learning rate and ``fedavgm`` its server momentum, checked
against numpy over buffers with stale updates."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from test_fedbuff_buffers import SHAPES, _aggregator, _config, _message

from fedmq.config import StrategyConfig


@pytest.mark.parametrize(("name", "server_lr", "momentum"),
                         [("fedavg", 0.5, None), ("fedavgm", 1.0, 0.9), ("fedavgm", 0.3, 0.5)])
def test_server_learning_rate_and_momentum_follow_the_buffers(
        name: str, server_lr: float, momentum: float | None) -> None:
    strategy = StrategyConfig(name=name, server_lr=server_lr, momentum=momentum)  # type: ignore[arg-type]
    agg = _aggregator(replace(_config(buffer_size=3), strategy=strategy))
    rng = np.random.default_rng(1)
    model = {k: v.astype(np.float64) for k, v in agg.model.items()}
    m = {k: np.zeros_like(v) for k, v in model.items()}
    for v in range(5):
        num = {k: np.zeros_like(x) for k, x in model.items()}
        den = 0.0
        for i in range(3):
            tau = min(v, i)  # 0, 1 and 2 versions stale once the run allows it
            n = int(rng.integers(1, 50))
            delta = {k: rng.normal(0, 0.1, s).astype(np.float32) for k, s in SHAPES.items()}
            agg.step(_message(f"d{i}v{v}", v + 1 - tau, v - tau, delta, n=n))
            for k in num:
                num[k] += n / math.sqrt(1 + tau) * delta[k].astype(np.float64)
            den += n
        assert agg.version == v + 1
        for k, acc in num.items():
            m[k] = (momentum or 0.0) * m[k] + acc / den
            np.testing.assert_allclose(agg.model[k], model[k] + server_lr * m[k], rtol=1e-5,
                                       atol=1e-6)
            model[k] = agg.model[k].astype(np.float64)  # the published float32 is the next base
