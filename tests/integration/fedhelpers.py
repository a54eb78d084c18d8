"""Helpers for the integration tests: a recording subscriber, update builders, aggregators, the
marked code blocks of a doc page."""

from __future__ import annotations

import queue
import re
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from aggregator.service import AggregatorService
from fedmq import codec
from fedmq.broker import MosquittoBroker
from fedmq.compression import decode_all, encode_all
from fedmq.config import (
    AggregatorConfig,
    BrokerConfig,
    LimitsConfig,
    ModelConfig,
    RoundsConfig,
)
from fedmq.topics import Topics
from fedmq.transport import Message, PahoTransport
from fedmq.wire import (
    GlobalModel,
    ModelUpdate,
    RoundAnnouncement,
    RoundSummary,
)
from fedmq.wire import (
    Message as WireMessage,
)

F32 = npt.NDArray[np.float32]
W = TypeVar("W")
LAYERS = [8, 4, 3]


def broker_config(broker: MosquittoBroker) -> BrokerConfig:
    return BrokerConfig(
        host=broker.host, port=broker.port, reconnect_min_s=0.1, reconnect_max_s=1.0
    )


def marked_blocks(page: Path, marker: str) -> dict[str, str]:
    """The page's code blocks marked ``<!-- MARKER: NAME -->`` on the line before, by NAME."""
    text = page.read_text(encoding="utf-8")
    found = re.findall(rf"^<!-- {re.escape(marker)}: (\S+) -->\n```[a-z]*\n(.*?)^```$", text,
                       re.MULTILINE | re.DOTALL)
    blocks = dict(found)
    assert len(blocks) == len(found), f"{page.name}: a block name is used twice"
    return blocks


def wait_until(pred: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """Poll ``pred`` every 20 ms until it holds; AssertionError naming ``what`` otherwise."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError(f"not within {timeout} s: {what}")


def unique_federation(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@dataclass
class Recorder:
    """An independent MQTT client that records everything on one federation's topics."""

    broker: BrokerConfig
    federation: str
    messages: list[tuple[Message, WireMessage | None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.topics = Topics(self.federation)
        self.transport = PahoTransport(self.broker, client_id=f"rec-{uuid.uuid4().hex[:8]}")
        self.transport.subscribe(f"{self.topics.base}/#")

    def start(self) -> Recorder:
        self.transport.start()
        assert self.transport.wait_connected(10), "recorder could not connect"
        time.sleep(0.2)  # let the SUBACK land before anything is published
        return self

    def stop(self) -> None:
        self.transport.stop()

    def drain(self) -> None:
        while True:
            try:
                msg = self.transport.inbox.get_nowait()
            except queue.Empty:
                return
            try:
                decoded: WireMessage | None = codec.decode(msg.payload)
            except Exception:
                decoded = None
            self.messages.append((msg, decoded))

    def of(self, cls: type[W]) -> list[W]:
        self.drain()
        return [d for _, d in self.messages if isinstance(d, cls)]

    def wait_for(self, pred: Callable[[Recorder], bool], timeout: float = 20.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self.drain()
            if pred(self):
                return
            time.sleep(0.05)
        raise AssertionError(
            f"condition not met within {timeout} s; recorded "
            f"{[type(d).__name__ for _, d in self.messages]}"
        )

    def updates(self) -> dict[str, ModelUpdate]:
        return {u.update_id: u for u in self.of(ModelUpdate)}

    def models(self) -> dict[int, GlobalModel]:
        return {m.version: m for m in self.of(GlobalModel)}

    def summaries(self) -> list[RoundSummary]:
        return self.of(RoundSummary)

    def announcements(self) -> list[RoundAnnouncement]:
        return self.of(RoundAnnouncement)


def aggregator_config(
    broker: BrokerConfig, federation: str, limits: LimitsConfig | None = None, **rounds: Any
) -> AggregatorConfig:
    r = {
        "min_updates": 2,
        "max_updates": 2,
        "deadline_s": 30.0,
        "grace_s": 0.5,
        "max_rounds": 1,
    } | rounds
    return AggregatorConfig(
        federation=federation,
        broker=broker,
        model=ModelConfig(layers=LAYERS, seed=1),
        rounds=RoundsConfig(**r),
        limits=limits or LimitsConfig(),
    )


@contextmanager
def running_aggregator(config: AggregatorConfig, **kw: Any) -> Iterator[AggregatorService]:
    agg = AggregatorService(config, **kw)
    agg.start()
    try:
        yield agg
    finally:
        agg.stop()


def weights_of(model: GlobalModel) -> dict[str, F32]:
    return {k: np.array(v) for k, v in decode_all(model.tensors).items()}


def random_delta(
    model: GlobalModel, rng: np.random.Generator, scale: float = 0.1
) -> dict[str, F32]:
    return {
        t.name: (rng.standard_normal(t.shape) * scale).astype(np.float32) for t in model.tensors
    }


def update_payload(
    federation: str,
    device: str,
    delta: Mapping[str, npt.ArrayLike],
    *,
    round_: int = 1,
    base_version: int = 0,
    num_examples: int = 10,
    update_id: str | None = None,
    **overrides: Any,
) -> bytes:
    fields: dict[str, Any] = {
        "federation": federation,
        "device_id": device,
        "round": round_,
        "base_version": base_version,
        "update_id": update_id or uuid.uuid4().hex,
        "num_examples": num_examples,
        "tensors": encode_all(delta),
    } | overrides
    return codec.encode(ModelUpdate(**fields))


def fedavg(base: Mapping[str, F32], updates: list[ModelUpdate]) -> dict[str, F32]:
    """The reference: base + np.average(deltas, weights=num_examples), per tensor."""
    weights = [u.num_examples for u in updates]
    out = {}
    for name, b in base.items():
        deltas = [decode_all(u.tensors)[name].astype(np.float64) for u in updates]
        mean = np.average(np.stack(deltas), axis=0, weights=weights)
        out[name] = (b.astype(np.float64) + mean).astype(np.float32)
    return out


def assert_fedavg(model: GlobalModel, base: GlobalModel, updates: list[ModelUpdate]) -> None:
    """``model`` is ``base`` plus the FedAvg of exactly ``updates`` (float32 rounding aside)."""
    expected = fedavg(weights_of(base), updates)
    got = weights_of(model)
    assert list(got) == list(expected)
    for name, value in got.items():
        np.testing.assert_allclose(value, expected[name], rtol=1e-6, atol=1e-7)
