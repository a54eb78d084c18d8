"""The device agent's state machine (sans-I/O: messages in, actions out, no clock, no sockets).

The agent keeps the newest verified global model and the newest round announcement; when the
announcement is open, names the model version it holds, selects this device, and the device has
not trained for that round yet, it asks for training. Announcement and model may arrive in either
order (they are separate retained topics), so whichever comes second triggers the training.

In asynchronous rounds (``mode = "async"`` in the announcement, FedBuff) training is due on a
tick instead, which the service gives when it has nothing queued: then the agent trains from the
newest model it holds, if it has not trained from that version yet, the version is within the
announcement's ``max_staleness``, and ``min_interval_s`` has passed since its last training
started. So a fast device trains again as soon as a newer version reaches it, and a slow one
never trains twice from one version.

Models and announcements are ordered by ``(run, version)`` and ``(run, round)``
(``fedmq.wire.newer``): when an aggregator starts a new run (a rollback, a restart without saved
state), its numbers start again but its run is larger, and the first message of the new run makes
the agent forget the old run's model, announcement and rounds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fedmq.compression import decode_all
from fedmq.errors import ProtocolError
from fedmq.sampling import selected
from fedmq.wire import GlobalModel, RoundAnnouncement, model_digest, newer

Weights = dict[str, npt.NDArray[np.float32]]


@dataclass(frozen=True, slots=True)
class Train:
    """Train on ``weights`` (model ``version``) for ``announcement``'s round."""

    announcement: RoundAnnouncement
    version: int
    weights: Weights
    #: The digest of the model trained from (its announcement's, in sync rounds).
    model_sha256: str = ""


@dataclass(frozen=True, slots=True)
class Ignored:
    """A message was ignored; ``reason`` says why (logged and counted by the service)."""

    reason: str


AgentAction = Train | Ignored


class AgentMachine:
    """Decides when a device trains. One instance per device."""

    def __init__(self, federation: str, device_id: str, *, min_interval_s: float = 0.0) -> None:
        self.federation = federation
        self.device_id = device_id
        #: Async rounds: at least this many seconds from one training's start to the next.
        self.min_interval_s = min_interval_s
        #: Async rounds: the (run, version) last trained from, and when that training started.
        self.trained_version = (0, -1)
        self.started_at: float | None = None
        #: The held model's digest.
        self.model_sha256 = ""
        #: The newest aggregator run seen (0: none, or peers that give no run).
        self.run = 0
        self.model_version = -1
        self.weights: Weights | None = None
        self.announcement: RoundAnnouncement | None = None
        self.last_trained_round = 0
        #: (round, base version, model digest, deadline) of the announcement this device last
        #: trained for, restored from disk after a restart: that announcement is not trained a
        #: second time. The deadline tells a new run's round 1 from the old run's.
        self.trained_before: tuple[int, int, str, float] | None = None
        self.training = False
        #: (round, sample draw) that did not select this device.
        self.passed: tuple[int, int] | None = None

    def on_model(self, model: GlobalModel) -> list[AgentAction]:
        """A model arrived on the model topic."""
        if model.federation != self.federation:
            return [Ignored("wrong_federation")]
        if not newer(model.run, model.version, self.run, self.model_version):
            return [Ignored("old_model")]
        if model_digest(model.tensors) != model.sha256:
            return [Ignored("bad_checksum")]
        try:
            weights = decode_all(model.tensors)
        except ValueError:
            return [Ignored("unsupported_codec")]
        self._enter_run(model.run)
        self.model_version = model.version
        self.weights = weights
        self.model_sha256 = model.sha256
        return self._maybe_train()

    def on_round(self, ann: RoundAnnouncement) -> list[AgentAction]:
        """An announcement arrived on the round topic."""
        if ann.federation != self.federation:
            return [Ignored("wrong_federation")]
        if ann.run < self.run or (self.announcement is not None and ann.run == self.run
                                  and ann.round < self.announcement.round):
            return [Ignored("old_round")]
        self._enter_run(ann.run)
        self.announcement = ann
        return self._maybe_train()

    def on_trained(self, round_: int) -> list[AgentAction]:
        """Training for ``round_`` finished (its update was handed to the transport)."""
        if not self.training:
            raise ProtocolError("on_trained without a training in progress")
        self.training = False
        return self._maybe_train()

    def on_tick(self, now: float) -> list[AgentAction]:
        """The service has nothing queued at time ``now``: in asynchronous rounds, train from the
        newest model held if that is due (see the module); nothing to do in sync rounds."""
        ann = self.announcement
        if (self.training or ann is None or ann.mode != "async" or not ann.open
                or self.weights is None):
            return []
        version = self.model_version
        if not newer(self.run, version, *self.trained_version):
            return []  # trained from this version already: wait for a newer one
        if ann.base_version - version > ann.max_staleness:
            return []  # an update from it would be stale: wait for the newer model
        if self.started_at is not None and now - self.started_at < self.min_interval_s:
            return []
        if self.trained_before is not None and self.trained_before[1:3] == (
                version, self.model_sha256):
            self.trained_version = (self.run, version)  # sent before a restart
            return [Ignored("trained_before_restart")]
        if self.passed == (ann.round, ann.sample_draw):
            return []
        if not selected(ann.sample_seed, ann.round, self.device_id, ann.sample_rate,
                        ann.sample_draw):
            self.passed = (ann.round, ann.sample_draw)  # the next announcement draws again
            return [Ignored("not_selected")]
        self.training = True
        self.trained_version = (self.run, version)
        self.started_at = now
        self.last_trained_round = max(self.last_trained_round, ann.round)
        return [Train(ann, version, self.weights, self.model_sha256)]

    def _enter_run(self, run: int) -> None:
        """Forget what belongs to an earlier run when ``run`` is a later one."""
        if run <= self.run:
            return
        self.run = run
        self.model_version = -1
        self.weights = None
        self.announcement = None
        self.last_trained_round = 0
        self.passed = None

    def _maybe_train(self) -> list[AgentAction]:
        ann = self.announcement
        if self.training or ann is None or not ann.open or self.weights is None:
            return []
        if ann.mode == "async":
            return []  # trains on a tick, once nothing newer is queued (on_tick)
        if ann.round <= self.last_trained_round:
            return []
        if ann.base_version != self.model_version:
            return []  # wait for the matching model (or the next announcement)
        if self.trained_before == (ann.round, ann.base_version, ann.model_sha256, ann.deadline):
            # Trained before a restart; the outbox still holds (or has sent) that update.
            self.last_trained_round = ann.round
            return [Ignored("trained_before_restart")]
        if self.passed == (ann.round, ann.sample_draw):
            return []  # this draw of this round's sample left it out (counted once)
        if not selected(ann.sample_seed, ann.round, self.device_id, ann.sample_rate,
                        ann.sample_draw):
            # Not the round's end for this device: a redraw (the round extended below its
            # quorum) may still select it.
            self.passed = (ann.round, ann.sample_draw)
            return [Ignored("not_selected")]
        self.training = True
        self.last_trained_round = ann.round
        return [Train(ann, self.model_version, self.weights, ann.model_sha256)]
