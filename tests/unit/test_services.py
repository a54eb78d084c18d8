"""Aggregator and agent services wired through one in-memory hub, driven by a fake clock.

No worker threads run while messages flow: ``Fleet.pump`` hands each queued message to the
services' public ``handle_message`` and then ticks the aggregator's round machine with the fake
clock, exactly like one turn of ``AggregatorService._work``. Time moves only when a test calls
``clock.advance``.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from aggregator.service import AggregatorService
from device_agent.service import AgentService
from device_agent.trainers import MLPTrainer
from fedmq import codec
from fedmq.compression import decode_all, encode_all
from fedmq.config import AggregatorConfig, ModelConfig, RoundsConfig, TrainSettings
from fedmq.memory_transport import MemoryHub, MemoryTransport
from fedmq.topics import Topics
from fedmq.transport import Message
from fedmq.wire import GlobalModel, ModelUpdate, RoundAnnouncement, RoundSummary

FED = "svc-test"
TOPICS = Topics(FED)
T0 = 1_000.0
DEADLINE_S = 60.0
# Different local set sizes, so a weighted and an unweighted average differ.
EXAMPLES = {"dev-a": 5, "dev-b": 8, "dev-c": 13}

F32 = npt.NDArray[np.float32]


class FakeClock:
    """A clock the services read through ``clock=``; it moves only when told to."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_config(*, max_rounds: int) -> AggregatorConfig:
    return AggregatorConfig(
        federation=FED,
        model=ModelConfig(layers=[4, 3], seed=1),
        rounds=RoundsConfig(min_updates=3, max_updates=3, deadline_s=DEADLINE_S, grace_s=5.0,
                            below_quorum="extend", max_rounds=max_rounds),
        train=TrainSettings(epochs=2, batch_size=4, lr=0.1),
    )


def make_trainer(num_examples: int, seed: int) -> MLPTrainer:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(num_examples, 4)).astype(np.float32)
    y = rng.integers(0, 3, size=num_examples)
    return MLPTrainer(x, y, num_classes=3)


class Fleet:
    """One aggregator and some agents on a shared ``MemoryHub``, pumped by hand."""

    def __init__(self, config: AggregatorConfig) -> None:
        self.hub = MemoryHub()
        self.clock = FakeClock()
        self.agg_transport = MemoryTransport(self.hub)
        self.aggregator = AggregatorService(config, self.agg_transport, clock=self.clock)
        self.agents: dict[str, AgentService] = {}
        self.agent_transports: dict[str, MemoryTransport] = {}

    def add_agent(self, device_id: str) -> AgentService:
        """An agent subscribed like ``AgentService.start`` does, but without its worker."""
        transport = MemoryTransport(self.hub)
        seed = sorted(EXAMPLES).index(device_id)
        agent = AgentService(FED, device_id, make_trainer(EXAMPLES[device_id], seed), transport,
                             clock=self.clock)
        transport.subscribe(TOPICS.model, qos=1)
        transport.subscribe(TOPICS.round, qos=1)
        transport.start()
        self.agents[device_id] = agent
        self.agent_transports[device_id] = transport
        return agent

    def start_aggregator(self) -> None:
        """Publish model 0 and open round 1 through the public ``start``, then stop the worker.

        Between the two calls the worker sees an empty inbox (it subscribes to updates only,
        and no agent has been pumped) and ticks at a frozen clock, which changes nothing.
        """
        self.aggregator.start(connect_timeout=0.0)
        self.aggregator.stop()
        assert self.aggregator.round == 1

    def tick(self) -> None:
        self.aggregator.step()

    def pump(self) -> int:
        """Deliver every queued message until the system is quiet; returns how many."""
        delivered = 0
        for _ in range(1_000):
            progressed = False
            for agent in self.agents.values():
                while not agent.transport.inbox.empty():
                    agent.handle_message(agent.transport.inbox.get_nowait())
                    progressed = True
                    delivered += 1
            inbox = self.agg_transport.inbox
            while not inbox.empty():
                self.aggregator.handle_message(inbox.get_nowait())
                self.tick()
                progressed = True
                delivered += 1
            self.tick()
            if not progressed:
                return delivered
        raise AssertionError("messages kept flowing: the services never went quiet")

    # ---- what went over the wire

    def published_models(self) -> list[GlobalModel]:
        return [codec.decode_as(m.payload, GlobalModel) for m in self.agg_transport.published
                if m.topic == TOPICS.model]

    def published_rounds(self) -> list[RoundAnnouncement]:
        return [codec.decode_as(m.payload, RoundAnnouncement)
                for m in self.agg_transport.published if m.topic == TOPICS.round]

    def published_summaries(self) -> list[RoundSummary]:
        return [codec.decode_as(m.payload, RoundSummary) for m in self.agg_transport.published
                if m.topic == TOPICS.metrics]

    def published_updates(self) -> list[ModelUpdate]:
        return [codec.decode_as(m.payload, ModelUpdate)
                for device, t in self.agent_transports.items() for m in t.published
                if m.topic == TOPICS.update(device)]


