"""Secure aggregation inside the aggregator service: ``[privacy] secure_aggregation = true``.

The service keeps its round machine, strategy, write-ahead log and publisher; this coordinator
runs one ``aggregator.secagg.SecAggRound`` beside each round:

* at a round's opening a new secure-aggregation round starts on the same (run, round);
* messages on ``fedmq/v1/{fed}/secagg/.../{device}`` go to it; an accepted one is appended to the
  write-ahead log like an update (replayed after a crash through the same path), a refused one
  is counted as ``secagg_<reason>`` (a reveal that comes after the sum was unmasked is routine:
  counted in ``late``, not as a rejection);
* the service's ticks reach it; a tick that changes a phase is logged; what the round publishes
  (roster, deliveries, unmask request) goes out at the next tick, which comes after the log's
  sync, so no device answers a step that a crash could take back;
* its result, the unmasked ``sum(w' x)`` and ``sum(w')`` of the survivors, is merged into the
  strategy as one partial sum with ``len(survivors)`` contributors, and each survivor is offered
  to the round machine as an update, which then closes the round by its usual rules (quorum and
  grace, or max_updates); a failed secure-aggregation round is abandoned and the next one opened
  on the same model.

Nothing here holds a device's update: the masked sum lives in the ``SecAggRound`` until
unmasking, and the service sees only the survivors' sum. While a secure-aggregation round is
under way no mid-round snapshot is taken (``active``): its state is in the log since the round's
opening, which the replay walks through.

Phases: the round's ``deadline_s`` is split in four equal phase deadlines, so a whole
secure-aggregation round fits in the announced deadline.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from aggregator import closing
from aggregator.async_rounds import machine_for
from aggregator.rounds import Accept, CloseRound, UpdateOffered
from aggregator.secagg import (
    Action,
    Dropped,
    Failed,
    Phase,
    Publish,
    SecAggRound,
    SecAggRules,
    Unmasked,
)
from aggregator.strategies.base import PartialSum
from fedmq.secagg.messages import SecAggTopics
from fedmq.secagg.noise import device_std, fixed_clip
from fedmq.transport import Message

if TYPE_CHECKING:
    from aggregator.service import AggregatorService

log = logging.getLogger("aggregator.service")

#: The announcement's ``train`` key that tells devices to take part through secure aggregation.
ANNOUNCE_KEY = "secure_aggregation"


def attach(svc: AggregatorService) -> SecAggCoordinator | None:
    """The coordinator when the config turns secure aggregation on, else None."""
    if not svc.config.privacy.secure_aggregation:
        return None
    return SecAggCoordinator(svc)


def rules_for(svc: AggregatorService) -> SecAggRules:
    r = svc.config.rounds
    p = svc.config.privacy
    # With DP the devices' values are clipped deltas plus noise: room for both (the
    # announcement's dp_device_std, fedmq.secagg.noise); else SecAggRules' default, 4.
    clip = 4.0
    if p.noise_multiplier > 0 and p.clip_norm is not None:
        clip = fixed_clip(p.clip_norm, device_std(p.noise_multiplier, p.clip_norm, r.min_updates))
    # The weight cap is the operator's ([limits] max_examples): no device weighs more anyway.
    return SecAggRules(min_devices=max(2, r.min_updates), max_devices=r.max_updates,
                       phase_s=r.deadline_s / 4, grace_s=r.grace_s,
                       weight_cap=float(svc.config.limits.max_examples), clip=clip)


class SecAggCoordinator:
    """One secure-aggregation round at a time, wired into ``svc``."""

    def __init__(self, svc: AggregatorService) -> None:
        self.svc = svc
        self.topics = SecAggTopics(svc.config.federation)
        self.rules = rules_for(svc)
        self.round: SecAggRound | None = None
        #: the round before: answers to it are counted in ``late``, not as messages for a
        #: wrong round
        self.previous: SecAggRound | None = None
        #: Answers that came after the sum was unmasked (the unmasking closes as soon as every
        #: secret can be rebuilt, so later reveals are routine): counted, not rejections.
        self.late = 0
        #: what to publish at the next live tick (after the log's sync; after a replay)
        self._unsent: list[Publish] = []
        for topic in self.topics.from_devices:
            svc.transport.subscribe(topic, qos=1)

    def active(self) -> bool:
        """A round is under way whose state only the log holds."""
        r = self.round
        return r is not None and r.phase not in (Phase.DONE, Phase.FAILED)

    def open(self, now: float) -> None:
        svc = self.svc
        self.previous = self.round
        self.round = SecAggRound(svc.config.federation, svc.run, svc.round,
                                 size=svc.spec.total + 1, rules=self.rules, now=now)
        self._unsent = []

    def handle(self, msg: Message) -> bool:
        """Take ``msg`` if it is on a secure-aggregation topic (True), else leave it (False)."""
        if not msg.topic.startswith(f"{self.topics.base}/"):
            return False
        svc = self.svc
        svc.stats.bytes_in += len(msg.payload)
        svc.ledger.bytes_in += len(msg.payload)
        if self.round is None:
            svc._reject("", "", "secagg_wrong_round")
            return True
        actions = self.round.receive(msg.topic, msg.payload, svc._now())
        if (self.previous is not None and len(actions) == 1 and isinstance(a := actions[0], Dropped)
                and a.reason == "wrong_round"):
            late = self.previous.receive(msg.topic, msg.payload, svc._now())
            if late and isinstance(late[0], Dropped) and late[0].reason == "late":
                actions = late
        if not any(isinstance(a, Dropped) for a in actions):
            svc._log()
        self._apply(actions)
        return True

    def tick(self, now: float) -> bool:
        """Pass the clock on; True if a phase changed (the service logs the tick)."""
        if self._unsent and self.svc._replay_now is None:
            for p in self._unsent:
                self._publish(p)
            self._unsent = []
        if self.round is None:
            return False
        actions = self.round.tick(now)
        self._apply(actions)
        return bool(actions)

    def _publish(self, p: Publish) -> None:
        self.svc.transport.publish(p.topic, p.payload, qos=1, retain=p.retain)

    def _apply(self, actions: list[Action]) -> None:
        svc = self.svc
        for a in actions:
            match a:
                case Publish():
                    # Sent at the next tick, which the service gives after the log's sync:
                    # devices never answer a step the log cannot bring back after a crash.
                    self._unsent.append(a)
                case Dropped(reason="late"):
                    self.late += 1
                case Dropped(device=device, reason=reason, detail=detail):
                    svc._reject(device, "", f"secagg_{reason}", detail)
                case Failed(reason=reason, detail=detail):
                    self._failed(reason, detail)
                case Unmasked():
                    self._unmasked(a)

    def _failed(self, reason: str, detail: str) -> None:
        svc = self.svc
        log.warning("round %d: secure aggregation failed (%s: %s)", svc.round, reason, detail)
        # The round machine has no transition to abandon an open round from outside; a fresh
        # one takes the next round's opening (round numbers still only grow: svc.round does).
        svc.machine = machine_for(svc.config.rounds)
        closing.abandon(svc, f"secagg_{reason}", detail, svc._now())

    def _unmasked(self, result: Unmasked) -> None:
        svc = self.svc
        n = len(result.survivors)
        svc.strategy.merge(PartialSum(np.asarray(result.weighted_sum, dtype=np.float64),
                                      result.total_weight, n))
        log.info("round %d: secure aggregation unmasked the sum of %d devices (%d dropped "
                 "after sharing)", svc.round, n, len(result.dropped))
        now = svc._now()
        for device in result.survivors:
            offer = UpdateOffered(device_id=device, round=svc.round, base_version=svc.version,
                                  update_id=f"secagg-{svc.run}-{svc.round}-{device}", now=now)
            for action in svc.machine.handle(offer):
                if isinstance(action, Accept):
                    svc.stats.accepted += 1
                elif isinstance(action, CloseRound):
                    svc._close_round(action.closed_by)
