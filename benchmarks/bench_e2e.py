"""End-to-end ingest: the aggregator against a bare subscriber, over a real Mosquitto.

P publisher processes send int8 updates of 1M parameters (QoS 1) through a Mosquitto on
loopback. The headline uses one publisher: on this 2-core machine one already saturates the
broker-to-subscriber path (the bare rate is the same with two), and a second publisher process
only adds CPU contention that remote devices would not cause; P=2 is measured and reported too.
Side "bare" is a stock paho client (``paho.mqtt.client.Client``, MQTT 5, QoS 1 subscription,
the library's own receive path and automatic PUBACKs) whose ``on_message`` only counts; side "ours"
is the aggregator service: our transport (paho with a receive path that copies each payload
once), decode, checks, fused int8 fold. Each side's rate is updates per second from the start
signal to the last update counted (bare) or folded (ours, which closes the round and publishes the
new model afterwards, outside the measured time); the two sides alternate and the medians are
compared: ``ingest_ratio_ours_over_bare`` (1.0 = the aggregator keeps pace with the broker).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from aggregator.service import AggregatorService
from fedmq import codec, compression
from fedmq.broker import MosquittoBroker, default_config_dir
from fedmq.config import AggregatorConfig, BrokerConfig, LimitsConfig, RoundsConfig
from fedmq.topics import Topics
from fedmq.transport import PahoTransport
from fedmq.wire import ModelUpdate

SHAPE = (1000, 1000)


def _payloads(federation: str, publisher: int, count: int, params: int) -> list[bytes]:
    rng = np.random.default_rng(publisher)
    delta = (rng.standard_normal(params) * 0.01).astype(np.float32).reshape(SHAPE[0], -1)
    tensor = compression.encode("w", delta, "int8", block=256)
    return [codec.encode(ModelUpdate(
        federation=federation, device_id=f"p{publisher}-{i}", round=1, base_version=0,
        update_id=uuid.uuid4().hex, num_examples=10 + i, tensors=(tensor,)))
        for i in range(count)]


def _publish(host: str, port: int, federation: str, publisher: int, count: int,  # noqa: PLR0917
             params: int, go: Any) -> None:  # (a process target takes positional arguments)
    """One publisher process: connect, wait for the start signal, send ``count`` updates."""
    payloads = _payloads(federation, publisher, count, params)
    topics = Topics(federation)
    t = PahoTransport(BrokerConfig(host=host, port=port), client_id=f"pub-{uuid.uuid4().hex}")
    t.start()
    if not t.wait_connected(10):
        raise SystemExit("publisher could not connect")
    go.wait()
    sent = [t.publish(topics.update(f"p{publisher}-{i}"), payload, qos=1)
            for i, payload in enumerate(payloads)]
    # Disconnect only once the broker has acknowledged every update: paho drops what it still
    # queues at disconnect, and a slow run would otherwise lose updates instead of being slow.
    deadline = time.monotonic() + 120
    while not all(d.done() for d in sent) and time.monotonic() < deadline:
        time.sleep(0.01)
    t.stop()


def _run_publishers(broker: MosquittoBroker, federation: str, publishers: int, count: int,
                    params: int) -> tuple[list[Any], Any]:
    ctx = mp.get_context("spawn")
    go = ctx.Event()
    procs = [ctx.Process(target=_publish,
                         args=(broker.host, broker.port, federation, p, count, params, go))
             for p in range(publishers)]
    for p in procs:
        p.start()
    return procs, go


def _wait_done(procs: list[Any]) -> None:
    for p in procs:
        p.join(timeout=120)
        if p.exitcode != 0:
            raise RuntimeError(f"publisher exited with {p.exitcode}")


def run_bare(broker: MosquittoBroker, publishers: int, count: int, params: int) -> float:
    """Updates per second seen by a stock paho subscriber that only counts them."""
    fed = f"bare-{uuid.uuid4().hex[:8]}"
    topics = Topics(fed)
    total = publishers * count
    received = 0
    last_at = 0.0
    subscribed, finished = threading.Event(), threading.Event()

    def on_message(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        nonlocal received, last_at
        received += 1
        if received == total:
            last_at = time.perf_counter()
            finished.set()

    sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bare-{uuid.uuid4().hex}",
                      protocol=mqtt.MQTTv5)
    sub.on_message = on_message
    sub.on_subscribe = lambda *args: subscribed.set()
    sub.on_connect = lambda client, *args: client.subscribe(topics.updates, qos=1)
    sub.connect(broker.host, broker.port)
    sub.loop_start()
    if not subscribed.wait(10):
        raise RuntimeError("bare subscriber could not subscribe")
    procs, go = _run_publishers(broker, fed, publishers, count, params)
    time.sleep(2.0 + 0.5 * publishers)  # publishers connect and build their payloads
    t0 = time.perf_counter()
    go.set()
    if not finished.wait(120):
        raise RuntimeError(f"bare subscriber got {received} of {total} updates")
    elapsed = last_at - t0
    _wait_done(procs)
    sub.disconnect()
    sub.loop_stop()
    return total / elapsed


def run_ours(broker: MosquittoBroker, publishers: int, count: int, params: int) -> float:
    """Updates per second decoded, checked and folded by the aggregator service."""
    fed = f"ours-{uuid.uuid4().hex[:8]}"
    total = publishers * count
    config = AggregatorConfig(
        federation=fed, broker=BrokerConfig(host=broker.host, port=broker.port),
        rounds=RoundsConfig(min_updates=total, max_updates=total, deadline_s=600.0,
                            max_rounds=1),
        limits=LimitsConfig(max_update_bytes=8 * params))
    agg = AggregatorService(config, weights={"w": np.zeros(SHAPE, np.float32)})
    agg.start()
    procs, go = _run_publishers(broker, fed, publishers, count, params)
    time.sleep(2.0 + 0.5 * publishers)
    t0 = time.perf_counter()
    go.set()
    # The round closes (done) when the last update is folded: wait on that, idle, as the bare
    # side blocks on its queue (polling here would steal the GIL from the aggregator).
    if not agg.done.wait(120):
        handled = agg.stats.accepted + sum(agg.stats.rejected.values())
        raise RuntimeError(f"aggregator handled {handled} of {total} updates")
    # Ingest ends when the last update is folded; closing the round and publishing the new
    # model afterwards is not ingest (and the bare side has nothing like it).
    elapsed = agg.stats.last_fold_at - t0
    rejected = dict(agg.stats.rejected)
    if rejected:
        print(f"  rejected {rejected}: {agg.stats.last_rejection}", flush=True)
    _wait_done(procs)
    agg.stop()
    if rejected:
        raise RuntimeError(f"updates were rejected: {rejected} ({agg.stats.last_rejection})")
    return total / elapsed


def measure(broker: MosquittoBroker, publishers: int, count: int, repeats: int,
            params: int) -> tuple[float, float, float]:
    """(ratio, bare rate, ours rate): medians of ``repeats`` alternated runs after a warm-up."""
    bare: list[float] = []
    ours: list[float] = []
    # One unmeasured pair first: the first runs of a series are slow (notes/mqtt.md).
    run_bare(broker, publishers, max(count // 4, 1), params)
    run_ours(broker, publishers, max(count // 4, 1), params)
    for r in range(repeats):
        # Alternate which side goes first, so neither always runs on a warmer broker.
        order = (run_bare, run_ours) if r % 2 == 0 else (run_ours, run_bare)
        for fn in order:
            rate = fn(broker, publishers, count, params)
            (bare if fn is run_bare else ours).append(rate)
            print(f"  P={publishers} {fn.__name__[4:]:>5}: {rate:8.1f} updates/s", flush=True)
    b, o = statistics.median(bare), statistics.median(ours)
    return o / b, b, o


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer updates, one repetition")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--publishers", default="1,2",
                   help="publisher process counts to measure; the first is the headline "
                        "(default 1,2)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    params = SHAPE[0] * SHAPE[1]
    count = 50 if args.quick else 800
    repeats = 1 if args.quick else args.repeats
    counts = [int(x) for x in args.publishers.split(",")]
    result: dict[str, float | int | str] = {"params": params, "codec": "int8",
                                             "repeats": repeats}
    # The dev config caps each client's queue (100,000 messages / 1 GiB). Publishers on this
    # host send faster than any subscriber reads, so a queue builds; at the cap Mosquitto drops
    # QoS 1 messages for online clients, and a slower run would lose updates instead of being
    # slower. The bench lifts the caps, nothing else.
    template = Path(tempfile.mkdtemp(prefix="fedmq-bench-")) / "bench.conf"
    dev = (default_config_dir() / "dev.conf").read_text().splitlines()
    template.write_text("\n".join(
        [line for line in dev if not line.startswith(("max_queued_messages", "max_queued_bytes"))]
        + ["max_queued_messages 0", "max_queued_bytes 0", ""]))
    with MosquittoBroker(template) as broker:
        for i, n in enumerate(counts):
            ratio, bare, ours = measure(broker, n, count // n, repeats, params)
            suffix = "" if i == 0 else f"_p{n}"
            result[f"ingest_ratio_ours_over_bare{suffix}"] = round(ratio, 3)
            result[f"bare_updates_per_s{suffix}"] = round(bare, 1)
            result[f"ours_updates_per_s{suffix}"] = round(ours, 1)
            result[f"publishers{suffix}"] = n
            print(f"P={n}: ingest_ratio_ours_over_bare = {ratio:.3f} (bare {bare:.0f}/s, ours "
                  f"{ours:.0f}/s, median of {repeats}; target >= 0.8)", flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
