"""``ModelSubscriber``: the latest global model, for apps (numpy, msgpack and paho only);
``ResultSubscriber``: a statistics federation's latest result (docs/analytics.md).

Subscribes to a federation's model topic (and the parts of a chunked model), checks each model's
sha256 and keeps the newest version; given ``trusted_keys``, only models the federation's key
signed (docs/security.md, "Signed models"; this needs ``cryptography``). Any MQTT client can do
the same by following docs/protocol.md; this is the convenient way from Python.
"""

from __future__ import annotations

import queue
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from fedmq import codec
from fedmq.chunking import ModelAssembler
from fedmq.compression import decode_all
from fedmq.config import BrokerConfig
from fedmq.errors import DecodeError
from fedmq.topics import Topics
from fedmq.transport import Message, PahoTransport, Transport
from fedmq.wire import (
    GlobalModel,
    ModelEvaluation,
    RoundSummary,
    StatisticsResult,
    model_digest,
    newer,
)

if TYPE_CHECKING:
    from fedmq.signed_gate import SignedGate

F32 = npt.NDArray[np.float32]


def _drain(transport: Transport, handle: Callable[[Message], None], timeout: float) -> None:
    """Hand every message in the inbox to ``handle``, waiting up to ``timeout`` for the first."""
    try:
        msg = transport.inbox.get(timeout=timeout) if timeout else transport.inbox.get_nowait()
    except queue.Empty:
        return
    handle(msg)
    while True:
        try:
            handle(transport.inbox.get_nowait())
        except queue.Empty:
            return


class ModelSubscriber:
    """Follows a federation's model topic; ``latest`` / ``wait_for_version`` return models."""

    def __init__(self, broker: BrokerConfig, federation: str, *,
                 transport: Transport | None = None, summaries: bool = False,
                 evaluations: bool = False,
                 on_model: Callable[[GlobalModel], None] | None = None,
                 trusted_keys: Iterable[str] = ()) -> None:
        self.topics = Topics(federation)
        self.federation = federation
        self.transport: Transport = transport or PahoTransport(
            broker, client_id=f"fedmq-app-{federation}-{id(self):x}")
        self.transport.subscribe(self.topics.model)
        self.transport.subscribe(self.topics.model_parts)
        if summaries:
            self.transport.subscribe(self.topics.metrics)
        if evaluations:
            self.transport.subscribe(self.topics.model_eval)
        self._assembler = ModelAssembler()
        self._latest: GlobalModel | None = None
        self.summaries: dict[int, RoundSummary] = {}
        #: The federated evaluation of each version (the latest message: the most reports).
        self.evaluations: dict[int, ModelEvaluation] = {}
        self.rejected = 0
        self.on_model = on_model
        #: With ``trusted_keys``: models refused by the signature check, by reason
        #: (``fedmq.signing.REASONS``; also counted in ``rejected``).
        self.refused: Counter[str] = Counter()
        self._gate: SignedGate | None = None
        keys = list(trusted_keys)
        if keys:  # imported here: an app that does not verify needs no cryptography
            from fedmq.signed_gate import SignedGate
            from fedmq.signing import Verifier, parse_public

            self._gate = SignedGate(Verifier([parse_public(k) for k in keys]))

    def start(self) -> ModelSubscriber:
        self.transport.start()
        return self

    def stop(self) -> None:
        self.transport.stop()

    def poll(self, timeout: float = 0.0) -> GlobalModel | None:
        """Handle what has arrived (waiting up to ``timeout`` for one message); the latest."""
        _drain(self.transport, self._handle, timeout)
        return self._latest

    def _handle(self, msg: Message) -> None:
        if not msg.payload:
            return
        try:
            decoded = codec.decode(msg.payload)
        except DecodeError:
            self.rejected += 1
            return
        if isinstance(decoded, RoundSummary):
            self.summaries[decoded.version] = decoded
            return
        if isinstance(decoded, ModelEvaluation):
            if decoded.federation == self.federation:
                self.evaluations[decoded.version] = decoded
            return
        if not isinstance(decoded, GlobalModel) or decoded.federation != self.federation:
            return
        if self._gate is None:
            whole = self._assembler.add(decoded)
        else:
            held = (self._latest.run, self._latest.version) if self._latest else (0, -1)
            whole, reason = self._gate.model(decoded, msg.payload, held)
            if reason is not None and reason != "old_model":  # a republished one is routine
                self.refused[reason] += 1
                self.rejected += 1
        if whole is None:
            return
        if model_digest(whole.tensors) != whole.sha256:
            self.rejected += 1
            return
        if self._latest is None or newer(whole.run, whole.version, self._latest.run,
                                         self._latest.version):
            self._latest = whole
            if self.on_model is not None:
                self.on_model(whole)

    @property
    def latest(self) -> GlobalModel | None:
        """The newest verified model received so far."""
        return self._latest

    def wait_for_version(self, version: int, timeout: float) -> GlobalModel | None:
        """Block until a model of at least ``version`` arrived (None on timeout)."""
        end = time.monotonic() + timeout
        while self._latest is None or self._latest.version < version:
            left = end - time.monotonic()
            if left <= 0:
                return None
            self.poll(min(left, 0.2))
        return self._latest

    @staticmethod
    def weights(model: GlobalModel) -> dict[str, F32]:
        """The model's tensors as float32 arrays."""
        return decode_all(model.tensors)


class ResultSubscriber:
    """Follows a statistics federation's retained result topic; ``latest`` is the newest.

    ``on_result`` is called with each result newer than the last (by run, then round): the
    retained one first, then every round's as it closes.
    """

    def __init__(self, broker: BrokerConfig, federation: str, *,
                 transport: Transport | None = None,
                 on_result: Callable[[StatisticsResult], None] | None = None) -> None:
        self.federation = federation
        self.transport: Transport = transport or PahoTransport(
            broker, client_id=f"fedmq-app-{federation}-{id(self):x}")
        self.transport.subscribe(Topics(federation).result)
        self.latest: StatisticsResult | None = None
        self.rejected = 0
        self.on_result = on_result

    def start(self) -> ResultSubscriber:
        self.transport.start()
        return self

    def stop(self) -> None:
        self.transport.stop()

    def poll(self, timeout: float = 0.0) -> StatisticsResult | None:
        """Handle what has arrived (waiting up to ``timeout`` for one message); the latest."""
        _drain(self.transport, self._handle, timeout)
        return self.latest

    def _handle(self, msg: Message) -> None:
        if not msg.payload:
            return
        try:
            got = codec.decode(msg.payload)
        except DecodeError:
            self.rejected += 1
            return
        if isinstance(got, StatisticsResult) and got.federation == self.federation and (
                self.latest is None
                or newer(got.run, got.round, self.latest.run, self.latest.round)):
            self.latest = got
            if self.on_result is not None:
                self.on_result(got)

    def wait_for_round(self, round_: int, timeout: float) -> StatisticsResult | None:
        """Block until a result of at least round ``round_`` arrived (None on timeout)."""
        end = time.monotonic() + timeout
        while self.latest is None or self.latest.round < round_:
            left = end - time.monotonic()
            if left <= 0:
                return None
            self.poll(min(left, 0.2))
        return self.latest
