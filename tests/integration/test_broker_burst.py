"""An unpaced burst on the update topics, against every shipped broker config (issue 9).

Per config (``production.conf`` with TLS, passwords and ``acl.template``, as
``test_brokers.py`` runs it): the aggregator's own MQTT client (``PahoTransport`` as the durable
aggregator makes it: MQTT 5, a persistent session, manual acknowledgements, a batch of up to 8
acknowledged after its work) subscribes to ``update/+`` and takes about ``WORK_S`` per message,
slower than a publisher on this host sends. A hostile device then publishes ``BURST`` QoS 1
messages of an update's size unpaced on its own topic, while an honest device publishes
``VALID`` updates in between. Every message the broker acknowledged must arrive, and the
subscriber must never wait more than ``MAX_GAP_S`` while acknowledged messages are undelivered.

The configs as shipped before issue 9 (``max_queued_messages 1000``) fail this: the backlog
passes 1,000 messages and Mosquitto drops the excess, valid updates among them, after having
acknowledged them to their publisher. ``scripts/faults burst`` is the long version (10,000
messages, the real aggregator and training devices).
"""

from __future__ import annotations

import importlib
import itertools
import os
import queue
import ssl
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from conftest import require_mosquitto
from paho.mqtt.enums import CallbackAPIVersion

from fedmq.broker import MosquittoBroker, default_config_dir
from fedmq.config import BrokerConfig
from fedmq.transport import PahoTransport

# The production broker is set up exactly as ``scripts/faults burst`` does it (tests/fault).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fault"))
burst = importlib.import_module("burst")

pytestmark = [pytest.mark.broker, pytest.mark.slow]

BURST = 2_000
VALID = 20
#: About one encoded fp32 update of the default 64-128-10 model.
SIZE = 38_000
#: The subscriber's work per message: slower than an unpaced publisher here, so a queue builds.
WORK_S = 0.0005
MAX_GAP_S = 5.0
USERS = ("aggregator", "mallory", "dev1")


@dataclass
class Site:
    broker: MosquittoBroker
    ca_file: Path | None

    def config(self, user: str) -> BrokerConfig:
        base = BrokerConfig(host=self.broker.host, port=self.broker.port)
        if self.ca_file is None:
            return base
        return replace(base, username=user, password=f"{user}-secret", tls=True,
                       ca_file=str(self.ca_file))


@pytest.fixture(params=["dev", "docker", "production"])
def site(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Site]:
    binary = require_mosquitto()
    name: str = request.param
    if name == "production":
        conf = burst.production_etc(tmp_path / "etc", USERS)
        ca = tmp_path / "etc" / "certs" / "ca.crt"
    else:
        conf, ca = default_config_dir() / f"{name}.conf", None
    with MosquittoBroker(conf, binary=binary) as broker:
        yield Site(broker, ca)


class Publisher:
    """A raw paho MQTT 5 client noting when each of its QoS 1 messages was acknowledged."""

    def __init__(self, cfg: BrokerConfig, client_id: str) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv5)
        if cfg.username is not None:
            self.client.username_pw_set(cfg.username, cfg.password)
        if cfg.tls:
            self.client.tls_set(ca_certs=cfg.ca_file, cert_reqs=ssl.CERT_REQUIRED)
        self.acked: dict[int, float] = {}  # mid -> PUBACK time
        self.client.on_publish = self._on_publish
        self.client.connect(cfg.host, cfg.port)
        self.client.loop_start()

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any,
                    properties: Any) -> None:
        self.acked[mid] = time.monotonic()

    def publish(self, topic: str, payload: bytes) -> int:
        return self.client.publish(topic, payload, qos=1).mid

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _consume(sub: PahoTransport, arrivals: dict[bytes, float], stop: threading.Event) -> None:
    """The aggregator's loop, minus the aggregation: a batch, its work, then its acks."""
    while not stop.is_set():
        batch = []
        try:
            batch.append(sub.inbox.get(timeout=0.05))
            while len(batch) < 8:
                batch.append(sub.inbox.get_nowait())
        except queue.Empty:
            pass
        for msg in batch:
            arrivals.setdefault(msg.payload[:16], time.monotonic())
            time.sleep(WORK_S)
        for msg in batch:
            sub.ack(msg)


