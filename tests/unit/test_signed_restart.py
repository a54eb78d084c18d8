"""What a verifying device keeps across a restart (device_agent.accepted_record, the gate's
floor) and the refusal counts in its retained status (DeviceStatus.ignored)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from test_signing import (
    FED,
    KEY,
    RUN,
    SIGNER,
    VERIFIER,
    announce,
    feed,
    signed_chunked,
    signed_whole,
)

from device_agent.accepted_record import load_accepted, save_accepted
from device_agent.model_gate import accepted_path, gate_of
from device_agent.service import AgentService
from device_agent.trainers import MLPTrainer
from fedmq import codec, signing
from fedmq.config import AgentConfig, DeviceConfig, TrustConfig
from fedmq.memory_transport import MemoryTransport
from fedmq.signed_gate import SignedGate
from fedmq.topics import Topics
from fedmq.transport import Message
from fedmq.wire import DeviceStatus


def _config(state: Path) -> AgentConfig:
    return AgentConfig(federation=FED, device=DeviceConfig(id="dev-1", state_dir=str(state)),
                       security=TrustConfig(trusted_keys=[signing.public_text(KEY.public_key())]))


def _service(config: AgentConfig) -> AgentService:
    rng = np.random.default_rng(0)
    trainer = MLPTrainer(rng.normal(size=(6, 64)).astype(np.float32),
                         rng.integers(0, 10, size=6), num_classes=10)
    service = AgentService(FED, "dev-1", trainer, MemoryTransport(), clock=lambda: 0.0,
                           evaluate=False)
    service.gate, service.accepted_path = gate_of(config, "dev-1"), accepted_path(config)
    return service


def _deliver(service: AgentService, topic: str, payload: bytes) -> None:
    service.handle_message(Message(topic, payload, qos=1))


def test_the_record_round_trips_and_a_damaged_one_is_ignored(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "accepted.json"
    assert load_accepted(None) is None
    assert load_accepted(path) is None
    save_accepted(path, (RUN, 7), (RUN, 8))
    assert load_accepted(path) == ((RUN, 7), (RUN, 8))
    caplog.set_level(logging.WARNING)
    for bad in (b"", b"{", b"[]", json.dumps({"model": [1, 2]}).encode(),
                json.dumps({"model": [1, "2"], "round": [1, 2]}).encode(),
                json.dumps({"model": [1, True], "round": [1, 2]}).encode(),
                json.dumps({"model": [1, 2, 3], "round": [1, 2]}).encode()):
        path.write_bytes(bad)
        assert load_accepted(path) is None, bad
    assert len(caplog.records) == 7


def test_the_floor_refuses_what_is_older_even_with_nothing_held() -> None:
    gate = SignedGate(VERIFIER)
    gate.floor_model, gate.floor_round = (RUN, 4), (RUN, 5)
    nothing = (0, -1)
    assert feed(gate, codec.encode(signed_whole(3)), nothing) == (None, "old_model")
    manifest, parts = signed_chunked(3)
    for payload in (manifest, *parts):
        assert feed(gate, payload, nothing) == (None, "old_model")
    assert gate.round(SIGNER.round(announce(4, 3))) == "old_round"
    # What it accepted before (the same version and round) and anything newer pass.
    whole, reason = feed(gate, codec.encode(signed_whole(4)), nothing)
    assert reason is None
    assert whole is not None
    assert gate.round(SIGNER.round(announce(5, 4))) is None
    assert gate.round(SIGNER.round(announce(1, 0, run=RUN + 1))) is None
    # The signature is checked first: an unsigned old announcement says so.
    assert gate.round(announce(4, 3)) == "unsigned"


def test_a_restarted_service_refuses_a_replay_a_fresh_one_takes(tmp_path: Path) -> None:
    topics = Topics(FED)
    first = _service(_config(tmp_path / "a"))
    _deliver(first, topics.model, codec.encode(signed_whole(2)))
    _deliver(first, topics.round, codec.encode(SIGNER.round(announce(3, 2))))
    assert first.updates_sent == 1
    assert load_accepted(first.accepted_path) == ((RUN, 2), (RUN, 3))

    again = _service(_config(tmp_path / "a"))  # the same state_dir: a restart
    assert again.gate is not None
    assert (again.gate.floor_model, again.gate.floor_round) == ((RUN, 2), (RUN, 3))
    _deliver(again, topics.model, codec.encode(signed_whole(1)))
    _deliver(again, topics.round, codec.encode(SIGNER.round(announce(2, 1))))
    assert (again.ignored["old_model"], again.ignored["old_round"]) == (1, 1)
    assert (again.machine.model_version, again.updates_sent) == (-1, 0)

    fresh = _service(_config(tmp_path / "b"))  # no record: the replay is a valid model
    _deliver(fresh, topics.model, codec.encode(signed_whole(1)))
    assert fresh.machine.model_version == 1


def test_the_status_carries_the_refusal_counts(tmp_path: Path) -> None:
    service = _service(_config(tmp_path))
    topics = Topics(FED)
    _deliver(service, topics.model, codec.encode(signed_whole(1, run=RUN + 9,
                                                              signer=signing.Signer(
                                                                  signing.generate()))))
    _deliver(service, topics.round, codec.encode(announce(1, 0, run=RUN + 9)))
    _deliver(service, topics.round, b"\xc1")
    service.publish_status("online")
    assert isinstance(service.transport, MemoryTransport)
    status = codec.decode_as(service.transport.published[-1].payload, DeviceStatus)
    assert dict(status.ignored) == {"untrusted_key": 1, "unsigned": 1, "malformed": 1}
