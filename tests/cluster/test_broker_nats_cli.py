"""``fedmq broker --engine nats``, run as users run it: a process, MQTT clients, a signal."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from fedmq.broker_common import find_free_port
from fedmq.config import BrokerConfig
from fedmq.transport import PahoTransport


def _free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _three_free_ports() -> int:
    while True:
        base = find_free_port()
        if base < 65533 and all(_free(base + i) for i in range(3)):
            return base


def _processes_under(workdir: Path) -> list[int]:
    """Pids of live processes whose command line names a file under ``workdir``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if str(workdir) in cmdline:
            found.append(int(entry.name))
    return found


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def test_broker_engine_nats_serves_mqtt_on_every_node_and_stops_on_sigterm() -> None:
    base = _three_free_ports()
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedmq.cli", "broker", "--engine", "nats", "--nodes", "3",
         "--port", str(base), "--shards", "fed=2"],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    clients: list[PahoTransport] = []
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(4)]
        for i in range(3):
            assert lines[i].startswith(f"n{i} mqtt 127.0.0.1:{base + i} nats nats://"), lines
        assert "sharded: fed in 2" in lines[3]
        assert lines[3].rstrip().endswith("Ctrl-C stops it"), lines
        workdir = Path(lines[0].split("(config ")[1].split(",")[0]).parents[1]
        assert _processes_under(workdir)  # the nodes run from there
        # A retained model published through node 0 is read through node 2.
        for node in (0, 2):
            transport = PahoTransport(
                BrokerConfig(host="127.0.0.1", port=base + node, mqtt5=False), f"cli-{node}",
                quiet=True)
            clients.append(transport)
            transport.start()
            assert transport.wait_connected(20)
        publish = clients[0].publish("fedmq/v1/fed/model", b"m", qos=1, retain=True)
        deadline = time.monotonic() + 20
        while not publish.done() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert publish.done()
        clients[1].subscribe("fedmq/v1/fed/model", 1)
        message = clients[1].inbox.get(timeout=20)
        assert message.payload == b"m"
        assert message.retain
        for transport in clients:
            transport.stop()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        for transport in clients:
            transport.stop()
        if proc.poll() is None:
            # SIGTERM, not SIGKILL: the nodes run in their own sessions and would outlive it.
            proc.terminate()
            try:
                proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 0, err
    assert not _processes_under(workdir)  # no nats-server left behind
    assert all(_free(base + i) for i in range(3))
    assert not workdir.exists()
