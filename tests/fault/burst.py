"""The ``burst`` drill: a hostile flood on the update topics of each shipped broker config.

``scripts/faults burst``. For each shipped Mosquitto config (``dev.conf``, ``docker.conf``,
``production.conf`` in ``fedmq/broker_config/``) a broker is started with it on a free loopback port
(``production.conf`` as ``tests/integration/test_brokers.py`` runs it: TLS with a throw-away CA,
a password file and the ACL ``fedmq.acl`` renders). In this process, on it:

- the aggregator: ``AggregatorService`` over fedmq's paho transport, in durable mode (a state
  directory), as in production: MQTT 5, a persistent session, manual acknowledgements after the
  write-ahead log (until then a message counts against the broker's queue caps);
- ``--devices`` (4) honest devices: ``AgentService.over_mqtt`` with an ``MLPTrainer`` on an IID
  shard of scikit-learn's digits, as in ``fedmq demo``;
- a hostile client (``HOSTILE``; under the production ACL an authenticated device publishing
  on its own ``update/<id>`` topic) that publishes ``MESSAGES`` (10,000) QoS 1 messages
  unpaced on ``fedmq/v1/burst/update/<id>`` the moment round ``BURST_ROUND`` is announced, so
  the devices train and send their updates while it floods. Each hostile message is as large
  as a real fp32 update of the model (38,820 bytes) and is random bytes, a truncated update, or
  an update claiming another device (``Flood.payload``).

Rounds close when every device is in, else ``GRACE_S`` after the first update (a lost update
then costs a round some seconds, not the whole drill). Once ``--rounds`` (4) rounds are closed
and the flood is acknowledged, the devices stop, and the aggregator stops once everything
acknowledged has reached it, or nothing has for ``DRAIN_S`` seconds.

Measured per config, from the outside of the services:

- what each client published: the devices' updates (by ``update_id``, acknowledged when the
  outbox forgets them after their PUBACK) and the hostile messages (PUBACK time per message);
- every message the aggregator's transport received, with its time (``RecordingInbox`` wraps
  its inbox: ``put`` runs on paho's network thread as the message arrives);
- the aggregator's verdict on each update id (``WatchedAggregator``: accepted, or rejected
  with the reason).

``valid_lost``: devices' updates the broker acknowledged that the aggregator never gave a
verdict on (an update rejected for a protocol reason, e.g. ``stale``, was delivered: it is
counted in ``valid_rejected``, not lost). ``max_delivery_gap_s``: the longest time the
aggregator received nothing while some message the broker had acknowledged to its publisher was
still undelivered (``delivery_gap``); a device's update counts from the moment it was handed
to paho, which is no later than its PUBACK. A message the broker dropped stays undelivered for
good, so the time from the last delivery to the end of the drain counts too: ``undelivered``
and ``broker_dropped`` (Mosquitto logged "Outgoing messages are being dropped") say which it
was. Passes when ``valid_lost`` == 0 and ``max_delivery_gap_s`` <= ``MAX_GAP_S`` (5) for
every config.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import logging
import math
import queue
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from aggregator.service import AggregatorService
from device_agent.service import AgentService
from device_agent.trainers import MLPTrainer
from fedmq import codec
from fedmq.acl import render_acl
from fedmq.broker import MosquittoBroker, default_config_dir
from fedmq.compression import encode_all
from fedmq.config import (
    AggregatorConfig,
    BrokerConfig,
    DurabilityConfig,
    RoundsConfig,
)
from fedmq.datasets import load_digits_split, partition
from fedmq.demo import demo_config
from fedmq.models import DEFAULT_LAYER_SIZES, init_mlp
from fedmq.topics import Topics
from fedmq.transport import Message
from fedmq.wire import ModelUpdate

log = logging.getLogger(__name__)

CONFIGS = ("dev", "docker", "production")
FEDERATION = "burst"
HOSTILE = "mallory"
AGGREGATOR = "aggregator"  # the ACL's aggregator username
BURST_ROUND = 2
#: A round closes when every device is in, else this long after its first update.
GRACE_S = 10.0
DEADLINE_S = 30.0
#: After the devices stop, wait until nothing has arrived for this long.
DRAIN_S = 10.0
MAX_GAP_S = 5.0
MESSAGES = 10_000
#: Hostile publishes handed to paho and not yet acknowledged: paho keeps each in memory.
MAX_OUTSTANDING = 2000


def digest(payload: bytes) -> bytes:
    """How a message is recognised on both sides."""
    return hashlib.blake2b(payload, digest_size=8).digest()


def password(user: str) -> str:
    return f"{user}-secret"


# --------------------------------------------------------------------------- brokers


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
    if path is None:
        raise RuntimeError(f"{name} not found (Debian: apt-get install mosquitto openssl)")
    return path


def _run(*command: str, cwd: Path) -> None:
    subprocess.run(command, cwd=cwd, check=True, capture_output=True)


def production_etc(etc: Path, users: Sequence[str], source: Path | None = None) -> Path:
    """``production.conf`` (or ``source``) with its /etc paths moved to ``etc``, certificates
    and passwords made the way fedmq/broker_config/README.md says (short-lived 2048-bit keys,
    password ``<user>-secret``) and the ACL ``fedmq.acl`` renders; returns the config to run."""
    openssl, mosquitto_passwd = _tool("openssl"), _tool("mosquitto_passwd")
    certs = etc / "certs"
    certs.mkdir(parents=True)
    _run(openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=fedmq-burst-ca", "-keyout", "ca.key", "-out", "ca.crt", cwd=certs)
    _run(openssl, "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
         "-keyout", "server.key", "-out", "server.csr", cwd=certs)
    (certs / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _run(openssl, "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
         "-CAcreateserial", "-days", "2", "-extfile", "san.ext", "-out", "server.crt", cwd=certs)
    (etc / "passwd").touch()
    for user in users:
        _run(mosquitto_passwd, "-b", "passwd", user, password(user), cwd=etc)
    # The ACL fedmq provision writes (acl.template's shape): every other user is a device.
    (etc / "acl").write_text(render_acl(FEDERATION, aggregator=AGGREGATOR, devices=[
        user for user in users if user != AGGREGATOR]), encoding="utf-8")
    text = (source or default_config_dir() / "production.conf").read_text(encoding="utf-8")
    (etc / "production.conf").write_text(text.replace("/etc/mosquitto/fedmq/", f"{etc}/"),
                                         encoding="utf-8")
    return etc / "production.conf"


@dataclass
class Site:
    """A running broker and how each user reaches it."""

    name: str
    broker: MosquittoBroker
    ca_file: Path | None = None

    def config(self, user: str) -> BrokerConfig:
        base = BrokerConfig(host=self.broker.host, port=self.broker.port,
                            reconnect_min_s=0.1, reconnect_max_s=1.0)
        if self.ca_file is None:
            return base
        return replace(base, username=user, password=password(user), tls=True,
                       ca_file=str(self.ca_file))


@contextlib.contextmanager
def site(name: str, workdir: Path, users: Sequence[str],
         template: Path | None = None) -> Iterator[Site]:
    """Mosquitto running the shipped ``<name>.conf`` (or ``template``) on a free port."""
    if name == "production":
        conf = production_etc(workdir / "etc", users, template)
        with MosquittoBroker(conf) as broker:
            yield Site(name, broker, workdir / "etc" / "certs" / "ca.crt")
    else:
        with MosquittoBroker(template or default_config_dir() / f"{name}.conf") as broker:
            yield Site(name, broker)


# --------------------------------------------------------------------------- observers


class RecordingInbox(queue.Queue[Message]):
    """The aggregator transport's inbox, noting when each message arrived (paho's thread)."""

    def __init__(self, maxsize: int) -> None:
        super().__init__(maxsize)
        self.arrivals: list[tuple[float, str, bytes]] = []  # (monotonic, topic, digest)

    def put(self, item: Message, block: bool = True, timeout: float | None = None) -> None:
        self.arrivals.append((time.monotonic(), item.topic, digest(item.payload)))
        super().put(item, block, timeout)


class WatchedAggregator(AggregatorService):
    """The aggregator, noting its verdict on every update id it saw."""

    verdicts: dict[str, str]

    def _accepted(self, update: ModelUpdate, weight: float, sq: float) -> None:
        self.verdicts.setdefault(update.update_id, "accepted")
        super()._accepted(update, weight, sq)

    def _reject(self, device: str, update_id: str, reason: str, detail: str = "") -> None:
        if update_id and device != HOSTILE:
            self.verdicts.setdefault(update_id, reason)
        super()._reject(device, update_id, reason, detail)


@dataclass
class SentUpdate:
    published_at: float
    digests: list[bytes]


class TracedAgent(AgentService):
    """A device agent noting each update it publishes (when, and its messages' digests)."""

    sent: dict[str, SentUpdate]

    def _send_update(self, update_id: str, messages: list[tuple[str, bytes]]) -> None:
        self.sent[update_id] = SentUpdate(time.monotonic(), [digest(p) for _, p in messages])
        super()._send_update(update_id, messages)

    def acked_updates(self) -> set[str]:
        """Updates whose every message the broker acknowledged (the outbox forgot them)."""
        self._sweep()
        pending = {self.outbox.group_of(k) for k in self.outbox.pending_keys()}
        return {uid for uid in self.sent if uid not in pending}


class Flood:
    """A hostile MQTT 5 client publishing ``count`` QoS 1 messages as fast as paho can."""

    def __init__(self, site: Site, count: int, size: int, seed: int) -> None:
        cfg = site.config(HOSTILE)
        self.topic = Topics(FEDERATION).update(HOSTILE)
        self.count, self.size = count, size
        self.rng = np.random.default_rng(seed)
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"burst-{HOSTILE}",
                                  protocol=mqtt.MQTTv5)
        if cfg.username is not None:
            self.client.username_pw_set(cfg.username, cfg.password)
        if cfg.tls:
            self.client.tls_set(ca_certs=cfg.ca_file, cert_reqs=ssl.CERT_REQUIRED)
        self.client.on_publish = self._on_publish
        self.cfg = cfg
        self.digests: dict[int, bytes] = {}  # mid -> digest, until acknowledged
        self.early: dict[int, float] = {}  # mid -> PUBACK time, acknowledged before recorded
        self.acked: dict[bytes, float] = {}  # digest -> PUBACK time
        self.published = 0
        self.started_at = 0.0
        self.finished_at = 0.0
        self.error: str | None = None
        self._outstanding = threading.Semaphore(MAX_OUTSTANDING)
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="hostile-flood", daemon=True)
        base = init_mlp(list(DEFAULT_LAYER_SIZES), seed)
        self._template = ModelUpdate(
            federation=FEDERATION, device_id="dev-0", round=BURST_ROUND, base_version=1,
            update_id="", num_examples=100,
            tensors=tuple(encode_all({k: np.zeros_like(v) for k, v in base.items()})))

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any,
                    properties: Any) -> None:
        now = time.monotonic()
        # Runs under paho's own lock: never call into paho while holding ours.
        with self._lock:
            d = self.digests.pop(mid, None)
            if d is not None:
                self.acked[d] = now
            else:
                self.early[mid] = now
        self._outstanding.release()

    def payload(self, i: int) -> bytes:
        """The ``i``-th hostile message, as large as a real update and unique: random bytes,
        a truncated update, or a whole update claiming to be another device's."""
        kind = i % 3
        if kind == 0:
            return self.rng.bytes(self.size)
        whole = codec.encode(replace(self._template, update_id=uuid.uuid4().hex))
        if kind == 1:
            cut = int(self.rng.integers(1, 1024))
            return whole[:-cut] + self.rng.bytes(8)
        return whole

    def start(self) -> None:
        self.client.connect(self.cfg.host, self.cfg.port, keepalive=30)
        self.client.loop_start()
        self._thread.start()

    def _run(self) -> None:
        self.started_at = time.monotonic()
        try:
            for i in range(self.count):
                self._outstanding.acquire()
                body = self.payload(i)
                info = self.client.publish(self.topic, body, qos=1)
                with self._lock:  # the PUBACK may have come before publish() returned
                    acked_at = self.early.pop(info.mid, None)
                    if acked_at is None:
                        self.digests[info.mid] = digest(body)
                    else:
                        self.acked[digest(body)] = acked_at
                self.published += 1
            while len(self.acked) < self.published and time.monotonic() - self.started_at < 300:
                time.sleep(0.01)
        except Exception as exc:  # reported, not raised: the drill still measures the rest
            self.error = repr(exc)
        self.finished_at = time.monotonic()

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def delivery_gap(sent: Sequence[tuple[float, float | None]], arrivals: Sequence[float],
                 start: float, end: float) -> float:
    """The longest time in [start, end] with no arrival while some acknowledged message was
    still undelivered. ``sent``: (acknowledged at, first delivered at or None) per message;
    ``arrivals``: every delivery time, sorted."""
    times = [start, *(t for t in arrivals if start <= t <= end), end]
    # A message delivered at d (never: inf) and acknowledged at a waits in every interval
    # (lo, hi] between consecutive deliveries with hi <= d, from max(lo, a) on. Per interval,
    # the earliest a among messages with d >= hi: a minimum over a suffix of them by d.
    by_delivery = sorted((d if d is not None else math.inf, a) for a, d in sent)
    suffix_min = [math.inf] * (len(by_delivery) + 1)
    for i in range(len(by_delivery) - 1, -1, -1):
        suffix_min[i] = min(suffix_min[i + 1], by_delivery[i][1])
    best = 0.0
    j = 0
    for lo, hi in itertools.pairwise(times):
        while j < len(by_delivery) and by_delivery[j][0] < hi:
            j += 1
        first = suffix_min[j]
        if first < hi:
            best = max(best, hi - max(lo, first))
    return best


