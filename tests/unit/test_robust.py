"""The per-update norm bound (issue 9): the clipped fold and the adaptive bound against
references written here from docs/robustness.md, through the real service on a memory transport.

References decode with ``fedmq.compression`` (the codecs' numpy reference decoder), compute
squared norms in float64 in the kernels' order (``naive.lane_sq_norm``, so both sides pick
the same clip factor to the bit) and average in float64.
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Sequence
from typing import Literal

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.robust import ChunkBudget, NormBound, bootstrap_size, scale_for
from aggregator.service import AggregatorService
from fedmq import codec
from fedmq.chunking import split_update
from fedmq.compression import decode_all, decode_range, encode
from fedmq.config import (
    AggregatorConfig,
    CompressionConfig,
    LimitsConfig,
    ModelConfig,
    RobustConfig,
    RoundsConfig,
)
from fedmq.memory_transport import MemoryTransport
from fedmq.topics import Topics
from fedmq.transport import Message
from fedmq.wire import ModelUpdate, Tensor

from naive import lane_sq_norm

FED = "robust-test"
TOPICS = Topics(FED)
LAYERS = [100, 60, 10]
F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
SETTINGS = settings(max_examples=30, deadline=None)
Codec = Literal["fp32", "fp16", "int8", "topk"]
CODEC_NAMES: tuple[Codec, ...] = ("fp32", "fp16", "int8", "topk")


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now




def service(n: int, robust: RobustConfig, codec_name: Codec = "fp32",
            limits: LimitsConfig | None = None) -> tuple[AggregatorService, MemoryTransport]:
    config = AggregatorConfig(
        federation=FED, model=ModelConfig(layers=list(LAYERS), seed=2),
        rounds=RoundsConfig(min_updates=n, max_updates=n, deadline_s=1e6, grace_s=1.0),
        compression=CompressionConfig(codec=codec_name),
        limits=limits or LimitsConfig(), robust=robust)
    transport = MemoryTransport()
    agg = AggregatorService(config, transport, clock=Clock())
    agg.start(connect_timeout=0.0)
    agg.stop()
    return agg, transport


def make_update(agg: AggregatorService, device: str, delta: dict[str, F32], codec_name: str,
                examples: int, *, max_bytes: int | None = None) -> list[ModelUpdate]:
    def enc(name: str, a: npt.ArrayLike) -> Tensor:
        return encode(name, a, codec_name, fraction=0.5)

    tensors = tuple(enc(k, v) for k, v in delta.items())
    update = ModelUpdate(federation=FED, device_id=device, round=agg.round,
                         base_version=agg.version, update_id=f"u-{device}-{agg.round}",
                         num_examples=examples, tensors=tensors, run=agg.run)
    if max_bytes is None:
        return [update]
    return split_update(update, delta, enc, max_bytes)


def decoded(msgs: Sequence[ModelUpdate], total: int, offsets: dict[str, int]
            ) -> list[tuple[int, F64]]:
    """Each message's values, in float64, as (flat start, values) per tensor range."""
    out = []
    for m in msgs:
        for t in m.tensors:
            out.append((offsets[t.name] + t.offset, decode_range(t).astype(np.float64)))
    return out


def sq_of(t: Tensor) -> float:
    """A tensor's squared norm as the kernels take it: ``topk`` over its kept values only."""
    v = decode_range(t).astype(np.float64)
    if t.codec == "topk":
        v = v[np.frombuffer(t.indices or b"", "<u4").astype(np.int64)]
    return lane_sq_norm(v)


def published(transport: MemoryTransport) -> dict[str, F32]:
    models = [codec.decode(m.payload) for m in transport.published
              if m.topic == TOPICS.model and m.payload]
    return decode_all(models[-1].tensors)  # type: ignore[union-attr]


def deltas(seed: int, n: int, big: Sequence[float]) -> list[dict[str, F32]]:
    rng = np.random.default_rng(seed)
    shapes = {k: v.shape for k, v in _model().items()}
    return [{k: (rng.standard_normal(s) * 0.01 * big[i % len(big)]).astype(np.float32)
             for k, s in shapes.items()} for i in range(n)]


@functools.cache
def _model() -> dict[str, F32]:
    from fedmq.models import init_mlp
    return init_mlp(LAYERS, 2)


# ---------------------------------------------------------------- the clipped fold


@SETTINGS
@given(codec_name=st.sampled_from(CODEC_NAMES),
       chunked=st.booleans(), seed=st.integers(0, 2**31),
       big=st.lists(st.sampled_from([0.5, 1.0, 1.0, 3.0, 50.0, 1e6]), min_size=1, max_size=5),
       mode=st.sampled_from(["fixed", "adaptive"]))
