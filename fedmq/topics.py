"""MQTT topic names: ``fedmq/v1/{federation}/...`` (see docs/protocol.md)."""

from __future__ import annotations

import re
from dataclasses import dataclass

PREFIX = "fedmq/v1"

# One topic level each; no MQTT wildcards or separators, so a name cannot escape its level.
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def check_name(value: str, what: str) -> str:
    """Return ``value`` if it is a valid federation or device name, else raise ValueError."""
    if not _NAME.fullmatch(value):
        raise ValueError(f"{what} {value!r} must be 1-64 characters of letters, digits, '_', '.' "
                         "or '-' (it becomes one MQTT topic level)")
    return value


@dataclass(frozen=True, slots=True)
class Topics:
    """The topics of one federation."""

    federation: str

    def __post_init__(self) -> None:
        check_name(self.federation, "federation")

    @property
    def base(self) -> str:
        return f"{PREFIX}/{self.federation}"

    @property
    def round(self) -> str:
        return f"{self.base}/round"

    @property
    def model(self) -> str:
        return f"{self.base}/model"

    @property
    def model_parts(self) -> str:
        """Subscription filter for the parts of a chunked model."""
        return f"{self.base}/model/part/+"

    def model_part(self, index: int) -> str:
        return f"{self.base}/model/part/{index}"

    @property
    def metrics(self) -> str:
        return f"{self.base}/metrics"

    @property
    def result(self) -> str:
        """A statistics federation's latest result (``StatisticsResult``, retained): the model
        topic's sibling."""
        return f"{self.base}/result"

    @property
    def aggregator(self) -> str:
        """The running aggregator's presence (retained JSON; ``fedmq.instance``)."""
        return f"{self.base}/aggregator"

    @property
    def model_eval(self) -> str:
        """The federated evaluation of each model version (``ModelEvaluation``, retained)."""
        return f"{self.base}/metrics/eval"

    @property
    def progress(self) -> str:
        """The open round's progress (``RoundProgress``, retained)."""
        return f"{self.base}/metrics/progress"

    @property
    def evals(self) -> str:
        """Subscription filter for every device's evaluation reports."""
        return f"{self.base}/eval/+"

    def eval(self, device_id: str) -> str:
        return f"{self.base}/eval/{check_name(device_id, 'device id')}"

    @property
    def updates(self) -> str:
        """Subscription filter for every device's updates."""
        return f"{self.base}/update/+"

    @property
    def statuses(self) -> str:
        return f"{self.base}/status/+"

    def update(self, device_id: str) -> str:
        return f"{self.base}/update/{check_name(device_id, 'device id')}"

    def status(self, device_id: str) -> str:
        return f"{self.base}/status/{check_name(device_id, 'device id')}"

    def device_of(self, topic: str) -> str | None:
        """The device id in an ``update/{id}``, ``status/{id}`` or ``eval/{id}`` topic of this
        federation.

        None when the topic is not one of those or its last level is not a valid device id
        (``update/+`` also matches an empty level).
        """
        parts = topic.split("/")
        if len(parts) == 5 and "/".join(parts[:3]) == self.base and parts[3] in (
                "update", "status", "eval") and _NAME.fullmatch(parts[4]):
            return parts[4]
        return None

    # ---- scale-out (docs/scaling.md): a coordinator and its workers

    def shard_updates(self, shard: int) -> str:
        """Subscription filter for the updates the engine routes to partition ``shard``."""
        return f"{self.base}/shard/{shard}/update/+"

    def canonical_update(self, topic: str) -> str | None:
        """``update/{id}`` for a partitioned ``shard/{k}/update/{id}`` topic (None otherwise)."""
        parts = topic.split("/")
        if len(parts) == 7 and "/".join(parts[:3]) == self.base and parts[3] == "shard" \
                and parts[5] == "update":
            return f"{self.base}/update/{parts[6]}"
        return None

    def worker_progress(self, worker: str) -> str:
        """A worker's ``WorkerProgress`` (QoS 1)."""
        return f"{self.base}/wprogress/{worker}"

    @property
    def worker_progresses(self) -> str:
        return f"{self.base}/wprogress/+"

    def worker_resend(self, worker: str) -> str:
        """The coordinator's ``ResendRequest`` to a worker (QoS 1)."""
        return f"{self.base}/wresend/{worker}"

    @property
    def collect(self) -> str:
        """The coordinator's ``CollectRequest`` (QoS 1, retained)."""
        return f"{self.base}/collect"

    def partial(self, worker: str) -> str:
        """A worker's ``WorkerPartial`` (QoS 1)."""
        return f"{self.base}/partial/{worker}"

    @property
    def partials(self) -> str:
        return f"{self.base}/partial/+"

    def worker_of(self, topic: str) -> str | None:
        """The worker name in a ``wprogress/{w}`` or ``partial/{w}`` topic."""
        parts = topic.split("/")
        if len(parts) == 5 and "/".join(parts[:3]) == self.base and parts[3] in (
                "wprogress", "partial") and _NAME.fullmatch(parts[4]):
            return parts[4]
        return None

    @property
    def estimate(self) -> str:
        """The coordinator's ``NormEstimate`` for the open round (QoS 1, retained)."""
        return f"{self.base}/estimate"
