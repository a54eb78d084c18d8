"""How should aggregator workers read updates from the NATS cluster? Measured under failover.

Devices publish N QoS 1 updates over MQTT 3.1.1 to a 3-node cluster (spread over the nodes,
``fedmq/v1/bench/update/DEV``, sharded into 2 shards by the engine's subject mapping) while the
node the consumers depend on is SIGKILLed mid-stream and restarted. Three ways to consume:

(a) ``mqtt``: one worker per shard, a persistent MQTT 3.1.1 session (clean_session=False)
    subscribed QoS 1 to its shard topic: a durable consumer on the engine's own ``$MQTT_msgs``
    stream. Killed: the ``$MQTT_msgs`` leader. In even trials both workers sit on surviving
    nodes; in odd ones worker 0 is on the killed node (it reconnects there after the restart).
(b) ``workqueue``: a replicated (R3) JetStream work-queue stream of our own on the shard
    subjects, one durable pull consumer per shard read with nats-py. Killed: that stream's leader.
(c) ``queue``: a core NATS queue group over both shards (nats-py). Nothing is stored, so the
    node that matters is the one a member is connected to: that one is killed.

For each trial: ``acked`` (publishes the cluster acknowledged to the device), ``lost`` (acked but
never delivered to a consumer), ``duplicates`` (deliveries beyond the first), ``unacked``.

    .venv/bin/python benchmarks/cluster_consume.py [--trials 3] [--messages 3000] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedmq.config import BrokerConfig
from fedmq.nats_cluster import MQTT_MSGS_STREAM, NatsCluster
from fedmq.sharding import shard_filter
from fedmq.transport import Delivery, PahoTransport

FED = "bench"
SHARDS = 2
OWN_STREAM = "FEDMQ_UPDATES"
OPTIONS = ("mqtt", "workqueue", "queue")
DRAIN_S = 45.0  # > the engine's 30 s ack wait for MQTT sessions, so redeliveries are counted
SETTLE_S = 3.0  # once every acknowledged update arrived, wait this long for late duplicates


@dataclass
class Trial:
    option: str
    trial: int
    messages: int
    acked: int = 0
    unacked: int = 0
    delivered: int = 0
    lost: int = 0
    duplicates: int = 0
    killed: str = ""
    leader_after: str = ""
    publish_s: float = 0.0
    worker_on_killed_node: bool = False
    #: (b): of the lost updates, how many were still in the stream, never delivered.
    lost_but_stored: int = 0
    #: Lost updates by the node their device published through (n0, n1, n2).
    lost_by_node: dict[str, int] = field(default_factory=dict)
    #: Deliveries per consumer (MQTT session or nats-py client), in order of creation.
    per_consumer: list[int] = field(default_factory=list)
    lost_ids: list[str] = field(default_factory=list)


class Received:
    """What the consumers got, from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.ids: list[str] = []
        self.changed = time.monotonic()

        self.per_consumer: Counter[int] = Counter()

    def add(self, payload: bytes, consumer: int = 0) -> None:
        ident = payload.split(b"|", 1)[0].decode()
        with self._lock:
            self.ids.append(ident)
            self.per_consumer[consumer] += 1
            self.changed = time.monotonic()

    def snapshot(self) -> list[str]:
        with self._lock:
            return list(self.ids)


# -- consumers ---------------------------------------------------------------------------------