def fedavg(base: dict[str, F32], updates: list[ModelUpdate]) -> dict[str, F32]:
    """The naive reference: base + Σ n·Δ / Σ n, in float64, rounded once to float32."""
    total = float(sum(u.num_examples for u in updates))
    out: dict[str, F32] = {}
    for name, b in base.items():
        acc = np.zeros(b.shape, dtype=np.float64)
        for u in updates:
            acc += u.num_examples * decode_all(u.tensors)[name].astype(np.float64)
        out[name] = (b.astype(np.float64) + acc / total).astype(np.float32)
    return out


def assert_weights_close(actual: dict[str, F32], expected: dict[str, F32]) -> None:
    assert list(actual) == list(expected)
    for name, want in expected.items():
        np.testing.assert_allclose(actual[name], want, rtol=1e-6, atol=1e-7, err_msg=name)


# ---------------------------------------------------------------- scenarios


def test_two_rounds_of_fedavg_over_the_hub() -> None:
    fleet = Fleet(make_config(max_rounds=2))
    for device in EXAMPLES:
        fleet.add_agent(device)
    fleet.start_aggregator()
    fleet.pump()

    agg = fleet.aggregator
    assert agg.done.is_set()
    assert (agg.stats.rounds_completed, agg.stats.accepted, agg.version) == (2, 6, 2)
    assert not agg.stats.rejected
    assert all(a.updates_sent == 2 for a in fleet.agents.values())
    assert all(not a.ignored for a in fleet.agents.values())

    models = fleet.published_models()
    assert [m.version for m in models] == [0, 1, 2]
    updates = fleet.published_updates()
    assert len(updates) == 6
    for version in (1, 2):
        in_round = [u for u in updates if u.round == version]
        assert sorted(u.device_id for u in in_round) == sorted(EXAMPLES)
        assert {u.base_version for u in in_round} == {version - 1}
        assert sorted(u.num_examples for u in in_round) == sorted(EXAMPLES.values())
        base = decode_all(models[version - 1].tensors)
        expected = fedavg(base, in_round)
        assert_weights_close(decode_all(models[version].tensors), expected)
        # The check above tells weighted from unweighted averaging.
        plain = {n: (b + np.mean([decode_all(u.tensors)[n] for u in in_round], axis=0))
                 for n, b in base.items()}
        assert any(not np.allclose(plain[n], expected[n], rtol=1e-6, atol=1e-7) for n in base)
    # The service's own model is what it published last.
    assert_weights_close(agg.model, decode_all(models[2].tensors))

    rounds = fleet.published_rounds()
    assert [(r.round, r.base_version, r.open) for r in rounds] == [
        (1, 0, True), (2, 1, True), (2, 2, False)]
    assert [r.model_sha256 for r in rounds] == [m.sha256 for m in models]
    retained = codec.decode_as(fleet.hub.retained[TOPICS.round].payload, RoundAnnouncement)
    assert not retained.open  # late devices learn there is nothing left to train

    summaries = fleet.published_summaries()
    assert [(s.round, s.version, s.participants, s.closed_by) for s in summaries] == [
        (1, 1, 3, "max_updates"), (2, 2, 3, "max_updates")]
    assert {d for s in summaries for d, _ in s.accepted} == set(EXAMPLES)


def test_a_restart_without_saved_state_is_a_new_run_that_running_agents_follow() -> None:
    fleet = Fleet(make_config(max_rounds=2))
    for device in EXAMPLES:
        fleet.add_agent(device)
    fleet.start_aggregator()
    fleet.pump()  # two rounds: the agents now hold version 2 and have trained round 2
    old = fleet.aggregator
    assert old.version == 2
    old_updates = fleet.published_updates()
    assert {u.run for u in old_updates} == {old.run}

    # Restart without state (a rollback, or no [durability] state_dir): numbers start again.
    fleet.agg_transport = MemoryTransport(fleet.hub)
    fleet.aggregator = AggregatorService(make_config(max_rounds=1), fleet.agg_transport,
                                         clock=fleet.clock)
    fleet.start_aggregator()
    new = fleet.aggregator
    assert new.run > old.run
    assert (new.version, new.round) == (0, 1)
    # An outbox resending the old run's round-1 update: same round and base numbers as the new
    # run's first round, another model: turned away, never folded.
    first_old = next(u for u in old_updates if u.round == 1)
    new.handle_message(Message(TOPICS.update(first_old.device_id), codec.encode(first_old), 1))
    new.step()
    assert new.stats.rejected == {"stale": 1}
    assert new.stats.accepted == 0

    fleet.pump()
    # The agents, never restarted, took version 0 of the new run and trained its round 1.
    assert new.done.is_set()
    assert (new.stats.accepted, new.version) == (3, 1)
    new_updates = [u for u in fleet.published_updates() if u.run == new.run]
    assert sorted(u.device_id for u in new_updates) == sorted(EXAMPLES)
    assert {(u.round, u.base_version) for u in new_updates} == {(1, 0)}
    assert all(a.machine.run == new.run for a in fleet.agents.values())
    models = [m for m in fleet.published_models() if m.run == new.run]
    base = decode_all(models[0].tensors)
    assert_weights_close(decode_all(models[-1].tensors), fedavg(base, new_updates))