def test_clipped_fold_equals_numpy_reference(codec_name: Codec, chunked: bool, seed: int,
                                             big: list[float], mode: str) -> None:
    n = 5
    fixed = 0.05
    robust = RobustConfig(clip_norm=fixed) if mode == "fixed" else RobustConfig()
    agg, transport = service(n, robust, codec_name)
    base = {k: v.copy() for k, v in agg.model.items()}
    offsets = dict(zip(agg.spec.names, agg.spec.offsets, strict=True))
    # bootstrap_size(5, 5) is 5: every update is held until all are in, then the estimate is
    # their median; a fixed bound applies from the first.
    ups = [make_update(agg, f"d{i}", d, codec_name, 10 + i,
                       max_bytes=4096 if chunked else None)
           for i, d in enumerate(deltas(seed, n, big))]
    if chunked:
        assert any(len(u) > 1 for u in ups)
    values = [decoded(u, agg.spec.total, offsets) for u in ups]
    norms = [math.sqrt(sum(sq_of(t) for m in u for t in m.tensors)) for u in ups]
    chunk_sq = [[sq_of(t) for m in u for t in m.tensors] for u in ups]
    bound = fixed if mode == "fixed" else min(3.0 * statistics.median(norms), 10_000.0)

    for u in ups:
        for m in u:
            agg.step(Message(TOPICS.update(m.device_id), codec.encode(m), qos=1))
    assert agg.stats.rounds_completed == 1, dict(agg.stats.rejected)

    acc = np.zeros(agg.spec.total, np.float64)
    weights = [10.0 + i for i in range(n)]
    clipped = 0
    for i, vals in enumerate(values):
        if len(ups[i]) == 1:
            scales = [scale_for(norms[i], bound)] * len(vals)
        else:  # per message, in order: a message's tensors share its chunk's factor
            # Chunks that arrive before the estimate exists (here: every one, as it starts
            # with the fifth update) are held back and folded under the bound it gives.
            budget = ChunkBudget(bound)
            scales = []
            for m in ups[i]:
                sq = sum(sq_of(t) for t in m.tensors)
                s = budget.take(sq, clip=True)
                assert s is not None
                scales += [s] * len(m.tensors)
            # Independent of the budget's code: under the bound nothing is scaled, and over
            # it the folded norm is the bound.
            folded = math.sqrt(sum(s * s * q for s, q in zip(scales, chunk_sq[i], strict=True)))
            assert folded == pytest.approx(min(norms[i], bound), rel=1e-9)
        clipped += norms[i] > bound
        for (start, v), s in zip(vals, scales, strict=True):
            acc[start:start + v.size] += (weights[i] * s) * v
    assert agg.stats.clipped == clipped
    mean = agg.spec.split(acc / sum(weights))
    got = published(transport)
    for name, b in base.items():
        want = (b.astype(np.float64) + mean[name]).astype(np.float32)
        np.testing.assert_allclose(got[name], want, rtol=1e-6, atol=1e-7, err_msg=name)


def test_reject_mode_turns_away_updates_over_the_bound() -> None:
    agg, _ = service(2, RobustConfig(mode="reject", clip_norm=5.0))
    small, huge = deltas(1, 2, [1.0, 1e4])
    for i, d in enumerate((small, huge)):
        (m,) = make_update(agg, f"d{i}", d, "fp32", 10)
        agg.step(Message(TOPICS.update(m.device_id), codec.encode(m), qos=1))
    assert agg.stats.accepted == 1
    assert agg.stats.rejected == {"norm_bound": 1}


def test_reject_mode_drops_the_rest_of_a_chunked_update_over_the_bound() -> None:
    agg, _ = service(2, RobustConfig(mode="reject", clip_norm=5.0))
    (d,) = deltas(2, 1, [1e3])
    chunks = make_update(agg, "d0", d, "fp32", 10, max_bytes=4096)
    assert len(chunks) >= 2
    for m in chunks:
        agg.step(Message(TOPICS.update("d0"), codec.encode(m), qos=1))
    assert agg.stats.accepted == 0
    assert agg.stats.rejected["norm_bound"] == len(chunks)


def test_weight_cap_counts_an_oversized_claim_with_the_cap() -> None:
    agg, transport = service(2, RobustConfig(mode="off"),
                             limits=LimitsConfig(max_examples=100))
    a, b = deltas(3, 2, [1.0])
    for dev, d, n in (("d0", a, 10**9), ("d1", b, 100)):
        (m,) = make_update(agg, dev, d, "fp32", n)
        agg.step(Message(TOPICS.update(dev), codec.encode(m), qos=1))
    assert agg.stats.rounds_completed == 1
    got = published(transport)
    for name, base in _model().items():  # equal weights: the plain mean of the two deltas
        want = (base.astype(np.float64) + (a[name].astype(np.float64) + b[name]) / 2)
        np.testing.assert_allclose(got[name], want.astype(np.float32), rtol=1e-6, atol=1e-7)


