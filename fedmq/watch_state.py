"""What ``fedmq watch`` knows about a federation, built from its readable topics (pure logic).

``FleetView.handle(topic, payload, now)`` applies one received message: the retained round
announcement and model, the round summaries, the federated evaluation of each version
(``metrics/eval``), the open round's progress (``metrics/progress``) and the devices' retained
statuses. ``now`` is passed in (unix time), so no clock, socket or thread is touched here;
``fedmq.watch`` renders the result.

A watcher that starts late sees only what is retained (the current round, the latest model and
its evaluation, the devices' statuses) plus what arrives while it runs: rejection counts and
the per-version history cover the time since it started, and say so.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from fedmq import codec
from fedmq.errors import DecodeError
from fedmq.signing import REASONS
from fedmq.topics import Topics
from fedmq.wire import (
    DeviceStatus,
    GlobalModel,
    Message,
    ModelEvaluation,
    RoundAnnouncement,
    RoundProgress,
    RoundSummary,
)

__all__ = ["Device", "FleetView", "MetricName", "RoundState", "VersionInfo"]

#: A model may hold far more tensors than an update: only its metrics are read here.
_LIMITS = codec.DecodeLimits(max_tensors=1 << 16, max_elements=1 << 40)

#: Device states in display order (busiest first); unknown states sort last.
STATE_ORDER: dict[str, int] = {"training": 0, "online": 1, "offline": 2}

MetricName = Literal["accuracy", "loss"]
Source = Literal["eval", "train"]


@dataclass
class Device:
    """One device as its retained status tells."""

    device_id: str
    state: str
    #: Unix time of its last status: our clock for a live message, the device's ``ts`` for a
    #: retained one (sent before we subscribed); None when the device gave no ``ts``.
    last_seen: float | None
    #: Models and announcements it refused as forged or altered (docs/security.md): the sum of
    #: its status's ``ignored`` counts under ``fedmq.signing.REASONS``.
    refused: int = 0


@dataclass
class VersionInfo:
    """What is known of one global model version."""

    version: int
    round: int | None = None
    created: float | None = None
    participants: int | None = None
    bytes_in: int | None = None
    duration_s: float | None = None
    #: The model's own metrics: the mean of the updates' ``train_*`` (and anything else).
    train: dict[str, float] = field(default_factory=dict)
    #: The devices' evaluation of this version on held-out data: ``eval_loss``, ...
    eval: dict[str, float] = field(default_factory=dict)

    def metric(self, name: MetricName) -> tuple[float, Source] | None:
        """``eval_<name>`` if the devices evaluated this version, else ``train_<name>``."""
        for source, values in (("eval", self.eval), ("train", self.train)):
            value = values.get(f"{source}_{name}")
            if value is not None and math.isfinite(value):
                return value, source  # type: ignore[return-value]
        return None

    @property
    def eval_devices(self) -> int:
        return int(self.eval.get("eval_devices", 0))


@dataclass
class RoundState:
    """The round in progress: the announcement, and the aggregator's progress once published."""

    round: int
    base_version: int
    min_updates: int
    max_updates: int
    deadline: float
    open: bool = True
    #: Updates accepted so far (None until a ``RoundProgress`` for this round arrived).
    accepted: int | None = None
    rejected: dict[str, int] = field(default_factory=dict)