def test_deadline_below_quorum_extends_and_agents_do_not_retrain() -> None:
    fleet = Fleet(make_config(max_rounds=1))
    fleet.add_agent("dev-a")
    fleet.add_agent("dev-b")
    fleet.start_aggregator()
    fleet.pump()
    agg = fleet.aggregator
    assert agg.stats.accepted == 2
    assert agg.stats.rounds_completed == 0

    fleet.clock.advance(DEADLINE_S - 1)  # not due yet
    fleet.pump()
    assert len(fleet.published_rounds()) == 1

    fleet.clock.advance(2)  # past the deadline, below quorum: extend
    fleet.pump()
    rounds = fleet.published_rounds()
    assert [(r.round, r.open) for r in rounds] == [(1, True), (1, True)]
    assert rounds[0].deadline == T0 + DEADLINE_S
    assert rounds[1].deadline == fleet.clock.now + DEADLINE_S
    assert rounds[1].deadline > rounds[0].deadline
    # Both agents saw the re-announcement and did not train round 1 again.
    assert [a.updates_sent for a in fleet.agents.values()] == [1, 1]
    assert len(fleet.published_updates()) == 2
    assert not agg.stats.rejected

    # A device that joins now gets the retained, extended round and completes the quorum.
    fleet.clock.advance(10)
    fleet.add_agent("dev-c")
    fleet.pump()
    assert agg.stats.rounds_completed == 1
    assert agg.stats.accepted == 3
    assert not agg.stats.rejected
    assert agg.last_summary is not None
    assert (agg.last_summary.participants, agg.last_summary.closed_by) == (3, "max_updates")
    assert agg.last_summary.duration_s == DEADLINE_S + 1 + 10
    models = fleet.published_models()
    assert_weights_close(decode_all(models[1].tensors),
                         fedavg(decode_all(models[0].tensors), fleet.published_updates()))