class MqttWorkers:
    """(a): one persistent MQTT 3.1.1 session per shard, QoS 1, on surviving nodes."""

    def __init__(self, cluster: NatsCluster, victim: int, received: Received,
                 on_victim: bool) -> None:
        nodes = [i for i in range(len(cluster.nodes)) if i != victim]
        if on_victim:
            nodes = [victim, nodes[0]]
        self.transports: list[PahoTransport] = []
        self.received = received
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        for shard in range(SHARDS):
            host, port = cluster.mqtt_endpoints[nodes[shard % len(nodes)]]
            transport = PahoTransport(
                BrokerConfig(host=host, port=port, mqtt5=False, reconnect_max_s=2.0),
                f"worker-{shard}", session_expiry_s=3600, quiet=True)
            transport.subscribe(shard_filter(FED, shard), 1)
            transport.start()
            if not transport.wait_connected(20):
                raise RuntimeError(f"worker {shard} could not connect")
            self.transports.append(transport)
            thread = threading.Thread(target=self._drain, args=(transport, shard), daemon=True)
            thread.start()
            self._threads.append(thread)
        deadline = time.monotonic() + 20
        while any(t.subacks == 0 for t in self.transports) and time.monotonic() < deadline:
            time.sleep(0.01)

    def _drain(self, transport: PahoTransport, index: int) -> None:
        import queue

        while not self._stop.is_set():
            try:
                message = transport.inbox.get(timeout=0.2)
            except queue.Empty:
                continue
            self.received.add(message.payload, index)

    def close(self) -> None:
        self._stop.set()
        for transport in self.transports:
            transport.stop()


class NatsConsumers:
    """(b) and (c): nats-py in its own event loop thread."""

    def __init__(self, cluster: NatsCluster, option: str, received: Received) -> None:
        self.cluster = cluster
        self.option = option
        self.received = received
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self._stop = asyncio.Event()
        self._tasks: list[Any] = []
        self.clients: list[Any] = []
        self.call(self._setup())

    def call(self, coro: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _connect(self) -> Any:
        import nats

        async def quiet(exc: Exception) -> None:
            pass  # failover errors are expected here; nats-py would print each one

        nc = await nats.connect(servers=self.cluster.nats_urls, max_reconnect_attempts=-1,
                                reconnect_time_wait=0.2, connect_timeout=2,
                                allow_reconnect=True, error_cb=quiet)
        self.clients.append(nc)
        return nc

    async def _setup(self) -> None:
        from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StorageType

        prefix = f"fedmq.v1.{FED}.shard"
        if self.option == "workqueue":
            nc = await self._connect()
            js = nc.jetstream(timeout=5)
            await js.add_stream(name=OWN_STREAM, subjects=[f"{prefix}.*.update.*"],
                                retention=RetentionPolicy.WORK_QUEUE, num_replicas=3,
                                storage=StorageType.FILE)
            for shard in range(SHARDS):
                sub = await js.pull_subscribe(
                    f"{prefix}.{shard}.update.*", durable=f"w{shard}", stream=OWN_STREAM,
                    config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=5,
                                          num_replicas=3))
                self._tasks.append(asyncio.ensure_future(self._pull(sub, shard)))
        else:
            for member in range(2):
                nc = await self._connect()

                async def on_core(msg: Any, member: int = member) -> None:
                    self.received.add(msg.data, member)

                await nc.subscribe(f"{prefix}.*.update.*", queue="workers", cb=on_core)
                await nc.flush()

    async def _pull(self, sub: Any, index: int) -> None:
        while not self._stop.is_set():
            try:
                msgs = await sub.fetch(200, timeout=1)
            except Exception:
                await asyncio.sleep(0.05)
                continue
            for msg in msgs:
                self.received.add(msg.data, index)
                # An ack lost in failover: the message is redelivered (a counted duplicate).
                with contextlib.suppress(Exception):
                    await msg.ack()

    async def _stored(self) -> list[str]:
        """Every update still stored in our stream: the durable consumers are deleted, then
        one ephemeral consumer reads the whole stream (a work queue allows no overlap)."""
        nc = self.clients[0]
        js = nc.jetstream(timeout=5)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for shard in range(SHARDS):
            with contextlib.suppress(Exception):
                await js.delete_consumer(OWN_STREAM, f"w{shard}")
        info = await js.stream_info(OWN_STREAM)
        left = info.state.messages
        stored: list[str] = []
        sub = await js.pull_subscribe(f"fedmq.v1.{FED}.shard.*.update.*", stream=OWN_STREAM)
        while len(stored) < left:
            try:
                msgs = await sub.fetch(500, timeout=2)
            except Exception:
                break
            stored.extend(m.data.split(b"|", 1)[0].decode() for m in msgs)
        return stored

    def stored(self) -> list[str]:
        """(b) only: the ids still in the stream, undelivered, at the end."""
        result: list[str] = self.call(self._stored())
        return result

    def connected_node(self) -> int:
        """The node the first core subscriber is connected to (option c's fault target)."""
        url = self.clients[0].connected_url
        for i, node in enumerate(self.cluster.nodes):
            if url is not None and url.port == node.client_port:
                return i
        raise RuntimeError(f"connected to an unknown server {url}")

    async def _close(self) -> None:
        self._stop.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for nc in self.clients:
            try:
                await nc.drain() if self.option == "queue" else await nc.close()
            except Exception:
                await nc.close()

    def close(self) -> None:
        try:
            self.call(self._close(), timeout=15)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)
            self.loop.close()


