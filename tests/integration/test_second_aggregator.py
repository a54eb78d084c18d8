"""One aggregator per federation (issue 10): a second one refuses to start, in one line, and
the first one is not disturbed; a restart after a clean stop or a kill -9 is never refused.

Real Mosquitto (dev.conf: every client its own id); aggregators in-process and as processes.
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from aggregator.service import AggregatorService
from fedmq.broker import MosquittoBroker
from fedmq.errors import AlreadyRunningError
from fedmq.instance import Presence
from fedmq.topics import Topics
from fedmq.transport import PahoTransport

from fedhelpers import aggregator_config, broker_config, running_aggregator, unique_federation

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.broker


def _presence(mosquitto: MosquittoBroker, federation: str, timeout: float = 5.0) -> Presence:
    """The retained presence of ``federation``'s aggregator, read by a fresh client."""
    reader = PahoTransport(broker_config(mosquitto), f"read-{unique_federation()}")
    reader.subscribe(Topics(federation).aggregator, qos=0)
    reader.start()
    try:
        msg = reader.inbox.get(timeout=timeout)
    finally:
        reader.stop()
    presence = Presence.decode(msg.payload)
    assert presence is not None, msg.payload
    return presence


def test_second_aggregator_refuses_and_the_first_runs_on(mosquitto: MosquittoBroker) -> None:
    fed = unique_federation("second")
    config = aggregator_config(broker_config(mosquitto), fed, max_rounds=0)
    with running_aggregator(config) as first:
        assert isinstance(first.transport, PahoTransport)
        online = _presence(mosquitto, fed)
        assert (online.state, online.federation, online.pid) == ("online", fed, os.getpid())
        second = AggregatorService(config)
        t0 = time.monotonic()
        with pytest.raises(AlreadyRunningError) as info:
            second.start()
        assert time.monotonic() - t0 < 2.0
        message = str(info.value)
        assert "\n" not in message
        assert message.startswith(f"another aggregator is running for federation {fed!r} "
                                  f"(host {online.host}, pid {os.getpid()}, started ")
        assert f"on {mosquitto.host}:{mosquitto.port}: refusing to start a second one" in message
        assert f"-t fedmq/v1/{fed}/aggregator -r -n" in message
        # The second never connected as the aggregator: the first kept its one connection.
        time.sleep(0.5)
        assert (first.transport.connects, first.transport.drops) == (1, 0)
        assert first.transport.duplicate_id_seen == 0
        assert isinstance(second.transport, PahoTransport)
        assert second.transport.connects == 0


def test_restart_after_a_clean_stop_starts(mosquitto: MosquittoBroker) -> None:
    fed = unique_federation("clean")
    config = aggregator_config(broker_config(mosquitto), fed, max_rounds=0)
    with running_aggregator(config):
        pass
    assert _presence(mosquitto, fed).state == "offline"  # published by stop()
    with running_aggregator(config) as again:
        assert isinstance(again.transport, PahoTransport)
        assert again.transport.connects == 1
        assert _presence(mosquitto, fed).state == "online"


def _toml(mosquitto: MosquittoBroker, fed: str, tmp_path: Path, state: bool) -> Path:
    path = tmp_path / "aggregator.toml"
    durability = f'[durability]\nstate_dir = "{tmp_path / "state"}"\n' if state else ""
    path.write_text(f'federation = "{fed}"\n' + textwrap.dedent(f"""
        [broker]
        host = "{mosquitto.host}"
        port = {mosquitto.port}
        [model]
        layers = [8, 4, 3]
        """) + durability)
    return path


def _start(config: Path) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-m", "aggregator", "--config", str(config)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_online(mosquitto: MosquittoBroker, fed: str, pid: int, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            presence = _presence(mosquitto, fed, timeout=1)
        except queue.Empty:  # nothing retained yet
            continue
        if presence.state == "online" and presence.pid == pid:
            return
        time.sleep(0.1)
    raise AssertionError(f"aggregator pid {pid} never said online")


@pytest.mark.slow
@pytest.mark.parametrize("durable", [False, True], ids=["stateless", "durable"])
def test_processes_second_refused_in_one_line_then_kill9_restart_starts(
        mosquitto: MosquittoBroker, tmp_path: Path, durable: bool) -> None:
    """`python -m aggregator` twice: exit 2 and one line; after a kill -9 of the first, a new
    one starts at once (the broker published the first one's last will)."""
    fed = unique_federation("proc")
    config = _toml(mosquitto, fed, tmp_path, durable)
    first = _start(config)
    procs = [first]
    try:
        _wait_online(mosquitto, fed, first.pid)
        second = _start(config)
        procs.append(second)
        _, err = second.communicate(timeout=60)
        assert second.returncode == 2, err
        assert "Traceback" not in err
        lines = err.splitlines()
        assert len(lines) == 1, err
        assert lines[0].startswith(f"fedmq aggregator: another aggregator is running for "
                                   f"federation {fed!r} (host "), lines[0]
        assert f"pid {first.pid}" in lines[0]
        assert first.poll() is None
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
        third = _start(config)  # at once: the will is published when the socket closes
        procs.append(third)
        _wait_online(mosquitto, fed, third.pid)
        third.send_signal(signal.SIGTERM)  # maybe while it still starts: a clean stop too
        _, err = third.communicate(timeout=30)
        assert third.returncode in (0, 143), err
        assert "Traceback" not in err
        assert _presence(mosquitto, fed).state == "offline"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()


def test_stale_online_of_a_dead_local_process_does_not_block(
        mosquitto: MosquittoBroker) -> None:
    """A presence left 'online' (a broker that lost the will) by a process of this host that
    is gone does not stop a restart."""
    fed = unique_federation("stale")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = Presence("online", fed, socket.gethostname(), dead.pid, time.time() - 60,
                     f"fedmq-aggregator-{fed}")
    writer = PahoTransport(broker_config(mosquitto), f"w-{fed}")
    writer.start()
    try:
        assert writer.wait_connected(5)
        delivery = writer.publish(Topics(fed).aggregator, stale.encode(), qos=1, retain=True)
        end = time.monotonic() + 5
        while not delivery.done() and time.monotonic() < end:
            time.sleep(0.01)
    finally:
        writer.stop()
    config = aggregator_config(broker_config(mosquitto), fed, max_rounds=0)
    with running_aggregator(config) as agg:
        assert isinstance(agg.transport, PahoTransport)
        assert agg.transport.connects == 1
