"""Fuzz: poisoned updates over many rounds (issue 9, acceptance 6).

One ``AggregatorService`` on a ``MemoryTransport`` is driven by hand with ``step()`` and a fake
clock through ``ROUNDS`` rounds; a seeded ``random.Random`` builds each round (not hypothesis: the
case counts are exact and the run takes seconds). A round mixes honest updates (a shared
direction plus noise, realistic ``num_examples``, every codec, some chunked with
``fedmq.chunking.split_update``) with poisoned ones of three classes:

- ``huge``: finite values as large as each codec carries: every coordinate ±3e38 (fp32), ±65504
  (fp16), int8 at full scale (the quantizer's largest finite scale, or a scale of FLT_MAX with
  values -1, 0 and 1), topk with such kept values; all of one sign, mixed signs, or one huge
  coordinate among small ones.
- ``max_weight``: ``num_examples`` = ``max_examples``, ``max_examples + 1``, 2**63 - 1 and 2**64 - 1
  (not an int64: malformed), with a small delta against the honest direction, a moderate one, or
  a huge one.
- ``bit_flip``: a valid update (whole or one chunk of a chunked one) with 1 to 3 bits flipped
  anywhere, in the header, in the tensor bytes, or in ``num_examples``; any outcome will do.

Each configuration (adaptive clip, reject, off with ``server_lr`` 4, a fixed clip norm with
``server_lr`` 0.5, and adaptive clip with ``weight_mode = "reject"``) runs the same kind of stream.
Per message: ``step()`` never raises, and it counts at most one acceptance or one rejection (a
reason of ``REJECT_REASONS``); per update, the outcome is the one its class determines. Per round:
the round either closes (version + 1, the published model equals ``agg.model``, both finite
float32) or, with ``mode = "off"`` only, is abandoned (counted in ``stats.abandoned``, same version
and model) and the next round opens on the same version. With a bound in force (clip or reject)
no round is abandoned, the weights are counted capped, and honest updates are never clipped.

Every accepted update, and what was folded of each chunked update left incomplete, is folded
under the round's published ``norm_bound`` ``B``, in the first round too: while the adaptive
estimate bootstraps the service holds every accepted update and chunk back, and folds them under
the bound the bootstrap gives (docs/robustness.md; the stream's honest norms are never zero, so
the bootstrap always ends in round 1). So ``clipped_updates`` is exactly the number of accepted
updates over ``B``, in reject mode too: there an update held back is clipped, not rejected (a
whole one is judged on arrival against ``max_norm`` during the bootstrap, so one of norm 50 is
accepted, and a chunked one is not judged while its chunks are held: accepted if all of them
were; outside the bootstrap an accepted update is within ``B``).

With ``c_j = min(|Δ_j|, B)`` the norm update ``j`` was folded with, ``W`` the weight of the
round's whole updates and ``w_i`` that of each chunked update left incomplete (it counts only
where it delivered, docs/protocol.md):

- the model moves by at most ``server_lr * sqrt(Σ_j w_j/W c_j² + Σ_i w_i/(W + w_i) c_i²)`` in L2,
  which is at most ``server_lr * norm_bound`` when no update is incomplete (checked as such, in
  every round); the rounds where the model moved farther, all with incomplete updates, are
  printed;
- the change divided by ``server_lr`` is within ``(W_P + I) / (W + I) * |h| + Σ_j w_j c_j / W``
  (``j`` over untrusted and incomplete updates) of the honest updates' weighted mean ``h``, where
  ``W_P`` is the (capped) weight of the accepted untrusted updates and ``I`` that of the incomplete
  ones: an untrusted update pulls the mean at most by its share of the weight times its bound.
  The final model is therefore within the sum of these, over every round from the first, of the
  honest-only reference.

Run with ``-s`` to see the per-class counts and how far the model ended from the honest one.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt
import pytest

from aggregator.service import ABANDON_REASONS, REJECT_REASONS, AggregatorService
from fedmq import codec
from fedmq.chunking import ModelAssembler, split_update
from fedmq.compression import decode_all, decode_range, encode
from fedmq.config import (
    AggregatorConfig,
    LimitsConfig,
    ModelConfig,
    RobustConfig,
    RoundsConfig,
    StrategyConfig,
)
from fedmq.errors import DecodeError
from fedmq.memory_transport import MemoryTransport
from fedmq.topics import Topics
from fedmq.transport import Message
from fedmq.wire import GlobalModel, ModelUpdate, RoundAnnouncement, RoundSummary, Tensor

FED = "poison-fed"
TOPICS = Topics(FED)
#: 5146 parameters: every codec splits into chunks at ``CHUNK_BYTES``.
LAYERS = [96, 48, 10]
CHUNK_BYTES = 4096
MAX_EXAMPLES = 1000
T0 = 10_000.0
GRACE_S = 5.0
ROUNDS = 30
MIN_UPDATES = 6
HONEST = 8
#: Poisoned updates per round of each class (every ``CLEAN_EVERY``-th round has none).
HUGE_PER_ROUND = 4
WEIGHT_PER_ROUND = 2
FLIPS_PER_ROUND = 4
CLEAN_EVERY = 5
#: Each configuration's stream is seeded with this plus its index in ``SETUPS``.
SEED = 9000
#: Honest deltas: this much along a shared direction, plus this noise per coordinate.
SIGNAL = 0.3
NOISE = 0.005

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
Encoder = Callable[[str, F32], Tensor]
FLT_MAX = float(np.finfo(np.float32).max)
FP16_MAX = 65504.0
_U63 = (1 << 63) - 1
_U64 = (1 << 64) - 1


# ---------------------------------------------------------------- configurations


@dataclass(frozen=True)
class Setup:
    robust: RobustConfig
    weight_mode: Literal["cap", "reject"] = "cap"
    server_lr: float = 1.0

    @property
    def bounded(self) -> bool:
        return self.robust.mode != "off"


SETUPS: dict[str, Setup] = {
    "clip-adaptive": Setup(RobustConfig()),
    "reject-adaptive": Setup(RobustConfig(mode="reject")),
    "off": Setup(RobustConfig(mode="off"), server_lr=4.0),
    "clip-fixed": Setup(RobustConfig(clip_norm=2.0), server_lr=0.5),
    "weight-reject": Setup(RobustConfig(), weight_mode="reject"),
}


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_service(setup: Setup) -> tuple[AggregatorService, MemoryTransport, FakeClock]:
    """An aggregator with round 1 open on model version 0, its worker already stopped."""
    config = AggregatorConfig(
        federation=FED,
        model=ModelConfig(layers=list(LAYERS), seed=5),
        rounds=RoundsConfig(min_updates=MIN_UPDATES, max_updates=100_000, deadline_s=1e7,
                            grace_s=GRACE_S),
        limits=LimitsConfig(max_examples=MAX_EXAMPLES, weight_mode=setup.weight_mode),
        strategy=StrategyConfig(server_lr=setup.server_lr),
        robust=setup.robust,
    )
    clock = FakeClock()
    transport = MemoryTransport()
    agg = AggregatorService(config, transport, clock=clock)
    agg.start(connect_timeout=0.0)
    agg.stop()
    assert (agg.round, agg.version) == (1, 0)
    return agg, transport, clock


# ---------------------------------------------------------------- encoders


def _std(codec_name: str, **options: float | int | str) -> Encoder:
    def enc(name: str, x: F32) -> Tensor:
        return encode(name, x, codec_name, **options)  # type: ignore[arg-type]
    return enc


def _max_scale_q(x: F32) -> bytes:
    """int8 values for a scale of FLT_MAX: ±1 where ``x`` is huge, 0 elsewhere."""
    q = np.clip(np.rint(x.astype(np.float64) / FLT_MAX), -1, 1).astype(np.int8)
    return q.tobytes()


def _int8_max_scale(block: int) -> Encoder:
    """int8 with every scale FLT_MAX: values -FLT_MAX, 0 or FLT_MAX (finite: |q| <= 1)."""
    def enc(name: str, x: F32) -> Tensor:
        scales = np.full(-(-x.size // block), FLT_MAX, "<f4").tobytes()
        return Tensor(name=name, dtype="float32", shape=(x.size,), codec="int8",
                      data=_max_scale_q(x), block=block, scales=scales)
    return enc


def _topk_max_scale(fraction: float, block: int) -> Encoder:
    """topk keeping the largest ``fraction``, as int8 values with every scale FLT_MAX."""
    def enc(name: str, x: F32) -> Tensor:
        k = min(x.size, max(1, round(fraction * x.size)))
        idx = np.sort(np.argpartition(np.abs(x), x.size - k)[x.size - k:])
        scales = np.full(-(-k // block), FLT_MAX, "<f4").tobytes()
        return Tensor(name=name, dtype="float32", shape=(x.size,), codec="topk",
                      data=_max_scale_q(x[idx]), block=block, scales=scales,
                      indices=idx.astype("<u4").tobytes(), values="int8")
    return enc


ENCODERS: dict[str, Encoder] = {
    "fp32": _std("fp32"),
    "fp16": _std("fp16"),
    "int8": _std("int8", block=64),
    "topk-int8": _std("topk", fraction=0.25, block=32),
    "topk-fp16": _std("topk", fraction=0.5, values="fp16"),
    "int8-maxscale": _int8_max_scale(64),
    "topk-maxscale": _topk_max_scale(0.25, 16),
}
HONEST_CODECS = ("fp32", "fp16", "int8", "topk-int8", "topk-fp16")
#: The largest finite value each encoder carries (int8: the quantizer nudges its scale down).
HUGE_VALUE = {"fp32": 3e38, "fp16": FP16_MAX, "int8": FLT_MAX, "topk-int8": FLT_MAX,
              "topk-fp16": FP16_MAX, "int8-maxscale": FLT_MAX, "topk-maxscale": FLT_MAX}
HUGE_PATTERNS = ("all+", "all-", "mixed", "single")
HUGE_KINDS = [(c, p) for c in HUGE_VALUE for p in HUGE_PATTERNS]
WEIGHTS = (MAX_EXAMPLES, MAX_EXAMPLES + 1, _U63, _U64)
WEIGHT_DELTAS = ("small", "moderate", "huge")
WEIGHT_KINDS = [(n, d) for n in WEIGHTS for d in WEIGHT_DELTAS]
FLIP_REGIONS = ("anywhere", "header", "tensor", "num_examples")
FLIP_KINDS = [(c, r) for c in HONEST_CODECS for r in FLIP_REGIONS]


# ---------------------------------------------------------------- updates


@dataclass
class Sent:
    """One update of the stream: its messages (encoded) and what became of each."""

    cls: str  # "honest", "huge", "max_weight", "bit_flip"
    kind: str
    device: str
    payloads: list[bytes]
    #: The weight it counts with if accepted (``None`` for a bit flip: read from what arrived).
    weight: float | None
    #: Update outcomes its class allows (``None``: any).
    allowed: frozenset[str] | None
    outcomes: list[str] = field(default_factory=list)
    #: The norm bound in force when each message arrived.
    bounds: list[float] = field(default_factory=list)
    #: Whether each message arrived while the adaptive estimate bootstrapped (held back if
    #: accepted or folded).
    held: list[bool] = field(default_factory=list)

    @property
    def chunked(self) -> bool:
        return len(self.payloads) > 1

    @property
    def outcome(self) -> str:
        if "accepted" in self.outcomes:
            return "accepted"
        reasons = [o for o in self.outcomes if o != "folded"]
        return f"rejected:{reasons[0]}" if reasons else "pending"

    @property
    def incomplete(self) -> bool:
        """Folded in part and never counted whole: it counts where it delivered."""
        return "folded" in self.outcomes and "accepted" not in self.outcomes

    def received(self) -> list[ModelUpdate]:
        """The messages the service took (accepted or folded), decoded."""
        return [codec.decode_as(p, ModelUpdate) for p, o in zip(self.payloads, self.outcomes,
                                                                  strict=True)
                if o in ("accepted", "folded")]

    def counted_weight(self) -> float:
        if self.weight is not None:
            return self.weight
        return float(min(self.received()[0].num_examples, MAX_EXAMPLES))

    def describe(self, i: int = -1) -> str:
        which = f" message {i} of {len(self.payloads)}" if i >= 0 else ""
        head = self.payloads[max(i, 0)][:120].hex()
        return (f"class={self.cls} kind={self.kind} device={self.device}{which} "
                f"outcomes={self.outcomes} payload={head}...")


class Stream:
    """Seeded builders of one configuration's rounds."""

    def __init__(self, seed: int, agg: AggregatorService) -> None:
        self.rng = random.Random(seed)
        self.np_rng = np.random.default_rng(seed)
        self.agg = agg
        self.names = list(agg.model)
        self.shapes = {n: a.shape for n, a in agg.model.items()}
        self.offsets = dict(zip(agg.spec.names, agg.spec.offsets, strict=True))
        self.total = agg.spec.total
        g = self.np_rng.standard_normal(self.total)
        #: The direction honest devices share (unit norm).
        self.direction: F64 = g / np.linalg.norm(g)
        self.turns: Counter[str] = Counter()

    def split(self, flat: F64) -> dict[str, F32]:
        out = {}
        for name in self.names:
            start, shape = self.offsets[name], self.shapes[name]
            size = math.prod(shape)
            out[name] = flat[start:start + size].astype(np.float32).reshape(shape)
        return out

    def honest_flat(self) -> F64:
        noise = self.np_rng.standard_normal(self.total) * NOISE
        return SIGNAL * self.direction + noise

    def build(self, device: str, uid: str, arrays: dict[str, F32], enc_name: str, *, n: int,
              chunked: bool) -> list[bytes]:
        enc = ENCODERS[enc_name]
        tensors = tuple(dataclasses.replace(enc(k, a.reshape(-1)), shape=a.shape)
                        for k, a in arrays.items())
        msg = ModelUpdate(federation=FED, device_id=device, round=self.agg.round,
                          base_version=self.agg.version, update_id=uid, num_examples=n,
                          tensors=tensors, metrics={"loss": 0.25}, run=self.agg.run)
        msgs = split_update(msg, arrays, enc, CHUNK_BYTES) if chunked else [msg]
        assert not chunked or len(msgs) > 1, f"{enc_name} did not split"
        for m in msgs:
            for t in m.tensors:
                assert bool(np.isfinite(decode_range(t)).all()), f"{enc_name}: not finite"
        return [codec.encode(m) for m in msgs]

    def _ids(self, prefix: str) -> tuple[str, str]:
        self.turns[prefix] += 1
        i = self.turns[prefix]
        return f"{prefix}-{i}", f"{prefix}-uid-r{self.agg.round}-{i}"

    def honest(self, i: int) -> Sent:
        device, uid = f"honest-{i}", f"honest-uid-r{self.agg.round}-{i}"
        n = self.rng.randint(20, 600)
        enc = HONEST_CODECS[(self.agg.round + i) % len(HONEST_CODECS)]
        payloads = self.build(device, uid, self.split(self.honest_flat()), enc, n=n,
                              chunked=i % 3 == 0)
        return Sent("honest", enc, device, payloads, float(n), frozenset({"accepted"}))

    def huge_flat(self, enc: str, pattern: str) -> F64:
        big = HUGE_VALUE[enc]
        if pattern == "single":
            flat = self.honest_flat()
            flat[self.rng.randrange(self.total)] = self.rng.choice([big, -big])
            return flat
        if pattern == "mixed":
            return np.where(self.np_rng.random(self.total) < 0.5, big, -big)
        return np.full(self.total, big if pattern == "all+" else -big)

    def huge(self, setup: Setup) -> Sent:
        turn = self.turns["huge-kind"]
        self.turns["huge-kind"] += 1
        enc, pattern = HUGE_KINDS[turn % len(HUGE_KINDS)]
        chunked = (turn + turn // len(HUGE_KINDS)) % 2 == 1  # each kind both ways
        device, uid = self._ids("huge")
        n = self.rng.choice([1, 50, 500, MAX_EXAMPLES])
        payloads = self.build(device, uid, self.split(self.huge_flat(enc, pattern)), enc, n=n,
                              chunked=chunked)
        allowed = "rejected:norm_bound" if setup.robust.mode == "reject" else "accepted"
        return Sent("huge", f"{enc}/{pattern}/{'chunked' if chunked else 'whole'}", device,
                    payloads, float(n), frozenset({allowed}))

    def max_weight(self, setup: Setup) -> Sent:
        turn = self.turns["weight-kind"]
        self.turns["weight-kind"] += 1
        n, delta = WEIGHT_KINDS[turn % len(WEIGHT_KINDS)]
        chunked = (turn + turn // len(WEIGHT_KINDS)) % 2 == 1
        enc = HONEST_CODECS[turn % len(HONEST_CODECS)]
        if delta == "small":  # against the honest direction, with an honest norm
            flat = -self.honest_flat()
        elif delta == "moderate":
            g = self.np_rng.standard_normal(self.total)
            flat = 50.0 * g / np.linalg.norm(g)
        else:
            enc = "fp32"
            flat = self.huge_flat("fp32", "mixed")
        device, uid = self._ids("weight")
        payloads = self.build(device, uid, self.split(flat), enc, n=n, chunked=chunked)
        if n > _U63:
            allowed = {"rejected:malformed"}
        elif n > MAX_EXAMPLES and setup.weight_mode == "reject":
            allowed = {"rejected:invalid_weight"}
        elif setup.robust.mode == "reject" and delta == "huge":
            allowed = {"rejected:norm_bound"}
        elif setup.robust.mode == "reject" and delta == "moderate":
            # Over the adaptive bound (accepted while the estimate bootstraps: ``Run.allowed``).
            allowed = {"rejected:norm_bound"}
        else:
            allowed = {"accepted"}
        label = {MAX_EXAMPLES: "max", MAX_EXAMPLES + 1: "max+1", _U63: "2^63-1",
                 _U64: "2^64-1"}[n]
        return Sent("max_weight", f"{label}/{delta}/{'chunked' if chunked else 'whole'}",
                    device, payloads, float(min(n, MAX_EXAMPLES)), frozenset(allowed))

    def flip(self) -> Sent:
        turn = self.turns["flip-kind"]
        self.turns["flip-kind"] += 1
        enc, region = FLIP_KINDS[turn % len(FLIP_KINDS)]
        chunked = (turn + turn // len(FLIP_KINDS)) % 2 == 1
        device, uid = self._ids("flip")
        payloads = self.build(device, uid, self.split(self.honest_flat()), enc,
                              n=self.rng.randint(1, MAX_EXAMPLES), chunked=chunked)
        which = self.rng.randrange(len(payloads))
        payloads[which] = self.flipped(payloads[which], region)
        return Sent("bit_flip", f"{enc}/{region}/{'chunked' if chunked else 'whole'}", device,
                    payloads, None, None)

    def flipped(self, payload: bytes, region: str) -> bytes:
        """``payload`` with 1 to 3 bits flipped in ``region``."""
        tensors = payload.index(b"\xa7tensors")
        metrics = payload.rindex(b"\xa7metrics")
        if region == "header":  # before the tensors, and the metrics and chunk fields after
            positions = [*range(tensors), *range(metrics, len(payload))]
        elif region == "tensor":
            positions = list(range(tensors, metrics))
        elif region == "num_examples":
            key = payload.index(b"\xacnum_examples") + 13
            first = payload[key]
            size = {0xcc: 2, 0xcd: 3, 0xce: 5, 0xcf: 9, 0xd0: 2, 0xd1: 3, 0xd2: 5,
                    0xd3: 9}.get(first, 1)
            positions = list(range(key, key + size))
        else:
            positions = list(range(len(payload)))
        b = bytearray(payload)
        for _ in range(self.rng.choice([1, 1, 2, 3])):
            b[self.rng.choice(positions)] ^= 1 << self.rng.randrange(8)
        return bytes(b)

    def flat(self, msgs: Sequence[ModelUpdate]) -> F64:
        """What the messages carry, with the reference decoder, on the flat model."""
        out = np.zeros(self.total, np.float64)
        for m in msgs:
            for t in m.tensors:
                start = self.offsets[t.name] + t.offset
                out[start:start + t.span] += decode_range(t)
        return out


def interleaving(updates: Sequence[Sent], rng: random.Random) -> list[tuple[Sent, int]]:
    """Every message in a random order that keeps each update's messages in order."""
    queue = {i: 0 for i in range(len(updates))}
    order: list[tuple[Sent, int]] = []
    while queue:
        i = rng.choice(sorted(queue))
        order.append((updates[i], queue[i]))
        queue[i] += 1
        if queue[i] == len(updates[i].payloads):
            del queue[i]
    return order


# ---------------------------------------------------------------- driving


def send(agg: AggregatorService, sent: Sent, i: int) -> str:
    """Step one message; what it counted: "accepted", a rejection reason, or "folded"."""
    payload = sent.payloads[i]
    if sent.cls == "bit_flip":  # the decoder alone: a message or a DecodeError, nothing else
        try:
            codec.decode(payload, agg.limits)
        except DecodeError:
            pass
        except Exception as exc:
            pytest.fail(f"the decoder raised {type(exc).__name__}: {exc}\n{sent.describe(i)}")
    stats = agg.stats
    before, accepted = Counter(stats.rejected), stats.accepted
    try:
        agg.step(Message(TOPICS.update(sent.device), payload, qos=1))
    except Exception as exc:
        pytest.fail(f"the aggregator raised {type(exc).__name__}: {exc}\n{sent.describe(i)}")
    counted = stats.rejected - before
    got = stats.accepted - accepted
    assert got in (0, 1), sent.describe(i)
    assert sum(counted.values()) + got <= 1, (
        f"accepted {got}, counted {dict(counted)}: {sent.describe(i)}")
    if got:
        return "accepted"
    if counted:
        (reason,) = counted
        assert reason in REJECT_REASONS, f"reason {reason!r}: {sent.describe(i)}"
        return reason
    return "folded"


def finite_f32(weights: dict[str, F32], what: str) -> None:
    for name, a in weights.items():
        assert a.dtype == np.float32, f"{what} {name}: {a.dtype}"
        assert bool(np.isfinite(a).all()), f"{what} {name}: NaN or inf"


def flat_model(weights: dict[str, F32]) -> F64:
    return np.concatenate([a.reshape(-1).astype(np.float64) for a in weights.values()])


def norm(x: F64) -> float:
    return float(np.linalg.norm(x))


class Published:
    """Reads the transport's published messages as they come."""

    def __init__(self, transport: MemoryTransport) -> None:
        self.transport = transport
        self.seen = 0
        self.assembler = ModelAssembler()
        self.models: dict[int, GlobalModel] = {}
        self.summaries: list[RoundSummary] = []
        self.announcement: RoundAnnouncement | None = None

    def poll(self) -> None:
        for m in self.transport.published[self.seen:]:
            if not m.payload:
                continue
            if m.topic == TOPICS.model or m.topic.startswith(f"{TOPICS.model}/part/"):
                whole = self.assembler.add(codec.decode_as(m.payload, GlobalModel))
                if whole is not None:
                    self.models[whole.version] = whole
            elif m.topic == TOPICS.metrics:
                self.summaries.append(codec.decode_as(m.payload, RoundSummary))
            elif m.topic == TOPICS.round:
                self.announcement = codec.decode_as(m.payload, RoundAnnouncement)
        self.seen = len(self.transport.published)


@dataclass
class Report:
    """What one configuration's run saw."""

    updates: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    messages: Counter[str] = field(default_factory=Counter)
    closed: int = 0
    abandoned: Counter[str] = field(default_factory=Counter)
    bounds: list[float] = field(default_factory=list)
    #: Rounds whose change exceeded ``server_lr * norm_bound`` as published (only with
    #: incomplete chunked updates), with the ratio.
    over_summary: list[tuple[int, float, str]] = field(default_factory=list)
    max_ratio: float = 0.0
    #: Round 1's change over ``server_lr * norm_bound``, and its clipped updates.
    first_ratio: float = math.nan
    first_clipped: int = 0
    #: Rounds whose clipped count was not checked (a norm within rounding of the bound).
    unchecked_clipped: int = 0
    incomplete: int = 0
    clipped: int = 0


@dataclass
class Round:
    """One round's updates after they were all sent, and what they count with."""

    number: int
    updates: list[Sent]
    #: Whether the adaptive estimate was still unknown when the round opened.
    bootstrap: bool
    #: Filled in at the close: the honest updates' mean, the model's change, the float32
    #: rounding it may carry, and the norm of what each update delivered.
    h: F64 = field(default_factory=lambda: np.zeros(0))
    change: F64 = field(default_factory=lambda: np.zeros(0))
    slack: float = 0.0
    norms: dict[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.accepted = [s for s in self.updates if s.outcome == "accepted"]
        self.incomplete = [s for s in self.updates if s.incomplete]
        self.honest = [s for s in self.updates if s.cls == "honest"]
        self.untrusted = [s for s in self.accepted if s.cls != "honest"]
        self.weight = {id(s): s.counted_weight() for s in self.accepted + self.incomplete}
        #: W: the weight of the whole updates the round counts.
        self.w_all = sum(self.weight[id(s)] for s in self.accepted)
        self.w_untrusted = sum(self.weight[id(s)] for s in self.untrusted)
        self.w_incomplete = sum(self.weight[id(s)] for s in self.incomplete)


class Run:
    """One configuration's service, stream and checks, round after round."""

    def __init__(self, name: str) -> None:
        self.setup = setup = SETUPS[name]
        self.agg, transport, self.clock = make_service(setup)
        self.pub = Published(transport)
        self.pub.poll()
        self.stream = Stream(seed=SEED + list(SETUPS).index(name), agg=self.agg)
        self.report = Report()
        self.lr = setup.server_lr

    def round(self) -> tuple[F64, float, bool]:
        """One round: build, send, close, check. Returns the honest updates' mean, how far the
        model's change may be from ``server_lr`` times it, and whether the round closed."""
        rnd = self.send_round()
        agg = self.agg
        r, v = agg.round, agg.version
        assert agg.strategy.incomplete == len(rnd.incomplete), f"round {r}"
        # Nothing is held back once the bootstrap has ended (``send_round``): everything
        # accepted is folded, with the weight it counts.
        assert agg.strategy.contributors == len(rnd.accepted), f"round {r}"
        assert agg.strategy.total_weight == rnd.w_all, f"round {r}: weights not capped"
        bound_before = agg.bound.bound()
        flats = {id(s): self.stream.flat(s.received()) for s in rnd.accepted + rnd.incomplete}
        rnd.norms = {k: norm(x) for k, x in flats.items()}
        h: F64 = np.zeros(self.stream.total)
        for s in rnd.honest:
            h += rnd.weight[id(s)] * flats[id(s)]
        h /= sum(rnd.weight[id(s)] for s in rnd.honest)
        rnd.h = h

        old = {k: a.copy() for k, a in agg.model.items()}
        if not self.close(rnd, old):
            return h, 0.0, False
        summary = agg.last_summary
        assert summary is not None
        assert summary.round == r
        assert self.pub.summaries[-1] == summary
        assert sorted(d for d, _ in summary.accepted) == sorted(s.device for s in rnd.accepted)
        published = decode_all(self.pub.models[v + 1].tensors)
        finite_f32(published, f"round {r}: published model")
        for name, a in agg.model.items():
            np.testing.assert_array_equal(published[name], a)
        rnd.change = change = flat_model(agg.model) - flat_model(old)
        new32 = np.concatenate([a.reshape(-1) for a in agg.model.values()])
        rnd.slack = slack = 0.5 * norm(np.spacing(np.abs(new32)).astype(np.float64))
        if not rnd.untrusted and not rnd.incomplete:  # honest updates only: their FedAvg
            assert norm(change / self.lr - h) <= 1e-6 * norm(h) + slack / self.lr, f"round {r}"
        if not self.setup.bounded:
            assert "norm_bound" not in summary.metrics
            assert norm(change) <= self.setup.robust.max_change_norm
            return h, math.inf, True
        bound = summary.metrics["norm_bound"]
        self.report.bounds.append(bound)
        # The bound every update of the round was folded under, the bootstrap round included
        # (its bootstrap ended before the close).
        assert bound == bound_before, f"round {r}"
        allowed = self.check_bounded(rnd, bound, int(summary.metrics["clipped_updates"]))
        return h, self.lr * allowed + slack, True

    def send_round(self) -> Round:
        agg, stream, report = self.agg, self.stream, self.report
        r = agg.round
        bootstrap = agg.bound.bootstrapping
        updates = [stream.honest(i) for i in range(HONEST)]
        if r % CLEAN_EVERY:
            updates += [stream.huge(self.setup) for _ in range(HUGE_PER_ROUND)]
            updates += [stream.max_weight(self.setup) for _ in range(WEIGHT_PER_ROUND)]
            updates += [stream.flip() for _ in range(FLIPS_PER_ROUND)]
        for sent, i in interleaving(updates, stream.rng):
            sent.bounds.append(agg.bound.bound() if agg.bound.active else math.inf)
            sent.held.append(agg.bound.bootstrapping)
            sent.outcomes.append(send(agg, sent, i))
            report.messages[sent.cls] += 1
        # The bootstrap takes bootstrap_size(MIN_UPDATES, ...) = HONEST norms: it ends within
        # the first round, whatever else arrives.
        assert not agg.bound.bootstrapping, f"round {r}"
        for sent in updates:
            key = f"{sent.cls}:{sent.kind}" if sent.cls != "honest" else "honest"
            report.updates[key][sent.outcome] += 1
            allowed = self.allowed(sent)
            if allowed is not None:
                assert sent.outcome in allowed, f"round {r}: {sent.describe()}"
                if not sent.chunked:
                    assert sent.outcomes[0] != "folded", f"round {r}: {sent.describe()}"
        rnd = Round(r, updates, bootstrap)
        report.incomplete += len(rnd.incomplete)
        return rnd

    def allowed(self, sent: Sent) -> frozenset[str] | None:
        """The outcomes ``sent`` may have: those of its class, except in reject mode for an
        update that started while the estimate bootstrapped. That one is not judged against the
        adaptive bound: a whole one is judged on arrival against ``max_norm`` (and clipped when
        released), a chunked one not at all while its chunks are held back (accepted if every
        chunk was; a chunk arriving after the release is judged under the budget it fixed)."""
        allowed = sent.allowed
        if (allowed is None or self.setup.robust.mode != "reject"
                or "rejected:norm_bound" not in allowed or not sent.held[0]):
            return allowed
        if sent.chunked:
            return frozenset({"accepted"}) if all(sent.held) else allowed | {"accepted"}
        whole = codec.decode_as(sent.payloads[0], ModelUpdate)
        if norm(self.stream.flat([whole])) > self.setup.robust.max_norm:
            return allowed
        return frozenset({"accepted"})

    def close(self, rnd: Round, old: dict[str, F32]) -> bool:
        """Close the round: True if it closed (a new version), False if it was abandoned."""
        agg, pub = self.agg, self.pub
        r, v = agg.round, agg.version
        models_before = len(pub.models)
        abandoned_before = Counter(agg.stats.abandoned)
        self.clock.now += GRACE_S + 1
        try:
            agg.step()
        except Exception as exc:
            pytest.fail(f"closing round {r} raised {type(exc).__name__}: {exc}")
        pub.poll()
        finite_f32(agg.model, f"round {r}: agg.model")
        assert agg.round == r + 1, f"round {r}: the next round did not open"
        ann = pub.announcement
        assert ann is not None
        assert (ann.round, ann.base_version) == (agg.round, agg.version), f"round {r}"
        if agg.version == v + 1:
            self.report.closed += 1
            return True
        # Abandoned: counted once, nothing published, the same model and version.
        assert agg.version == v, f"round {r}"
        new_abandoned = agg.stats.abandoned - abandoned_before
        assert sum(new_abandoned.values()) == 1, f"round {r}: {dict(agg.stats.abandoned)}"
        assert set(new_abandoned) <= set(ABANDON_REASONS)
        assert not self.setup.bounded, f"round {r} abandoned with a bound: {new_abandoned}"
        assert len(pub.models) == models_before
        for name, a in old.items():
            np.testing.assert_array_equal(agg.model[name], a)
        self.report.abandoned.update(new_abandoned)
        return False

    def check_bounded(self, rnd: Round, bound: float, clipped: int) -> float:
        """The checks of a round closed with a bound in force (``norm_bound`` in its summary);
        returns how far the change over ``server_lr`` may be from the honest mean."""
        r, lr, norms, report = rnd.number, self.lr, rnd.norms, self.report
        # Every update was folded under the round's bound, the bootstrap round included: a
        # whole one scaled to it if over it (clip mode, or held back in reject mode), a chunked
        # one under a budget of it from its first folded chunk on. What each update was folded
        # with is therefore at most the bound, and at most its own norm.
        folded = {k: min(x, bound) for k, x in norms.items()}
        report.clipped += clipped
        for s in rnd.honest:  # never clipped: the honest mean is exactly what was folded
            assert norms[id(s)] <= bound, f"round {r}: an honest update over the bound"
        if self.setup.robust.mode == "reject":
            for s in rnd.accepted:
                # Judged on arrival against the bound in force then (max_norm during the
                # bootstrap), or chunk by chunk; not judged if its chunks were held back.
                if not s.held[0] or not s.chunked:
                    assert norms[id(s)] <= s.bounds[0] * (1 + 1e-9), (
                        f"round {r}: {s.describe()}")
            if not rnd.bootstrap:  # nothing held back: nothing accepted over the bound
                assert clipped == 0, f"round {r}"
        # Clipped: exactly the accepted updates over the bound (held-back ones in reject mode;
        # an incomplete update is not counted). Not checked when a norm is within rounding of
        # the bound (the reference decoder sums in another order than the kernels).
        if all(abs(norms[id(s)] - bound) > 1e-6 * bound for s in rnd.accepted):
            over = sum(norms[id(s)] > bound for s in rnd.accepted)
            assert clipped == over, f"round {r}: {clipped} clipped, {over} over the bound"
        else:
            report.unchecked_clipped += 1
        if r == 1:
            report.first_clipped = clipped

        # Change per round: sqrt(Σ a_j c_j²) with c_j what update j was folded with and a_j its
        # largest share of a coordinate: w_j / W for whole ones, w_i / (W + w_i) for incomplete
        # chunked updates (each counts only where it delivered, so these shares add up past
        # 1). Without incomplete updates that is at most server_lr * bound.
        w_all = rnd.w_all
        spread = sum(rnd.weight[id(s)] / w_all * folded[id(s)] ** 2 for s in rnd.accepted)
        spread += sum(rnd.weight[id(s)] / (w_all + rnd.weight[id(s)]) * folded[id(s)] ** 2
                      for s in rnd.incomplete)
        moved = norm(rnd.change)
        limit = lr * math.sqrt(spread) * (1 + 1e-6) + rnd.slack
        assert moved <= limit, (
            f"round {r}: the model moved {moved:.6g}, over {limit:.6g} (norm_bound "
            f"{bound:.6g}, {len(rnd.incomplete)} incomplete)")
        over_summary = moved > lr * bound * (1 + 1e-6) + rnd.slack
        assert not over_summary or rnd.incomplete, (
            f"round {r}: the model moved {moved:.6g}, over server_lr * norm_bound = "
            f"{lr * bound:.6g}, with no incomplete update")
        ratio = moved / (lr * bound)
        report.max_ratio = max(report.max_ratio, ratio)
        if r == 1:
            report.first_ratio = ratio
        if over_summary:
            report.over_summary.append((r, ratio, f"{len(rnd.incomplete)} incomplete"))

        # Bounded influence: the untrusted updates pull the mean by their share of the weight
        # times what they were folded with; the honest ones still move the model.
        i_all = rnd.w_incomplete
        share = (rnd.w_untrusted + i_all) / (w_all + i_all)
        pull = sum(rnd.weight[id(s)] * folded[id(s)]
                   for s in rnd.untrusted + rnd.incomplete) / w_all
        allowed = share * norm(rnd.h) + pull
        deviation = norm(rnd.change / lr - rnd.h)
        assert deviation <= allowed * (1 + 1e-6) + 1e-6 * norm(rnd.h) + rnd.slack / lr, (
            f"round {r}: the change is {deviation:.6g} from the honest mean; bounded "
            f"influence allows {allowed:.6g} (untrusted weight {rnd.w_untrusted} of {w_all}, "
            f"incomplete {i_all})")
        return allowed

    def print_report(self, name: str) -> None:
        report, agg = self.report, self.agg
        by_class: dict[str, Counter[str]] = defaultdict(Counter)
        for key, c in report.updates.items():
            by_class[key.split(":", 1)[0]].update(c)
        print(f"\n{name}: {ROUNDS} rounds, {report.closed} closed, abandoned "
              f"{dict(report.abandoned)}; {sum(report.messages.values())} messages "
              f"{dict(sorted(report.messages.items()))}")
        for cls, c in sorted(by_class.items()):
            print(f"  {cls:<11} {sum(c.values()):>4} updates  {dict(sorted(c.items()))}")
        for key, c in sorted(report.updates.items()):
            if key.startswith(("huge:", "max_weight:")) and len(c) > 1:
                print(f"    {key}: {dict(sorted(c.items()))}")
        print(f"  incomplete chunked updates at close {report.incomplete}, clipped "
              f"{report.clipped}, rejected {dict(sorted(agg.stats.rejected.items()))}")
        if report.bounds:
            print(f"  norm_bound from {min(report.bounds):.4g} to {max(report.bounds):.4g} "
                  f"(round 1: {report.bounds[0]:.4g}, {report.first_clipped} clipped, change / "
                  f"(server_lr * norm_bound) {report.first_ratio:.4g}); largest change / "
                  f"(server_lr * norm_bound) {report.max_ratio:.4g}; rounds over 1: "
                  f"{[(r, round(x, 3), why) for r, x, why in report.over_summary]}; clipped "
                  f"count unchecked in {report.unchecked_clipped} rounds")


@pytest.mark.parametrize("name", list(SETUPS))
def test_poisoned_rounds_never_raise_and_keep_the_model_finite_and_bounded(name: str) -> None:
    started = time.perf_counter()
    run = Run(name)
    setup, agg, report = run.setup, run.agg, run.report
    base = flat_model(agg.model)
    # Honest means applied over the rounds that closed, and over every round. With a bound,
    # the model stays within the bounded-influence budget of the first from round 1 on (the
    # bootstrap round is bounded like any other): checked after every round.
    reference, unpoisoned = base.copy(), base.copy()
    budget = 0.0
    first: tuple[float, float] | None = None
    for _ in range(ROUNDS):
        h, allowed, closed = run.round()
        unpoisoned += setup.server_lr * h
        if closed:
            reference += setup.server_lr * h
            budget += allowed
        if setup.bounded:
            distance = norm(flat_model(agg.model) - reference)
            assert distance <= budget, f"round {agg.round - 1}: {distance:.6g} > {budget:.6g}"
            if first is None:
                first = (distance, budget)
    elapsed = time.perf_counter() - started

    assert report.closed + sum(report.abandoned.values()) == ROUNDS
    assert agg.stats.rounds_completed == report.closed == agg.version
    assert agg.stats.abandoned == report.abandoned
    # Every kind of every class was sent, each whole and chunked.
    kinds = {k.split(":", 1)[1] for k in report.updates if ":" in k}
    ways = ("whole", "chunked")
    assert {f"{c}/{p}/{w}" for c, p in HUGE_KINDS for w in ways} <= kinds
    assert {f"{c}/{r}/{w}" for c, r in FLIP_KINDS for w in ways} <= kinds
    labels = ("max", "max+1", "2^63-1", "2^64-1")
    assert {f"{n}/{d}/{w}" for n in labels for d in WEIGHT_DELTAS for w in ways} <= kinds
    final = flat_model(agg.model)
    if setup.bounded:
        assert report.closed == ROUNDS
        assert norm(final - reference) <= budget
    else:
        # Huge updates unbounded: a runaway model, or (server_lr 4) a float32 overflow.
        assert set(report.abandoned) == {"change_too_large", "non_finite_model"}

    run.print_report(name)
    ideal = unpoisoned - base
    cos = float(np.dot(final - base, ideal)) / max(norm(final - base) * norm(ideal), 1e-300)
    print(f"  honest updates alone would move the model {norm(ideal):.4g}; it moved "
          f"{norm(final - base):.4g} (cosine {cos:.3f}), ends {norm(final - unpoisoned):.4g} "
          f"from there and {norm(final - reference):.4g} from the honest mean of the rounds "
          f"that closed (bounded-influence budget {budget:.4g})")
    if first is not None:
        print(f"  after round 1: {first[0]:.4g} from the honest mean (budget {first[1]:.4g}; "
              f"norm_bound {report.bounds[0]:.4g}, server_lr {setup.server_lr})")
    print(f"  elapsed {elapsed:.1f} s")