# -- one trial ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Params:
    messages: int
    devices: int
    rate: float
    down_s: float


def connect_devices(cluster: NatsCluster, devices: int) -> list[PahoTransport]:
    """``devices`` MQTT 3.1.1 clients, round-robin over the nodes."""
    senders = []
    for d in range(devices):
        host, port = cluster.mqtt_endpoints[d % len(cluster.nodes)]
        sender = PahoTransport(BrokerConfig(host=host, port=port, mqtt5=False,
                                            reconnect_min_s=0.2, reconnect_max_s=1.0),
                               f"dev-{d}", quiet=True)
        senders.append(sender)
        sender.start()
        if not sender.wait_connected(20):
            raise RuntimeError(f"device {d} could not connect")
    return senders


def publish_with_fault(cluster: NatsCluster, senders: list[PahoTransport], victim: int, *,
                       params: Params, result: Trial, log: Callable[[str], None],
                       ) -> dict[str, Delivery]:
    """Publish ``params.messages`` QoS 1 updates at ``params.rate``; SIGKILL ``victim`` a third
    of the way and restart it ``params.down_s`` later; wait for the PUBACKs (up to 60 s)."""
    deliveries: dict[str, Delivery] = {}
    restarter: threading.Thread | None = None
    started = time.monotonic()
    for n in range(params.messages):
        if n == params.messages // 3:
            result.killed = cluster.nodes[victim].name
            cluster.kill(victim)
            log(f"  killed {result.killed} after {n} publishes")

            def restart() -> None:
                time.sleep(params.down_s)
                cluster.restart(victim)

            restarter = threading.Thread(target=restart, daemon=True)
            restarter.start()
        d = n % len(senders)
        ident = f"dev-{d}:{n}"
        deliveries[ident] = senders[d].publish(f"fedmq/v1/{FED}/update/dev-{d}",
                                               ident.encode() + b"|" + bytes(200), qos=1)
        lag = started + (n + 1) / params.rate - time.monotonic()
        if lag > 0:
            time.sleep(lag)
    if restarter is not None:
        restarter.join(120)
    deadline = time.monotonic() + 60
    while not all(x.done() for x in deliveries.values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    result.publish_s = round(time.monotonic() - started, 2)
    return deliveries


def settle(received: Received, acked: set[str]) -> list[str]:
    """Wait until every acknowledged update arrived (then ``SETTLE_S`` more for duplicates), at
    most ``DRAIN_S``; what the consumers got."""
    deadline = time.monotonic() + DRAIN_S
    while time.monotonic() < deadline:
        if acked <= set(received.snapshot()) and (
                time.monotonic() - received.changed > SETTLE_S):
            break
        time.sleep(0.1)
    return received.snapshot()


def run_trial(option: str, trial: int, params: Params, log: Callable[[str], None]) -> Trial:
    result = Trial(option, trial, params.messages)
    received = Received()
    with tempfile.TemporaryDirectory(prefix="fedmq-consume-") as tmp:
        cluster = NatsCluster(3, workdir=Path(tmp), shards={FED: SHARDS})
        cluster.start()
        senders: list[PahoTransport] = []
        consumer: MqttWorkers | NatsConsumers | None = None
        try:
            if option == "mqtt":
                victim = cluster.wait_for_stream_leader(MQTT_MSGS_STREAM)
                consumer = MqttWorkers(cluster, victim, received, on_victim=trial % 2 == 1)
                result.worker_on_killed_node = trial % 2 == 1
            else:
                consumer = NatsConsumers(cluster, option, received)
                victim = (cluster.wait_for_stream_leader(OWN_STREAM) if option == "workqueue"
                          else consumer.connected_node())
            senders = connect_devices(cluster, params.devices)
            deliveries = publish_with_fault(cluster, senders, victim, params=params,
                                            result=result, log=log)
            acked = {ident for ident, x in deliveries.items() if x.done()}
            result.acked, result.unacked = len(acked), len(deliveries) - len(acked)
            result.leader_after = cluster.stream_leader(
                OWN_STREAM if option == "workqueue" else MQTT_MSGS_STREAM) or "?"
            got = settle(received, acked)
            result.delivered = len(set(got))
            result.duplicates = len(got) - len(set(got))
            lost = sorted(acked - set(got))
            result.lost, result.lost_ids = len(lost), lost[:20]
            by_node = Counter(cluster.nodes[int(i.split(":")[0][4:]) % len(cluster.nodes)].name
                              for i in lost)
            result.lost_by_node = dict(sorted(by_node.items()))
            result.per_consumer = [received.per_consumer[i]
                                   for i in sorted(received.per_consumer)]
            if lost and isinstance(consumer, NatsConsumers) and option == "workqueue":
                # Lost from the consumer's view; still stored (a stuck consumer) or never
                # stored (the stream did not take what the cluster acknowledged)?
                result.lost_but_stored = len(set(lost) & set(consumer.stored()))
        finally:
            for sender in senders:
                sender.stop()
            if consumer is not None:
                consumer.close()
            cluster.stop()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--devices", type=int, default=30)
    parser.add_argument("--rate", type=float, default=600.0, help="publishes per second")
    parser.add_argument("--down", type=float, default=2.0,
                        help="seconds the killed node stays down")
    parser.add_argument("--options", default=",".join(OPTIONS))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    params = Params(args.messages, args.devices, args.rate, args.down)
    results: list[Trial] = []
    for option in args.options.split(","):
        for trial in range(args.trials):
            log(f"{option} trial {trial + 1}/{args.trials}")
            r = run_trial(option, trial, params, log)
            log(f"  acked {r.acked} unacked {r.unacked} lost {r.lost} (of which still stored "
                f"{r.lost_but_stored}, by node {r.lost_by_node}) duplicates {r.duplicates} "
                f"per consumer {r.per_consumer}"
                f" (killed {r.killed}, leader after {r.leader_after})")
            results.append(r)
    summary: dict[str, dict[str, int]] = {}
    for r in results:
        s = summary.setdefault(r.option, {"trials": 0, "acked": 0, "lost": 0, "duplicates": 0,
                                          "unacked": 0, "trials_with_loss": 0})
        s["trials"] += 1
        s["acked"] += r.acked
        s["lost"] += r.lost
        s["duplicates"] += r.duplicates
        s["unacked"] += r.unacked
        s["trials_with_loss"] += r.lost > 0
    print(f"{'option':<10} {'trials':>6} {'acked':>7} {'lost':>6} {'dups':>6} {'unacked':>7}")
    for option, s in summary.items():
        print(f"{option:<10} {s['trials']:>6} {s['acked']:>7} {s['lost']:>6} "
              f"{s['duplicates']:>6} {s['unacked']:>7}")
    if args.json is not None:
        args.json.write_text(json.dumps({
            "params": {k: v for k, v in vars(args).items() if k != "json"},
            "summary": summary, "trials": [asdict(r) for r in results]}, indent=2,
            default=str) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