def test_weight_mode_reject_turns_an_oversized_claim_away() -> None:
    agg, _ = service(2, RobustConfig(), limits=LimitsConfig(max_examples=100,
                                                            weight_mode="reject"))
    (d,) = deltas(4, 1, [1.0])
    (m,) = make_update(agg, "d0", d, "fp32", 101)
    agg.step(Message(TOPICS.update("d0"), codec.encode(m), qos=1))
    assert agg.stats.rejected == {"invalid_weight": 1}


# ---------------------------------------------------------------- the adaptive bound


def reference_bounds(rounds: Sequence[Sequence[float]], k: int, mult: float, ceiling: float,
                     *, q: float, eta: float) -> list[list[float]]:
    """The bound each norm was folded under, round by round (docs/robustness.md)."""
    est: float | None = None
    early: list[float] = []
    out = []
    for norms in rounds:
        seen = below = 0
        held = 0
        bounds: list[float] = []
        for x in norms:
            if est is None:
                early.append(x)
                held += 1
                if len(early) >= k:
                    est = statistics.median(early)
                    bounds += [min(ceiling, mult * est)] * held
                    held = 0
                continue
            bounds.append(min(ceiling, mult * est))
            seen += 1
            below += x <= est
        if held:  # the round closes before the bootstrap is full: start from what is in
            est = statistics.median(early)
            bounds += [min(ceiling, mult * est)] * held
        if seen:
            est = est * math.exp(-eta * (below / seen - q))  # type: ignore[operator]
        out.append(bounds)
    return out


norm_values = st.floats(min_value=1e-6, max_value=1e30, allow_nan=False)


@settings(max_examples=300, deadline=None)
@given(rounds=st.lists(st.lists(norm_values, min_size=1, max_size=12), min_size=1, max_size=12),
       k=st.integers(1, 10), mult=st.floats(0.5, 5), q=st.floats(0.05, 0.95),
       eta=st.floats(0.01, 2), ceiling=st.sampled_from([1e3, 1e30]))
def test_adaptive_bound_equals_reference(  # noqa: PLR0917 (hypothesis passes them by name)
        rounds: list[list[float]], k: int, mult: float, q: float, eta: float,
        ceiling: float) -> None:
    nb = NormBound(RobustConfig(clip_multiplier=mult, target_quantile=q, adapt_rate=eta,
                                max_norm=ceiling), bootstrap=k)
    want = reference_bounds(rounds, k, mult, ceiling, q=q, eta=eta)
    for norms, expected in zip(rounds, want, strict=True):
        got: list[float] = []
        held = 0
        for x in norms:
            if nb.bootstrapping:
                held += 1
            else:
                got.append(nb.bound())
            nb.observe(x)
            if held and not nb.bootstrapping:
                got += [nb.bound()] * held
                held = 0
        if held:
            nb.start()
            got += [nb.bound()] * held
        assert got == expected
        before = nb.estimate
        nb.end_round()
        if before is not None and nb.estimate is not None:
            # One round moves the estimate by a bounded factor, whatever the norms were.
            step = math.exp(eta * max(q, 1 - q)) * (1 + 1e-12)
            assert before / step <= nb.estimate <= before * step


def test_bound_state_survives_export_and_restore() -> None:
    nb = NormBound(RobustConfig(), bootstrap=3)
    for x in (1.0, 2.0):
        nb.observe(x)
    saved = nb.export()
    again = NormBound(RobustConfig(), bootstrap=3)
    again.restore(saved)
    for b in (nb, again):
        b.observe(4.0)
        b.observe(0.5)
        b.end_round()
    assert nb.estimate == again.estimate
    assert nb.estimate is not None
    assert nb.estimate == 2.0 * math.exp(-0.2 * (1.0 - 0.5))


def test_bootstrap_size() -> None:
    assert bootstrap_size(20, 20) == 20
    assert bootstrap_size(2, 100) == 8  # never a median of one or two
    assert bootstrap_size(1, 1) == 1
    assert bootstrap_size(1000, 1000) == 32


def test_initial_norm_and_fixed_bound_skip_the_bootstrap() -> None:
    assert not NormBound(RobustConfig(initial_norm=2.0)).bootstrapping
    assert NormBound(RobustConfig(initial_norm=2.0)).bound() == 6.0
    assert NormBound(RobustConfig(clip_norm=1.5)).bound() == 1.5
    assert not NormBound(RobustConfig(mode="off")).bootstrapping
    assert NormBound(RobustConfig(mode="off")).scale(1e9) == 1.0


def test_chunk_budget_in_reject_mode_stays_rejected() -> None:
    b = ChunkBudget(2.0)
    assert b.take(1.0, clip=False) == 1.0
    assert b.take(9.0, clip=False) is None
    assert b.rejected
    assert ChunkBudget.restore(b.export()).rejected

