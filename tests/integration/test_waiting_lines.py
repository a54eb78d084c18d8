"""A silent agent says what it waits for (issue 10): no broker, no aggregator, a duplicate id.

Real agents (in-process ``AgentService`` with the MLP trainer, as ``fedmq.demo`` builds them,
or a ``python -m device_agent`` process) against a port with nothing listening and a real
Mosquitto with no aggregator; their log lines are captured and timed.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from device_agent.service import AgentService
from device_agent.trainers import MLPTrainer
from fedmq import codec
from fedmq.broker import MosquittoBroker, find_free_port
from fedmq.config import BrokerConfig
from fedmq.datasets import load_digits_split
from fedmq.memory_transport import MemoryTransport
from fedmq.topics import Topics
from fedmq.transport import PahoTransport
from fedmq.wire import DeviceStatus

from fedhelpers import unique_federation

ROOT = Path(__file__).resolve().parents[2]
NO_ROUND = "no round announcement on"
WAITING = "waiting for the broker at"
DUPLICATE = "another client is connected with client id"


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    x, y, _, _ = load_digits_split(0)
    return x[:60], y[:60]


@pytest.fixture
def agents(digits: tuple[np.ndarray, np.ndarray]) -> Iterator[Callable[..., AgentService]]:
    started: list[AgentService] = []

    def start(federation: str, device_id: str, broker: BrokerConfig) -> AgentService:
        trainer = MLPTrainer(*digits, num_classes=10)
        agent = AgentService.over_mqtt(federation, device_id, trainer, broker)
        agent.start()
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.stop()


def _lines(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if text in r.getMessage()]


def _wait_for(caplog: pytest.LogCaptureFixture, text: str, timeout: float) -> float:
    """Seconds until a line containing ``text`` was logged; fails after ``timeout``."""
    t0 = time.monotonic()
    while not _lines(caplog, text):
        assert time.monotonic() - t0 < timeout, f"no {text!r} line within {timeout} s"
        time.sleep(0.02)
    return time.monotonic() - t0


def test_agent_without_a_broker_says_so_within_5_s(
        agents: Callable[..., AgentService], caplog: pytest.LogCaptureFixture) -> None:
    port = find_free_port()
    broker = BrokerConfig(host="127.0.0.1", port=port, reconnect_min_s=0.1,
                          reconnect_max_s=0.5)  # many tries in the window: still one line
    with caplog.at_level(logging.INFO):
        agent = agents(unique_federation("nobroker"), "lonely-1", broker)
        assert _wait_for(caplog, WAITING, 5.0) < 5.0
        time.sleep(4.0)
    assert isinstance(agent.transport, PahoTransport)
    assert agent.transport.connects == 0
    lines = [r for r in _lines(caplog, WAITING)]
    assert [(r.levelname, r.getMessage()) for r in lines] == [
        ("WARNING", f"waiting for the broker at 127.0.0.1:{port} (connection refused); "
                    "retrying with back-off")]
    assert not _lines(caplog, NO_ROUND)  # not connected: the transport's line, not this one


def test_agent_without_an_aggregator_says_so_within_5_s(
        mosquitto: MosquittoBroker, agents: Callable[..., AgentService],
        caplog: pytest.LogCaptureFixture) -> None:
    fed = unique_federation("misspelt")
    broker = BrokerConfig(host=mosquitto.host, port=mosquitto.port)
    with caplog.at_level(logging.INFO):
        agents(fed, "lonely-2", broker)
        assert _wait_for(caplog, NO_ROUND, 5.0) < 5.0
        time.sleep(3.0)
    address = f"{mosquitto.host}:{mosquitto.port}"
    assert [(r.levelname, r.getMessage()) for r in _lines(caplog, NO_ROUND)] == [
        ("WARNING", f"no round announcement on fedmq/v1/{fed}/round yet (connected to "
                    f"{address}); is the aggregator running and is the federation name right?")]
    assert [r.getMessage() for r in _lines(caplog, "connected to ")
            if r.getMessage().startswith("connected")] == [
        f"connected to {address} as fedmq-device-lonely-2"]
    assert not _lines(caplog, WAITING)


def test_round_wait_line_repeats_at_most_every_30_s_of_the_service_clock(
        digits: tuple[np.ndarray, np.ndarray], caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    agent = AgentService("fed", "clocked", MLPTrainer(*digits, num_classes=10), MemoryTransport(),
                         clock=lambda: now[0])
    agent.transport.start()
    with caplog.at_level(logging.WARNING):
        for _ in range(200):  # 100 s of worker turns, half a second apart
            agent.check_waiting()
            now[0] += 0.5
    times = [float(r.created) for r in _lines(caplog, NO_ROUND)]
    assert len(times) == 4  # at 3, 33, 63 and 93 s
    assert "(connected to the broker)" in _lines(caplog, NO_ROUND)[0].getMessage()


def test_two_agents_with_one_id_say_so_once_each(
        mosquitto: MosquittoBroker, agents: Callable[..., AgentService],
        caplog: pytest.LogCaptureFixture) -> None:
    fed = unique_federation("twins")
    broker = BrokerConfig(host=mosquitto.host, port=mosquitto.port)
    with caplog.at_level(logging.INFO):
        first = agents(fed, "twin", broker)
        assert first.transport.wait_connected(5)
        second = agents(fed, "twin", broker)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 10 and len(_lines(caplog, DUPLICATE)) < 2:
            time.sleep(0.05)
        time.sleep(1.0)
    for agent in (first, second):
        assert isinstance(agent.transport, PahoTransport)
        assert agent.transport.duplicate_id_seen > 0
    assert [(r.levelname, r.getMessage()) for r in _lines(caplog, DUPLICATE)] == [
        ("ERROR", "another client is connected with client id fedmq-device-twin (the broker "
                  "handed it our session): device id 'twin' is in use by another agent: every "
                  "agent needs its own (--device-id, FEDMQ_DEVICE_ID or [device] id)")] * 2


def test_last_will_of_a_killed_agent_carries_its_connect_time(
        mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    fed = unique_federation("will")
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'federation = "{fed}"\n' + textwrap.dedent(f"""
        [broker]
        host = "{mosquitto.host}"
        port = {mosquitto.port}
        [device]
        id = "killed-1"
        [data]
        source = "digits"
        [trainer]
        kind = "softmax"
        """))
    watcher = PahoTransport(BrokerConfig(host=mosquitto.host, port=mosquitto.port),
                            f"watch-{fed}")
    watcher.subscribe(Topics(fed).status("killed-1"))
    watcher.start()
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    started = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "device_agent", "--config", str(cfg)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        def next_status(state: str) -> DeviceStatus:
            deadline = time.monotonic() + 10
            while True:
                msg = watcher.inbox.get(timeout=max(deadline - time.monotonic(), 0.01))
                status = codec.decode(msg.payload)
                assert isinstance(status, DeviceStatus)
                if status.state == state:
                    return status

        online = next_status("online")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        offline = next_status("offline")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
        watcher.stop()
    assert started <= offline.ts <= online.ts + 1.0