def test_bad_payloads_on_an_update_topic_are_counted_and_the_round_goes_on() -> None:
    fleet = Fleet(make_config(max_rounds=1))
    for device in EXAMPLES:
        fleet.add_agent(device)
    fleet.start_aggregator()

    valid = codec.encode(ModelUpdate(
        federation=FED, device_id="rogue", round=1, base_version=0, update_id="u1",
        num_examples=1, tensors=encode_all(fleet.aggregator.model)))
    rogue = MemoryTransport(fleet.hub)
    rogue.start()
    rogue.publish(TOPICS.update("rogue"), b"\xc1 this is not msgpack")
    rogue.publish(TOPICS.update("rogue"), valid[: len(valid) // 2])  # truncated
    fleet.pump()

    agg = fleet.aggregator
    assert agg.stats.rejected == {"malformed": 2}
    assert agg.stats.accepted == 3
    assert agg.stats.rounds_completed == 1
    assert agg.last_summary is not None
    assert agg.last_summary.rejected == {"malformed": 2}
    assert agg.last_summary.participants == 3
    assert sorted(d for d, _ in agg.last_summary.accepted) == sorted(EXAMPLES)
    assert agg.stats.bytes_in == sum(
        len(m.payload) for m in [*rogue.published,
                                 *(m for t in fleet.agent_transports.values()
                                   for m in t.published if "/update/" in m.topic)])


def test_handle_message_ignores_other_topics() -> None:
    fleet = Fleet(make_config(max_rounds=1))
    fleet.start_aggregator()
    fleet.aggregator.handle_message(Message(TOPICS.status("dev-a"), b"\xc1", qos=1))
    fleet.aggregator.handle_message(Message(TOPICS.model, b"\xc1", qos=1))
    assert not fleet.aggregator.stats.rejected
    assert fleet.aggregator.stats.bytes_in == 0


def _seed_with_an_empty_first_draw(devices: list[str], rate: float) -> int:
    """A sampling seed whose round-1 sample is empty, but whose first redraw is not."""
    from fedmq.sampling import selected

    for seed in range(10_000):
        if (not any(selected(seed, 1, d, rate) for d in devices)
                and any(selected(seed, 1, d, rate, draws=1) for d in devices)):
            return seed
    raise AssertionError("no such seed")


def test_an_empty_sample_is_redrawn_when_the_round_is_extended() -> None:
    """Issue 11: with sampling and below_quorum = "extend", a round whose sample was empty used
    to be announced again with the same sample for ever; each extension now redraws (adding
    devices, never dropping one), so the round closes."""
    from dataclasses import replace

    from fedmq.config import SamplingConfig

    devices = sorted(EXAMPLES)
    rate = 0.3
    seed = _seed_with_an_empty_first_draw(devices, rate)
    config = replace(make_config(max_rounds=1),
                     rounds=RoundsConfig(min_updates=1, max_updates=3, deadline_s=DEADLINE_S,
                                         grace_s=0.0, below_quorum="extend", max_rounds=1),
                     sampling=SamplingConfig(rate=rate, seed=seed))
    fleet = Fleet(config)
    for device in devices:
        fleet.add_agent(device)
    fleet.start_aggregator()
    fleet.pump()
    agg = fleet.aggregator
    assert agg.stats.accepted == 0  # nobody was drawn
    assert all(a.ignored["not_selected"] == 1 for a in fleet.agents.values())

    fleet.clock.advance(DEADLINE_S + 1)  # below quorum at the deadline: extend and redraw
    fleet.pump()  # the tick that extends the round publishes its announcement
    fleet.pump()  # which the agents then read
    rounds = fleet.published_rounds()
    assert [(r.round, r.sample_draw) for r in rounds[:2]] == [(1, 0), (1, 1)]
    drawn = {u.device_id for u in fleet.published_updates()}
    from fedmq.sampling import selected

    assert drawn == {d for d in devices if selected(seed, 1, d, rate, draws=1)}
    assert drawn  # the seed was chosen so that the redraw selects someone
    assert agg.stats.rounds_completed == 1
    assert agg.last_summary is not None
    assert agg.last_summary.participants == len(drawn)


def test_subscribe_qos_sets_the_round_and_model_subscriptions() -> None:
    """``[device] subscribe_qos = 0`` (for a NATS cluster, where a QoS 1 subscription is a
    JetStream consumer): every subscription at QoS 0, at start and when the agent asks for the
    retained round and model again; it still receives them."""
    fleet = Fleet(make_config(max_rounds=0))
    transport = MemoryTransport(fleet.hub)
    agent = AgentService(FED, "dev-a", make_trainer(EXAMPLES["dev-a"], 0), transport,
                         clock=fleet.clock)
    agent.subscribe_qos = 0
    agent.start()
    agent.stop()
    assert transport.subscriptions == dict.fromkeys(
        [TOPICS.round, TOPICS.model, TOPICS.model_parts, *agent.secagg.subscriptions()], 0)
    transport.subscriptions.clear()
    transport.start()
    agent.check_waiting()
    fleet.clock.now += 3.5
    agent.check_waiting()  # no announcement yet: subscribes again, at the same QoS
    assert transport.subscriptions == {TOPICS.round: 0, TOPICS.model: 0, TOPICS.model_parts: 0}
    fleet.start_aggregator()
    assert {m.topic for m in list(transport.inbox.queue)} >= {TOPICS.round, TOPICS.model}


def test_an_agent_that_missed_the_retained_round_asks_for_it_again() -> None:
    """A clustered broker can miss a retained message for a subscription made just after its
    publication (docs/scaling.md): the agent's waiting line comes with a new subscription, which
    makes the broker send the retained round and model again."""
    fleet = Fleet(make_config(max_rounds=0))
    agent = fleet.add_agent("dev-a")
    # The aggregator publishes while the agent's subscriptions are not in the hub's routes:
    # retained on the broker, never delivered to it.
    routes = fleet.hub.filters
    fleet.hub.filters = [(c, f) for c, f in routes if c is not agent.transport]
    fleet.start_aggregator()
    fleet.hub.filters = routes
    assert agent.transport.inbox.empty()
    agent.check_waiting()  # connected: the wait starts
    fleet.clock.now += 3.5
    agent.check_waiting()  # the line, and the subscriptions again
    topics = []
    while not agent.transport.inbox.empty():
        msg = agent.transport.inbox.get_nowait()
        topics.append(msg.topic)
        agent.handle_message(msg)
    assert TOPICS.round in topics
    assert TOPICS.model in topics
    assert agent.machine.announcement is not None
    assert agent.machine.announcement.round == 1
