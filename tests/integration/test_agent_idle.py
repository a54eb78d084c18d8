"""An idle agent sleeps, and reconnects back off with jitter on every path (issue 13, point 4).

Real Mosquitto brokers on free ports; a real ``AgentService`` (the MLP trainer, as the demo
builds it) in this process. Wake-ups are counted, never timed: the worker's loop turns
(``AgentService.wakeups``) and the voluntary context switches of the worker and paho threads
(``/proc/self/task/TID/status``), over a few seconds between rounds. The 10 Hz inbox poll this
replaced made about 30 worker turns in 3 s; paho's own loop woke every second.
"""

from __future__ import annotations

import logging
import os
import random
import resource
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from device_agent.service import AgentService
from device_agent.trainers import MLPTrainer
from fedmq import codec, paho_client
from fedmq.backoff import Backoff
from fedmq.broker import MosquittoBroker, find_free_port
from fedmq.config import BrokerConfig
from fedmq.datasets import load_digits_split
from fedmq.topics import Topics
from fedmq.transport import PahoTransport
from fedmq.wire import RoundAnnouncement

from fedhelpers import unique_federation, wait_until

#: The window over which wake-ups are counted, and the most allowed per second (the old
#: polling loop made 10 worker turns a second; an idle agent now makes none).
WINDOW_S = 3.0
MAX_WAKEUPS_PER_S = 3.0


def _switches(tid: int) -> int:
    """Voluntary context switches of one thread of this process (each one a sleep)."""
    status = Path(f"/proc/self/task/{tid}/status").read_text()
    line = next(ln for ln in status.splitlines() if ln.startswith("voluntary_ctxt_switches:"))
    return int(line.split()[1])


def _announce_closed(broker: MosquittoBroker, federation: str) -> None:
    """Retain a closed round: the federation is between rounds."""
    ann = RoundAnnouncement(federation=federation, round=1, base_version=0, model_sha256="",
                            deadline=time.time(), min_updates=1, max_updates=1, open=False)
    pub = PahoTransport(BrokerConfig(host=broker.host, port=broker.port),
                        client_id=f"ann-{uuid.uuid4().hex}", quiet=True)
    pub.start()
    try:
        assert pub.wait_connected(10)
        delivery = pub.publish(Topics(federation).round, codec.encode(ann), retain=True)
        wait_until(delivery.done, 10, "the announcement's PUBACK")
    finally:
        pub.stop()


@pytest.fixture
def agent(mosquitto: MosquittoBroker) -> Iterator[AgentService]:
    x, y, _, _ = load_digits_split(0)
    federation = unique_federation("idle")
    _announce_closed(mosquitto, federation)
    service = AgentService.over_mqtt(federation, "idle-dev", MLPTrainer(x[:60], y[:60],
                                                                        num_classes=10),
                                     BrokerConfig(host=mosquitto.host, port=mosquitto.port))
    service.start()
    try:
        wait_until(lambda: service.machine.announcement is not None, 15,
                   "the retained announcement")
        yield service
    finally:
        service.stop()


@pytest.mark.broker
def test_an_idle_agent_sleeps_between_rounds(agent: AgentService) -> None:
    assert isinstance(agent.transport, PahoTransport)
    worker, paho = agent._worker, agent.transport._client._thread
    assert worker is not None
    assert paho is not None
    assert worker.native_id is not None
    assert paho.native_id is not None
    time.sleep(0.5)  # the subscriptions' SUBACKs and the online status are behind it
    turns0, w0, p0 = agent.wakeups, _switches(worker.native_id), _switches(paho.native_id)
    time.sleep(WINDOW_S)
    turns = agent.wakeups - turns0
    worker_switches = _switches(worker.native_id) - w0
    paho_switches = _switches(paho.native_id) - p0
    limit = MAX_WAKEUPS_PER_S * WINDOW_S
    assert turns < limit, f"{turns} worker turns in {WINDOW_S} s"
    assert worker_switches < limit, f"{worker_switches} worker wake-ups in {WINDOW_S} s"
    assert paho_switches < limit, f"{paho_switches} paho loop wake-ups in {WINDOW_S} s"
    # Still awake to the network: a new announcement is handled at once.
    _announce_again = RoundAnnouncement(
        federation=agent.federation, round=2, base_version=0, model_sha256="",
        deadline=time.time(), min_updates=1, max_updates=1, open=False)
    pub = PahoTransport(agent.transport.broker, client_id=f"p-{uuid.uuid4().hex}", quiet=True)
    pub.start()
    try:
        assert pub.wait_connected(10)
        pub.publish(agent.topics.round, codec.encode(_announce_again), retain=True)
        wait_until(lambda: agent.machine.announcement is not None
                   and agent.machine.announcement.round == 2, 10, "round 2 handled")
    finally:
        pub.stop()


@pytest.mark.broker
def test_idle_timeout_follows_the_agents_own_timers(agent: AgentService) -> None:
    assert agent.idle_timeout() == pytest.approx(60.0)  # nothing due: only the safety net
    agent._status_due = True  # a refusal to report: the status refresh is due within 1 s
    assert agent.idle_timeout() <= 1.0
    agent._status_due = False
    agent._round_seen = False  # connected without an announcement: the warning's timer
    agent._waiting_since = agent.clock()
    assert 2.0 < agent.idle_timeout() <= 3.0


def _expected_delays(cfg: BrokerConfig, seed: int, n: int) -> list[float]:
    backoff = Backoff(cfg.reconnect_min_s, cfg.reconnect_max_s, random.Random(seed))
    return [max(backoff.next_delay(), 0.05) for _ in range(n)]


