"""The device agent's state machine (device_agent/agent.py): messages in, actions out."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from device_agent.agent import AgentMachine, Ignored, Train
from device_agent.service import AgentService
from device_agent.trainers import MLPTrainer
from fedmq import codec
from fedmq.compression import encode_all
from fedmq.errors import ProtocolError
from fedmq.memory_transport import MemoryTransport
from fedmq.models import init_mlp
from fedmq.sampling import selected
from fedmq.topics import Topics
from fedmq.transport import Message
from fedmq.wire import GlobalModel, RoundAnnouncement, Tensor, model_digest

FED = "fleet"
DEVICE = "sensor-1"


def weights_for(version: int) -> dict[str, np.ndarray]:
    return init_mlp([4, 3], seed=version)


def model(version: int, *, federation: str = FED, sha256: str | None = None,
          run: int = 0) -> GlobalModel:
    tensors = encode_all(weights_for(version))
    return GlobalModel(federation=federation, version=version, round=version,
                       tensors=tensors, sha256=sha256 or model_digest(tensors), run=run)


def announce(round_: int, base_version: int, *, federation: str = FED, open_: bool = True,
             deadline: float = 100.0, rate: float = 1.0, seed: int = 0,
             run: int = 0) -> RoundAnnouncement:
    return RoundAnnouncement(federation=federation, round=round_, base_version=base_version,
                             model_sha256="", deadline=deadline, min_updates=1, max_updates=10,
                             train={"epochs": 1}, sample_seed=seed, sample_rate=rate,
                             open=open_, run=run)


def machine() -> AgentMachine:
    return AgentMachine(FED, DEVICE)


def only_train(actions: list[Train | Ignored]) -> Train:
    assert len(actions) == 1, actions
    (action,) = actions
    assert isinstance(action, Train), action
    return action


def assert_weights(train: Train, version: int) -> None:
    expected = weights_for(version)
    assert list(train.weights) == list(expected)  # same names, same (wire) order
    for name, array in expected.items():
        np.testing.assert_array_equal(train.weights[name], array)


# ---------------------------------------------------------------- training triggers


def test_model_then_round_trains() -> None:
    m = machine()
    assert m.on_model(model(0)) == []  # no announcement yet: nothing to do
    ann = announce(1, 0)
    train = only_train(m.on_round(ann))
    assert train.announcement == ann
    assert train.version == 0
    assert_weights(train, 0)
    assert m.training


def test_round_then_model_trains() -> None:
    m = machine()
    ann = announce(1, 0)
    assert m.on_round(ann) == []  # no model yet: wait for it
    train = only_train(m.on_model(model(0)))
    assert train.announcement == ann
    assert train.version == 0
    assert_weights(train, 0)


def test_next_round_trains_on_the_next_model() -> None:
    m = machine()
    m.on_model(model(0))
    only_train(m.on_round(announce(1, 0)))
    assert m.on_trained(1) == []
    assert m.on_model(model(1)) == []  # round 1 is done; round 2 not announced yet
    train = only_train(m.on_round(announce(2, 1)))
    assert (train.announcement.round, train.version) == (2, 1)
    assert_weights(train, 1)


# ---------------------------------------------------------------- models that are ignored


def test_model_with_bad_checksum_is_ignored() -> None:
    m = machine()
    m.on_round(announce(1, 0))
    assert m.on_model(model(0, sha256="0" * 64)) == [Ignored("bad_checksum")]
    assert m.weights is None
    assert m.model_version == -1
    # The genuine model still works afterwards.
    only_train(m.on_model(model(0)))


def test_model_with_tampered_tensor_is_ignored() -> None:
    good = model(0)
    first = good.tensors[0]
    flipped = bytes([first.data[0] ^ 1]) + first.data[1:]
    tampered = dataclasses.replace(
        good, tensors=(dataclasses.replace(first, data=flipped), *good.tensors[1:]))
    m = machine()
    m.on_round(announce(1, 0))
    assert m.on_model(tampered) == [Ignored("bad_checksum")]
    assert m.weights is None


@pytest.mark.parametrize("old_version", [1, 2], ids=["older", "same"])
def test_old_model_version_is_ignored(old_version: int) -> None:
    m = machine()
    m.on_model(model(2))
    assert m.on_model(model(old_version)) == [Ignored("old_model")]
    assert m.model_version == 2
    assert m.weights is not None
    np.testing.assert_array_equal(m.weights["dense0.weight"], weights_for(2)["dense0.weight"])


def test_model_with_unsupported_codec_is_ignored() -> None:
    t = Tensor(name="dense0.weight", dtype="float32", shape=(1,), codec="no-such-codec",
               data=b"\0\0\0\0")
    m = machine()
    bad = GlobalModel(federation=FED, version=0, round=0, tensors=(t,),
                      sha256=model_digest((t,)))
    assert m.on_model(bad) == [Ignored("unsupported_codec")]
    assert m.weights is None
    assert m.model_version == -1


# ---------------------------------------------------------------- rounds that do not train


def test_round_for_another_base_version_waits_for_that_model() -> None:
    m = machine()
    m.on_model(model(0))
    assert m.on_round(announce(1, 1)) == []  # trained on version 1, which we do not have yet
    assert not m.training
    train = only_train(m.on_model(model(1)))
    assert (train.announcement.round, train.version) == (1, 1)


def test_closed_announcement_never_trains() -> None:
    m = machine()
    assert m.on_round(announce(3, 0, open_=False)) == []
    assert m.on_model(model(0)) == []
    assert m.on_model(model(1)) == []
    assert not m.training
    assert m.last_trained_round == 0


def test_closed_announcement_after_a_model_does_not_train() -> None:
    m = machine()
    m.on_model(model(0))
    assert m.on_round(announce(1, 0, open_=False)) == []
    assert not m.training


def test_same_round_never_trains_twice() -> None:
    m = machine()
    m.on_model(model(0))
    only_train(m.on_round(announce(1, 0, deadline=100.0)))
    # Re-announced while training (deadline extended): no second job.
    assert m.on_round(announce(1, 0, deadline=160.0)) == []
    assert m.on_trained(1) == []
    # Re-announced after training: still nothing.
    assert m.on_round(announce(1, 0, deadline=220.0)) == []
    # A newer model for the same round does not retrain it either.
    assert m.on_model(model(1)) == []
    assert m.on_round(announce(1, 1, deadline=280.0)) == []
    assert not m.training


def test_not_selected_is_ignored_once() -> None:
    m = machine()
    m.on_model(model(0))
    assert m.on_round(announce(1, 0, rate=0.0)) == [Ignored("not_selected")]
    assert not m.training
    # The re-announcement of a round this device sat out is not counted again.
    assert m.on_round(announce(1, 0, rate=0.0, deadline=200.0)) == []
    # The next round draws again (rate 1: selected).
    only_train(m.on_round(announce(2, 0)))


def test_selection_follows_the_shared_hash() -> None:
    """Half the fleet at rate 0.5: this device does exactly what ``selected`` says."""
    outcomes: dict[bool, int] = {True: 0, False: 0}
    for round_ in range(1, 41):
        m = machine()
        m.on_model(model(0))
        actions = m.on_round(announce(round_, 0, rate=0.5, seed=9))
        picked = selected(9, round_, DEVICE, 0.5)
        outcomes[picked] += 1
        if picked:
            only_train(actions)
        else:
            assert actions == [Ignored("not_selected")]
    # Both branches were exercised.
    assert outcomes[True] > 0
    assert outcomes[False] > 0


def test_on_trained_without_training_raises() -> None:
    m = machine()
    with pytest.raises(ProtocolError, match="without a training in progress"):
        m.on_trained(1)
    m.on_model(model(0))
    only_train(m.on_round(announce(1, 0)))
    m.on_trained(1)
    with pytest.raises(ProtocolError):
        m.on_trained(1)  # a second completion for one job


def test_older_round_is_ignored() -> None:
    m = machine()
    m.on_model(model(0))
    only_train(m.on_round(announce(2, 0)))
    m.on_trained(2)
    assert m.on_round(announce(1, 0)) == [Ignored("old_round")]
    assert m.announcement is not None
    assert m.announcement.round == 2


def test_wrong_federation_is_ignored() -> None:
    m = machine()
    assert m.on_model(model(0, federation="other")) == [Ignored("wrong_federation")]
    assert m.on_round(announce(1, 0, federation="other")) == [Ignored("wrong_federation")]
    assert m.weights is None
    assert m.announcement is None
    # Ours still trains.
    m.on_model(model(0))
    only_train(m.on_round(announce(1, 0)))


# ---------------------------------------------------------------- aggregator runs

OLD_RUN, NEW_RUN = 1_700_000_000_000, 1_700_000_900_000


def agent_deep_in_old_run() -> AgentMachine:
    """An agent that trained round 5 on version 4 of the old run."""
    m = machine()
    m.on_model(model(4, run=OLD_RUN))
    only_train(m.on_round(announce(5, 4, run=OLD_RUN)))
    m.on_trained(5)
    return m


@pytest.mark.parametrize("model_first", [True, False])
def test_a_new_run_is_followed_from_its_first_round(model_first: bool) -> None:
    # A rollback or a restart without saved state: numbers start again, the run is larger.
    m = agent_deep_in_old_run()
    if model_first:
        assert m.on_model(model(0, run=NEW_RUN)) == []
        train = only_train(m.on_round(announce(1, 0, run=NEW_RUN)))
    else:
        assert m.on_round(announce(1, 0, run=NEW_RUN)) == []  # the old model is not its base
        assert m.weights is None
        train = only_train(m.on_model(model(0, run=NEW_RUN)))
    assert (train.announcement.run, train.announcement.round, train.version) == (NEW_RUN, 1, 0)
    assert_weights(train, 0)


def test_the_old_runs_messages_are_ignored_once_a_new_run_is_seen() -> None:
    m = agent_deep_in_old_run()
    only_train(m.on_round(announce(1, 0, run=NEW_RUN)) + m.on_model(model(0, run=NEW_RUN)))
    m.on_trained(1)
    # Late or re-delivered messages of the old run, with numbers above the new run's.
    assert m.on_model(model(6, run=OLD_RUN)) == [Ignored("old_model")]
    assert m.on_round(announce(7, 6, run=OLD_RUN)) == [Ignored("old_round")]
    assert (m.run, m.model_version) == (NEW_RUN, 0)
    assert m.announcement is not None
    assert (m.announcement.run, m.announcement.round) == (NEW_RUN, 1)
    # The new run goes on as usual.
    assert m.on_model(model(1, run=NEW_RUN)) == []
    train = only_train(m.on_round(announce(2, 1, run=NEW_RUN)))
    assert (train.announcement.round, train.version) == (2, 1)


def test_messages_without_a_run_keep_the_old_ordering() -> None:
    # Peers that give no run (0) are ordered by their numbers alone, as before runs existed.
    m = machine()
    m.on_model(model(3))
    assert m.on_model(model(0)) == [Ignored("old_model")]
    assert m.run == 0


# ---------------------------------------------------------------- the service counts reasons


def test_service_counts_ignored_reasons() -> None:
    transport = MemoryTransport()
    rng = np.random.default_rng(0)
    trainer = MLPTrainer(rng.normal(size=(6, 4)).astype(np.float32),
                         rng.integers(0, 3, size=6), num_classes=3)
    service = AgentService(FED, DEVICE, trainer, transport, clock=lambda: 0.0)
    topics = Topics(FED)

    def deliver(topic: str, payload: bytes) -> None:
        service.handle_message(Message(topic, payload, qos=1))

    deliver(topics.model, codec.encode(model(0, sha256="f" * 64)))
    deliver(topics.model, codec.encode(model(0, federation="other")))
    deliver(topics.round, b"\xc1 not msgpack")
    deliver(topics.round, codec.encode(model(0)))  # a model on the round topic
    deliver(topics.model, b"")  # a cleared retained message: silently skipped
    assert service.ignored == {"bad_checksum": 1, "wrong_federation": 1, "malformed": 1,
                               "unexpected": 1}
    assert service.updates_sent == 0
    assert not [m for m in transport.published if m.topic == topics.update(DEVICE)]

    deliver(topics.model, codec.encode(model(0)))
    deliver(topics.round, codec.encode(announce(1, 0)))
    assert service.updates_sent == 1
    deliver(topics.model, codec.encode(model(0)))
    assert service.ignored["old_model"] == 1