def _max_gap(acked: list[float], delivered: list[float], start: float, end: float) -> float:
    """Longest time without a delivery while an acknowledged message was undelivered, all
    messages being delivered in the end (``acked[i]``, ``delivered[i]``: message i)."""
    times = [start, *sorted(delivered), end]
    pairs = sorted(zip(delivered, acked, strict=True))
    # first_acked[j]: the earliest acknowledgement among the messages delivered j-th or later.
    first_acked = [end] * (len(pairs) + 1)
    for j in range(len(pairs) - 1, -1, -1):
        first_acked[j] = min(first_acked[j + 1], pairs[j][1])
    best, j = 0.0, 0
    for lo, hi in itertools.pairwise(times):
        while j < len(pairs) and pairs[j][0] < hi:
            j += 1
        best = max(best, hi - max(lo, first_acked[j]))
    return best


def test_unpaced_burst_loses_nothing_and_never_stalls(site: Site) -> None:
    topic_bad, topic_good = "fedmq/v1/burst/update/mallory", "fedmq/v1/burst/update/dev1"
    sub = PahoTransport(site.config("aggregator"), "aggregator", manual_ack=True,
                        session_expiry_s=3600)
    sub.subscribe("fedmq/v1/burst/update/+", qos=1)
    sub.start()
    assert sub.wait_connected(10)
    time.sleep(0.3)  # the SUBACK
    arrivals: dict[bytes, float] = {}
    stop = threading.Event()
    worker = threading.Thread(target=_consume, args=(sub, arrivals, stop), daemon=True)
    worker.start()
    bad, good = Publisher(site.config("mallory"), "mallory"), Publisher(site.config("dev1"),
                                                                         "dev1")
    sent: dict[bytes, tuple[Publisher, int]] = {}  # tag -> (who, mid)
    filler = os.urandom(SIZE)
    start = time.monotonic()
    try:
        for i in range(BURST):  # paho queues them all and sends as fast as PUBACKs come
            tag = b"h%015d" % i
            sent[tag] = (bad, bad.publish(topic_bad, tag + filler))
        # The honest device's updates go out while the flood is on: one each time another
        # 1/VALID of the burst has been acknowledged.
        for k in range(VALID):
            while len(bad.acked) < k * BURST // VALID and time.monotonic() - start < 60:
                time.sleep(0.001)
            tag = b"v%015d" % k
            sent[tag] = (good, good.publish(topic_good, tag + filler))
        deadline = time.monotonic() + 60
        acked: set[bytes] = set()
        while time.monotonic() < deadline:
            acked = {tag for tag, (who, mid) in sent.items() if mid in who.acked}
            last = max(arrivals.values(), default=start)
            if len(acked) == len(sent) and (acked <= arrivals.keys()
                                            or time.monotonic() - last > 2 * MAX_GAP_S):
                break
            time.sleep(0.05)
        end = time.monotonic()
    finally:
        stop.set()
        worker.join(5)
        for client in (bad, good):
            client.close()
        sub.stop()

    assert len(acked) == len(sent), "the broker did not acknowledge every publish"
    valid_lost = sorted(t for t in acked - arrivals.keys() if t.startswith(b"v"))
    hostile_lost = sorted(t for t in acked - arrivals.keys() if t.startswith(b"h"))
    dropped = "Outgoing messages are being dropped" in site.broker.log_tail(1_000_000)
    assert valid_lost == [], (f"{len(valid_lost)}/{VALID} acknowledged valid updates never "
                              f"arrived ({len(hostile_lost)}/{BURST} hostile messages neither; "
                              f"the broker logged dropping: {dropped})")
    assert hostile_lost == [], f"{len(hostile_lost)}/{BURST} hostile messages dropped"
    ack_times = [sent[t][0].acked[sent[t][1]] for t in acked]
    gap = _max_gap(ack_times, [arrivals[t] for t in acked], start, end)
    assert gap <= MAX_GAP_S, f"delivery stalled for {gap:.1f} s"
