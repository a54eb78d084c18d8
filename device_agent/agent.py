"""The device agent's state machine (sans-I/O: messages in, actions out, no clock, no sockets).

The agent keeps the newest verified global model and the newest round announcement; when the
announcement is open, names the model version it holds, selects this device, and the device has
not trained for that round yet, it asks for training. Announcement and model may arrive in either
order (they are separate retained topics), so whichever comes second triggers the training.

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


@dataclass(frozen=True, slots=True)
class Ignored:
    """A message was ignored; ``reason`` says why (logged and counted by the service)."""

    reason: str


AgentAction = Train | Ignored


class AgentMachine:
    """Decides when a device trains. One instance per device."""

    def __init__(self, federation: str, device_id: str) -> None:
        self.federation = federation
        self.device_id = device_id
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
        return [Train(ann, self.model_version, self.weights)]