def _split_metrics(metrics: Mapping[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """(everything but ``eval_*``, the ``eval_*`` entries)."""
    train = {k: float(v) for k, v in metrics.items() if not k.startswith("eval_")}
    return train, {k: float(v) for k, v in metrics.items() if k.startswith("eval_")}


class FleetView:
    """The state of one federation as seen by a read-only subscriber."""

    def __init__(self, federation: str, *, now: float, keep_versions: int = 200,
                 keep_rounds: int = 50) -> None:
        self.topics = Topics(federation)
        self.federation = federation
        #: When the watcher started: rejection counts and the history begin here.
        self.since = now
        self.keep_versions = keep_versions
        #: The aggregator's run (``fedmq.wire.newer``); a newer one resets what we show.
        self.run = 0
        self.round: RoundState | None = None
        self.devices: dict[str, Device] = {}
        self.versions: dict[int, VersionInfo] = {}
        #: Newest last.
        self.summaries: deque[RoundSummary] = deque(maxlen=keep_rounds)
        #: Rejections of the rounds closed since ``since`` (their summaries), by reason.
        self.rejected_closed: Counter[str] = Counter()
        self._summarized: set[tuple[int, int]] = set()
        self.last_message: float | None = None
        #: Messages not applied, by why: ``undecodable``, ``wrong_topic``, ``wrong_federation``,
        #: ``stale_run``.
        self.ignored: Counter[str] = Counter()
        #: Times a newer run of the aggregator replaced the one shown (rollback or fresh start).
        self.new_runs = 0

    # ---------------------------------------------------------------- applying messages

    def handle(self, topic: str, payload: bytes, now: float, *, retained: bool = False) -> bool:
        """Decode and apply one received message; False if it was ignored."""
        if not payload:
            # A cleared retained message: a device's status removed by an operator.
            device = self.topics.device_of(topic)
            if device is not None and topic == self.topics.status(device):
                return self.devices.pop(device, None) is not None
            return False
        try:
            message = codec.decode(payload, _LIMITS)
        except DecodeError:
            self.ignored["undecodable"] += 1
            return False
        return self.apply(topic, message, now, retained=retained)

    def apply(self, topic: str, message: Message, now: float, *, retained: bool = False) -> bool:
        """Apply one decoded message received on ``topic``; False if it was ignored."""
        if message.federation != self.federation:
            self.ignored["wrong_federation"] += 1
            return False
        t = self.topics
        applied = False
        if isinstance(message, RoundAnnouncement) and topic == t.round:
            applied = self._fresh(message.run) and self._announcement(message)
        elif isinstance(message, RoundProgress) and topic == t.progress:
            applied = self._fresh(message.run) and self._progress(message)
        elif isinstance(message, GlobalModel) and topic == t.model:
            applied = self._fresh(message.run) and self._model(message)
        elif isinstance(message, ModelEvaluation) and topic == t.model_eval:
            applied = self._fresh(message.run) and self._model_eval(message)
        elif isinstance(message, RoundSummary) and topic == t.metrics:
            applied = self._summary(message)
        elif isinstance(message, DeviceStatus) and topic == f"{t.base}/status/{message.device_id}":
            applied = self._status(message, now, retained)
        else:
            self.ignored["wrong_topic"] += 1
        if applied:
            self.last_message = now
        return applied

    def _fresh(self, run: int) -> bool:
        """Whether a message of ``run`` belongs to the run shown (switching to a newer one)."""
        if run in (0, self.run):
            return True  # 0: a sender that gives no run
        if run < self.run:
            self.ignored["stale_run"] += 1  # a retained leftover of an earlier run
            return False
        if self.run:
            # A rollback or a start without saved state: versions and rounds count again.
            self.new_runs += 1
            self.round = None
            self.versions.clear()
            self.summaries.clear()
            self._summarized.clear()
        self.run = run
        return True

    def _announcement(self, a: RoundAnnouncement) -> bool:
        r = self.round
        if r is not None and a.round < r.round:
            return False
        if r is None or a.round > r.round:
            self.round = RoundState(a.round, a.base_version, a.min_updates, a.max_updates,
                                    a.deadline, open=a.open)
        else:  # the same round again: extended, or ended
            r.base_version, r.deadline, r.open = a.base_version, a.deadline, a.open
            r.min_updates, r.max_updates = a.min_updates, a.max_updates
        return True

    def _progress(self, p: RoundProgress) -> bool:
        r = self.round
        if r is not None and p.round < r.round:
            return False
        if r is None or p.round > r.round:
            # The progress of a round whose announcement has not arrived yet (another topic).
            r = self.round = RoundState(p.round, p.base_version, p.min_updates, p.max_updates,
                                        p.deadline)
        r.accepted = p.accepted
        r.rejected = dict(p.rejected)
        r.min_updates, r.max_updates = p.min_updates, p.max_updates
        if p.deadline > 0:  # 0: the aggregator gave none; keep the announcement's
            r.deadline = p.deadline
        return True

    def _version(self, version: int) -> VersionInfo:
        info = self.versions.get(version)
        if info is None:
            info = self.versions[version] = VersionInfo(version)
            for old in sorted(self.versions)[:-self.keep_versions]:
                del self.versions[old]
        return info

    def _model(self, m: GlobalModel) -> bool:
        info = self._version(m.version)
        info.round = m.round
        info.created = m.created or None
        train, evaluated = _split_metrics(m.metrics)
        info.train.update(train)
        info.eval.update(evaluated)
        if "participants" in train:
            info.participants = int(train["participants"])
        if "bytes_in" in train:
            info.bytes_in = int(train["bytes_in"])
        return True

    def _model_eval(self, e: ModelEvaluation) -> bool:
        self._version(e.version).eval.update({k: float(v) for k, v in e.metrics.items()})
        return True

    def _summary(self, s: RoundSummary) -> bool:
        key = (s.round, s.version)
        if key in self._summarized:
            return False  # QoS 1: a duplicate delivery
        self._summarized.add(key)
        self.summaries.append(s)
        self.rejected_closed.update(s.rejected)
        info = self._version(s.version)
        info.round = s.round
        info.participants = s.participants
        info.bytes_in = s.bytes_in
        info.duration_s = s.duration_s
        train, evaluated = _split_metrics(s.metrics)
        info.train.update(train)
        info.eval.update(evaluated)
        return True

    def _status(self, s: DeviceStatus, now: float, retained: bool) -> bool:
        # A live message is stamped with our clock (devices' clocks drift); a retained one was
        # sent before we subscribed, so only its own ts says when.
        seen = (s.ts or None) if retained else now
        refused = sum(s.ignored.get(reason, 0) for reason in REASONS)
        self.devices[s.device_id] = Device(s.device_id, s.state, seen, refused)
        return True

    # ---------------------------------------------------------------- reading

    @property
    def has_data(self) -> bool:
        """Whether anything of this federation arrived yet."""
        return self.last_message is not None

    def rejected(self) -> Counter[str]:
        """Rejections since the watcher started: closed rounds plus the round in progress."""
        total = Counter(self.rejected_closed)
        r = self.round
        if r is not None and not any(s.round == r.round for s in self.summaries):
            total.update(r.rejected)
        return +total

    def device_counts(self) -> Counter[str]:
        """Devices per state."""
        return Counter(d.state for d in self.devices.values())

    def devices_ordered(self) -> list[Device]:
        """Training first, then online, then offline (and unknown states); by id within."""
        return sorted(self.devices.values(),
                      key=lambda d: (STATE_ORDER.get(d.state, len(STATE_ORDER)), d.device_id))

    def latest_versions(self, n: int) -> list[VersionInfo]:
        """The ``n`` newest versions known, oldest first."""
        return [self.versions[v] for v in sorted(self.versions)[-n:]] if n > 0 else []

    def series(self, name: MetricName) -> list[tuple[int, float, Source]]:
        """(version, value, source) of every version with ``name`` known, oldest first."""
        out = []
        for v in sorted(self.versions):
            found = self.versions[v].metric(name)
            if found is not None:
                out.append((v, found[0], found[1]))
        return out

    def seconds_left(self, now: float) -> float | None:
        """Seconds until the open round's deadline (negative once past), None without one."""
        r = self.round
        if r is None or not r.open or r.deadline <= 0:
            return None
        return r.deadline - now