# --------------------------------------------------------------------------- the drill


@dataclass
class BurstResult:
    config: str
    valid_sent: int = 0
    valid_lost: int = 0
    valid_rejected: dict[str, int] = field(default_factory=dict)
    max_delivery_gap_s: float = 0.0
    hostile_published: int = 0
    hostile_sent: int = 0
    hostile_received: int = 0
    undelivered: int = 0
    max_backlog: int = 0
    broker_dropped: bool = False
    rounds_closed: int = 0
    burst_s: float = 0.0
    drained_s: float = 0.0
    time_s: float = 0.0
    rejected: dict[str, int] = field(default_factory=dict)
    payload_bytes: int = 0
    error: str | None = None

    def as_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def once(fn: Callable[[], None]) -> Callable[[], None]:
    """``fn`` made safe to call twice (the normal path, then the exit stack)."""
    done = threading.Event()

    def run() -> None:
        if not done.is_set():
            done.set()
            fn()
    return run


def _wait(predicate: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return bool(predicate())


def update_size(seed: int) -> int:
    """Bytes of one encoded fp32 update of the drill's model."""
    base = init_mlp(list(DEFAULT_LAYER_SIZES), seed)
    update = ModelUpdate(federation=FEDERATION, device_id="dev-0", round=1, base_version=0,
                         update_id=uuid.uuid4().hex, num_examples=100,
                         tensors=tuple(encode_all(base)))
    return len(codec.encode(update))


def _services(where: Site, workdir: Path, devices: int, seed: int,
              ) -> tuple[WatchedAggregator, RecordingInbox, list[TracedAgent]]:
    """The aggregator (durable, its inbox recorded) and the devices, not started yet."""
    device_ids = [f"dev-{i}" for i in range(devices)]
    x_train, y_train, _, _ = load_digits_split(seed)
    shards = partition(y_train, devices, "iid", seed)
    args = argparse.Namespace(seed=seed, devices=devices, rounds=0, epochs=None, lr=None,
                              batch_size=None, codec="fp32", topk_fraction=0.1)
    config: AggregatorConfig = demo_config(args, where.config(AGGREGATOR),
                                           list(DEFAULT_LAYER_SIZES), [len(s) for s in shards])
    config = replace(
        config, federation=FEDERATION,
        rounds=RoundsConfig(min_updates=1, max_updates=devices, deadline_s=DEADLINE_S,
                            grace_s=GRACE_S, max_rounds=0),
        durability=DurabilityConfig(state_dir=str(workdir / "aggregator")))
    agg = WatchedAggregator(config)
    agg.verdicts = {}
    inbox = RecordingInbox(agg.transport.inbox.maxsize)
    agg.transport.inbox = inbox
    agents: list[TracedAgent] = []
    for device_id, idx in zip(device_ids, shards, strict=True):
        trainer = MLPTrainer(x_train[idx], y_train[idx], num_classes=10)
        agent = TracedAgent.over_mqtt(FEDERATION, device_id, trainer, where.config(device_id))
        assert isinstance(agent, TracedAgent)
        agent.sent = {}
        agents.append(agent)
    return agg, inbox, agents


def max_backlog(sent: Sequence[tuple[float, float | None]]) -> int:
    """The most messages acknowledged to their publishers and not yet delivered at once."""
    events = sorted([(a, 1) for a, _ in sent] + [(d, -1) for _, d in sent if d is not None])
    level = peak = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    return peak


def _measure(result: BurstResult, agg: WatchedAggregator, inbox: RecordingInbox, flood: Flood,
             acked_valid: dict[str, SentUpdate], *, start: float, end: float) -> None:
    """Fill in ``result`` from what the clients sent and the aggregator received."""
    first_seen: dict[bytes, float] = {}
    for t, _, d in inbox.arrivals:
        first_seen.setdefault(d, t)
    hostile_topic = Topics(FEDERATION).update(HOSTILE)
    result.hostile_published = flood.published
    result.hostile_sent = len(flood.acked)
    result.hostile_received = len({d for _, topic, d in inbox.arrivals if topic == hostile_topic})
    result.valid_sent = len(acked_valid)
    lost = sorted(uid for uid in acked_valid if uid not in agg.verdicts)
    result.valid_lost = len(lost)
    result.valid_rejected = dict(Counter(
        v for uid, v in agg.verdicts.items() if uid in acked_valid and v != "accepted"))
    sent = [(a, first_seen.get(d)) for d, a in flood.acked.items()]
    sent += [(up.published_at, first_seen.get(d)) for up in acked_valid.values()
             for d in up.digests]
    result.undelivered = sum(1 for _, d in sent if d is None)
    result.max_backlog = max_backlog(sent)
    arrivals = sorted(t for t, _, _ in inbox.arrivals)
    result.max_delivery_gap_s = round(delivery_gap(sent, arrivals, start, end), 3)
    result.rounds_closed = agg.stats.rounds_completed
    result.rejected = dict(agg.stats.rejected)
    if flood.started_at:
        result.burst_s = round(flood.finished_at - flood.started_at, 3)
        after = [t for t in arrivals if t >= flood.started_at]
        result.drained_s = round(after[-1] - flood.started_at, 3) if after else 0.0
    if flood.error:
        result.error = (result.error or "") + f" flood: {flood.error}"
    if lost:
        log.warning("%s: %d acknowledged updates lost: %s", result.config, len(lost), lost[:5])


def run_config(name: str, workdir: Path, *, messages: int = MESSAGES, devices: int = 4,
               rounds: int = 4, seed: int = 0, timeout_s: float = 240.0,
               template: Path | None = None, payload_bytes: int | None = None) -> BurstResult:
    """One broker config (``template`` instead of the shipped file, to compare variants):
    start everything, flood in round ``BURST_ROUND``, measure."""
    t0 = time.monotonic()
    deadline = t0 + timeout_s
    result = BurstResult(config=name, payload_bytes=payload_bytes or update_size(seed))
    users = [AGGREGATOR, HOSTILE, *(f"dev-{i}" for i in range(devices))]
    with contextlib.ExitStack() as stack, site(name, workdir, users, template) as where:
        agg, inbox, agents = _services(where, workdir, devices, seed)
        flood = Flood(where, messages, result.payload_bytes, seed)
        stop_agg = once(agg.stop)
        stop_agents = [once(agent.stop) for agent in agents]
        agg.start()
        stack.callback(stop_agg)
        for agent, stop in zip(agents, stop_agents, strict=True):
            agent.start()
            stack.callback(stop)
        try:
            if not _wait(lambda: agg.round >= BURST_ROUND, deadline - time.monotonic()):
                raise TimeoutError(f"round {BURST_ROUND} never opened")
            flood.start()
            stack.callback(flood.stop)
            if not flood.join(max(deadline - time.monotonic(), 1.0)):
                raise TimeoutError("the flood was not acknowledged in time")
            if not _wait(lambda: agg.stats.rounds_completed >= rounds,
                         deadline - time.monotonic()):
                raise TimeoutError(f"{agg.stats.rounds_completed}/{rounds} rounds closed")
        except TimeoutError as exc:
            result.error = str(exc)
        # No new updates from here on; then the aggregator takes what is still queued for it.
        for stop in stop_agents:
            stop()
        acked_valid = {uid: agent.sent[uid] for agent in agents for uid in agent.acked_updates()}
        expected = set(flood.acked) | {d for up in acked_valid.values() for d in up.digests}

        def drained() -> bool:
            seen = {d for _, _, d in inbox.arrivals}
            last = inbox.arrivals[-1][0] if inbox.arrivals else t0
            return expected <= seen or time.monotonic() - last >= DRAIN_S

        _wait(drained, max(deadline - time.monotonic(), DRAIN_S + 1), step=0.1)
        end = time.monotonic()
        _wait(inbox.empty, 10)  # the aggregator gives its verdict on what arrived ...
        time.sleep(0.5)  # ... including the batch in hand
        stop_agg()
        _measure(result, agg, inbox, flood, acked_valid, start=flood.started_at or t0, end=end)
        result.broker_dropped = ("Outgoing messages are being dropped"
                                 in where.broker.log_tail(1_000_000))
    result.time_s = round(time.monotonic() - t0, 1)
    return result


def passed(result: dict[str, Any]) -> bool:
    """Every config: no acknowledged valid update lost, no delivery stall over MAX_GAP_S."""
    configs = result.get("configs", {})
    return bool(configs) and all(
        c["valid_lost"] == 0 and c["max_delivery_gap_s"] <= MAX_GAP_S and not c["error"]
        for c in configs.values())


def run_burst(tmp: Path, *, messages: int = MESSAGES, devices: int = 4, rounds: int = 4,
              seed: int = 0, configs: Sequence[str] = CONFIGS) -> dict[str, Any]:
    """The drill over every config in ``configs``; the JSON the drill reports."""
    out: dict[str, Any] = {"messages": messages, "devices": devices, "rounds": rounds,
                           "max_gap_s": MAX_GAP_S, "configs": {}}
    for name in configs:
        result = run_config(name, tmp / name, messages=messages, devices=devices,
                            rounds=rounds, seed=seed)
        out["configs"][name] = result.as_json()
        print(f"{name}: valid_lost {result.valid_lost}/{result.valid_sent}  max_delivery_gap_s "
              f"{result.max_delivery_gap_s}  hostile {result.hostile_received}/"
              f"{result.hostile_sent} received  undelivered {result.undelivered}  rounds "
              f"{result.rounds_closed}  {result.time_s} s", file=sys.stderr, flush=True)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run the drill on its own (``scripts/faults burst`` is the usual way in)."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=MESSAGES)
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--config", action="append", choices=CONFIGS, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        result = run_burst(Path(tmp), messages=args.messages, devices=args.devices,
                           rounds=args.rounds, seed=args.seed, configs=args.config or CONFIGS)
    result["passed"] = passed(result)
    print(json.dumps(result, indent=2))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
