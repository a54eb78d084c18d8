"""The agent machine in asynchronous rounds (FedBuff): it trains on a tick from the newest model
it holds, at most once per model version, within ``max_staleness``, paced by ``min_interval_s``.
Time is passed in, never read."""

from __future__ import annotations

import dataclasses

import pytest
from test_agent import DEVICE, FED, assert_weights, model

from device_agent.agent import AgentMachine, Ignored, Train
from fedmq.sampling import selected
from fedmq.wire import RoundAnnouncement


def announce(round_: int, base_version: int, *, max_staleness: int = 3, open_: bool = True,
             rate: float = 1.0, seed: int = 0, run: int = 0) -> RoundAnnouncement:
    return RoundAnnouncement(federation=FED, round=round_, base_version=base_version,
                             model_sha256="", deadline=100.0, min_updates=1, max_updates=4,
                             train={"epochs": 1}, sample_seed=seed, sample_rate=rate,
                             open=open_, run=run, mode="async", max_staleness=max_staleness)


def machine(min_interval_s: float = 0.0) -> AgentMachine:
    return AgentMachine(FED, DEVICE, min_interval_s=min_interval_s)


def trains(actions: list[Train | Ignored]) -> Train:
    assert len(actions) == 1, actions
    assert isinstance(actions[0], Train), actions
    return actions[0]


def finish(m: AgentMachine, job: Train) -> None:
    assert m.on_trained(job.announcement.round) == []  # async: nothing until the next tick


def test_messages_alone_never_train_in_async_rounds() -> None:
    m = machine()
    assert m.on_model(model(0)) == []
    assert m.on_round(announce(1, 0)) == []
    job = trains(m.on_tick(0.0))
    assert job.version == 0
    assert_weights(job, 0)
    assert job.model_sha256 == model(0).sha256


def test_never_twice_from_one_version_and_again_from_a_newer_one() -> None:
    m = machine()
    m.on_model(model(0))
    m.on_round(announce(1, 0))
    finish(m, trains(m.on_tick(0.0)))
    assert m.on_tick(1.0) == []
    assert m.on_tick(50.0) == []
    m.on_round(announce(2, 1))  # a newer round, but the model is still version 0
    assert m.on_tick(51.0) == []
    m.on_model(model(1))
    job = trains(m.on_tick(52.0))
    assert (job.version, job.announcement.round) == (1, 2)
    assert_weights(job, 1)


def test_the_newest_model_held_is_trained_from_even_ahead_of_the_announcement() -> None:
    # Model v2 may arrive before round 3's announcement: the update from it is not stale.
    m = machine()
    m.on_round(announce(2, 1))
    m.on_model(model(1))
    m.on_model(model(2))
    job = trains(m.on_tick(0.0))
    assert job.version == 2
    assert job.announcement.round == 2


def test_no_tick_while_training() -> None:
    m = machine()
    m.on_model(model(0))
    m.on_round(announce(1, 0))
    job = trains(m.on_tick(0.0))
    m.on_model(model(1))
    m.on_round(announce(2, 1))
    assert m.on_tick(1.0) == []  # still training from version 0
    finish(m, job)
    assert trains(m.on_tick(2.0)).version == 1


@pytest.mark.parametrize(("interval", "gap", "trains_again"),
                         [(10.0, 9.999, False), (10.0, 10.0, True), (0.0, 0.0, True)])
def test_min_interval_paces_from_one_start_to_the_next(interval: float, gap: float,
                                                       trains_again: bool) -> None:
    m = machine(interval)
    m.on_model(model(0))
    m.on_round(announce(1, 0))
    finish(m, trains(m.on_tick(100.0)))
    m.on_model(model(1))
    m.on_round(announce(2, 1))
    actions = m.on_tick(100.0 + gap)
    assert (actions != []) is trains_again
    if not trains_again:
        assert trains(m.on_tick(100.0 + interval)).version == 1


def test_a_model_staler_than_max_staleness_is_not_trained_from() -> None:
    m = machine()
    m.on_model(model(0))
    m.on_round(announce(5, 3, max_staleness=2))  # 0 is 3 versions behind 3
    assert m.on_tick(0.0) == []
    m.on_round(announce(6, 3, max_staleness=3))
    assert trains(m.on_tick(1.0)).version == 0  # exactly max_staleness: still counts


def test_closed_or_sync_announcements_do_not_tick() -> None:
    m = machine()
    m.on_model(model(0))
    m.on_round(announce(1, 0, open_=False))
    assert m.on_tick(0.0) == []
    s = machine()
    s.on_model(model(0))
    sync = dataclasses.replace(announce(1, 0), mode="sync", max_staleness=0)
    job = trains(s.on_round(sync))  # sync rounds train on the messages, as before
    s.on_trained(1)
    assert job.version == 0
    assert s.on_tick(5.0) == []


def test_trained_before_a_restart_is_not_trained_again() -> None:
    m = machine()
    m.trained_before = (1, 0, model(0).sha256, 100.0)  # (round, version, digest, deadline)
    m.on_model(model(0))
    m.on_round(announce(2, 1))
    assert m.on_tick(0.0) == [Ignored("trained_before_restart")]
    assert m.on_tick(1.0) == []
    m.on_model(model(1))
    assert trains(m.on_tick(2.0)).version == 1


def test_the_sample_still_selects_devices_per_round() -> None:
    seed = next(s for s in range(1000) if not selected(s, 1, DEVICE, 0.5, 0))
    m = machine()
    m.on_model(model(0))
    m.on_round(announce(1, 0, rate=0.5, seed=seed))
    assert m.on_tick(0.0) == [Ignored("not_selected")]
    assert m.on_tick(1.0) == []  # counted once per round and draw
    later = next(r for r in range(2, 100) if selected(seed, r, DEVICE, 0.5, 0))
    m.on_round(announce(later, 0, rate=0.5, seed=seed))
    assert trains(m.on_tick(2.0)).version == 0


def test_a_new_run_trains_from_its_first_model() -> None:
    m = machine()
    m.on_model(model(4))
    m.on_round(announce(5, 4))
    finish(m, trains(m.on_tick(0.0)))
    m.on_round(announce(1, 0, run=1))
    m.on_model(model(0, run=1))  # version 0 again, but of a newer run
    job = trains(m.on_tick(1.0))
    assert (job.version, m.run) == (0, 1)