def _assert_backoff(transport: PahoTransport, cfg: BrokerConfig, seed: int,
                    skip: int = 0) -> None:
    """The reconnect waits are the seeded Backoff's draws: full jitter over a window that
    doubles per failed attempt (so the attempts thin out), not paho's fixed second."""
    delays = list(transport.reconnect_delays)
    assert len(delays) >= 3, delays
    expected = _expected_delays(cfg, seed, skip + len(delays))[skip:]
    assert delays == pytest.approx(expected), delays
    assert len(set(delays)) > 1  # jittered, never one fixed delay


@pytest.mark.broker
def test_connect_refused_at_start_backs_off() -> None:
    port = find_free_port("127.0.0.1")
    cfg = BrokerConfig(host="127.0.0.1", port=port, reconnect_min_s=0.1, reconnect_max_s=5.0)
    transport = PahoTransport(cfg, client_id=f"c-{uuid.uuid4().hex}", seed=7, quiet=True)
    transport.start()
    try:
        wait_until(lambda: len(transport.reconnect_delays) >= 4, 15, "four attempts")
        assert transport.last_error is not None
        assert "refused" in transport.last_error
        _assert_backoff(transport, cfg, seed=7)
    finally:
        transport.stop()


@pytest.mark.broker
def test_reconnects_after_a_broker_restart_with_growing_jittered_delays(
        mosquitto_factory: Any) -> None:
    broker: MosquittoBroker = mosquitto_factory()
    cfg = BrokerConfig(host=broker.host, port=broker.port, reconnect_min_s=0.1,
                       reconnect_max_s=5.0)
    transport = PahoTransport(cfg, client_id=f"r-{uuid.uuid4().hex}", seed=3, quiet=True)
    transport.start()
    try:
        assert transport.wait_connected(10)
        assert not transport.reconnect_delays  # the first connect waits for nothing
        broker.stop()  # lost mid-run: paho's loop sees the socket close
        wait_until(lambda: len(transport.reconnect_delays) >= 4, 20,
                   "four reconnect waits while the broker is away")
        _assert_backoff(transport, cfg, seed=3)
        assert transport._backoff.attempt >= 4
        broker.restart()
        assert transport.wait_connected(30), transport.last_error
        assert transport.connects == 2
        assert transport._backoff.attempt == 0  # a CONNACK starts the window over
    finally:
        transport.stop()


@pytest.mark.broker
def test_a_broker_out_of_file_descriptors_is_named_and_backed_off(
        mosquitto_factory: Any) -> None:
    """Mosquitto with no descriptor left accepts a connection and closes it at once (its log:
    "system socket count has been exceeded"); the client says so and backs off."""
    broker: MosquittoBroker = mosquitto_factory()
    assert broker.pid is not None
    soft, hard = resource.prlimit(broker.pid, resource.RLIMIT_NOFILE)
    in_use = len(os.listdir(f"/proc/{broker.pid}/fd"))
    resource.prlimit(broker.pid, resource.RLIMIT_NOFILE, (in_use, hard))
    cfg = BrokerConfig(host=broker.host, port=broker.port, reconnect_min_s=0.1,
                       reconnect_max_s=5.0)
    transport = PahoTransport(cfg, client_id=f"e-{uuid.uuid4().hex}", seed=11, quiet=True)
    transport.start()
    try:
        wait_until(lambda: len(transport.reconnect_delays) >= 4, 20, "four reconnect waits")
        assert not transport.connected
        assert transport.last_error is not None
        assert "before accepting it" in transport.last_error
        _assert_backoff(transport, cfg, seed=11)
        resource.prlimit(broker.pid, resource.RLIMIT_NOFILE, (soft, hard))
        assert transport.wait_connected(30), transport.last_error
    finally:
        transport.stop()


@pytest.mark.broker
def test_a_socket_select_cannot_watch_is_one_loud_line_and_backs_off(
        mosquitto: MosquittoBroker, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """paho's loop uses select(): a socket numbered 1024 or above made it reconnect about
    once a second in silence. Now: one ERROR naming the limit, and the usual back-off."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.fail(f"this test needs a hard open-file limit of 1200 or more, not {hard}")
    if soft != resource.RLIM_INFINITY and soft < 1200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1200, hard))
    monkeypatch.setattr(paho_client, "_fd_limit_logged", False)
    held: list[int] = []
    cfg = BrokerConfig(host=mosquitto.host, port=mosquitto.port, reconnect_min_s=0.1,
                       reconnect_max_s=5.0)
    transport = PahoTransport(cfg, client_id=f"fd-{uuid.uuid4().hex}", seed=5, quiet=True)
    try:
        while len(held) < 1100:  # every lower descriptor taken: paho's sockets get high ones
            held.append(os.open(os.devnull, os.O_RDONLY))
        with caplog.at_level(logging.DEBUG, logger="fedmq.transport"):
            transport.start()
            wait_until(lambda: len(transport.reconnect_delays) >= 3, 20,
                       "three reconnect waits")
        assert not transport.connected
        errors = [r for r in caplog.records if r.levelno == logging.ERROR
                  and "FD_SETSIZE" in r.getMessage()]
        assert len(errors) == 1, [r.getMessage() for r in caplog.records]
        assert "select()" in errors[0].getMessage()
        assert transport.last_error is not None
        assert "FD_SETSIZE" in transport.last_error
        _assert_backoff(transport, cfg, seed=5)
    finally:
        transport.stop()
        for fd in held:
            os.close(fd)
        if soft != resource.RLIM_INFINITY and soft < 1200:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    # With the descriptors back, the same kind of client connects.
    again = PahoTransport(cfg, client_id=f"fd2-{uuid.uuid4().hex}", quiet=True)
    again.start()
    try:
        assert again.wait_connected(10)
    finally:
        again.stop()
