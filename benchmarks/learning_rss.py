"""The aggregator's resident memory at 500 versus 50 devices' updates per round, per strategy.

``fedmq aggregator`` runs as its own process from a TOML config on a real Mosquitto; a few
publisher processes (not 500 agents: one paho client per device in one process fails past a few
hundred sockets) answer each round announcement with one valid update per simulated device, each
on that device's own update topic with a matching device id, so the aggregator admits and folds
every one. Rounds close at exactly N updates. Once the model of the last round is out, the
aggregator's ``VmHWM`` (peak resident set) and ``VmRSS`` are read from ``/proc``. The peak is the
reported figure: a fold that held every update, or an inbox that buffered a whole round, would
show in the peak even if the memory were freed by the time the round closed.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from fedmq import codec, compression
from fedmq.broker import MosquittoBroker
from fedmq.models import init_mlp
from fedmq.topics import Topics
from fedmq.wire import GlobalModel, ModelUpdate, RoundAnnouncement

STRATEGIES = ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad")

#: A model large enough that holding every update of a round would dwarf the process itself:
#: about 135,000 parameters, 0.54 MB per fp32 update, 270 MB for 500 of them.
LAYERS = (64, 1024, 64, 10)
PUBLISHERS = 4


def _config(path: Path, federation: str, port: int, devices: int, strategy: str) -> None:
    path.write_text(f"""federation = "{federation}"
[broker]
host = "127.0.0.1"
port = {port}
mqtt5 = true
[model]
layers = [{", ".join(str(n) for n in LAYERS)}]
seed = 0
[rounds]
min_updates = {devices}
max_updates = {devices}
deadline_s = 600
grace_s = 0
max_rounds = 0
[strategy]
name = "{strategy}"
[limits]
max_update_bytes = 67108864
max_examples = 1000000
[durability]
state_dir = "{path.parent / "state"}"
""")


def _publisher(port: int, federation: str, first: int, count: int,
               stop: Any) -> None:  # (a process target takes positional arguments)
    """Answer every open round announcement with ``count`` updates from devices first..."""
    topics = Topics(federation)
    rng = np.random.default_rng(first)
    delta = {k: (rng.standard_normal(v.shape) * 1e-3).astype(np.float32)
             for k, v in init_mlp(LAYERS, 0).items()}
    tensors = compression.encode_all(delta, "fp32")
    announcements: queue.Queue[RoundAnnouncement] = queue.Queue()

    def on_message(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        ann = codec.decode_as(msg.payload, RoundAnnouncement)
        if ann.open:
            announcements.put(ann)

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"rss-{uuid.uuid4().hex}",
                         protocol=mqtt.MQTTv5)
    client.on_message = on_message
    client.on_connect = lambda c, *a: c.subscribe(topics.round, qos=1)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    answered: set[int] = set()
    while not stop.is_set():
        try:
            ann = announcements.get(timeout=0.2)
        except queue.Empty:
            continue
        if ann.round in answered:
            continue
        answered.add(ann.round)
        sent = []
        for i in range(first, first + count):
            device = f"dev-{i:04d}"
            payload = codec.encode(ModelUpdate(
                federation=federation, device_id=device, round=ann.round,
                base_version=ann.base_version, update_id=uuid.uuid4().hex, num_examples=50,
                tensors=tensors, run=ann.run))
            sent.append(client.publish(topics.update(device), payload, qos=1))
        for info in sent:
            info.wait_for_publish(120)
    client.loop_stop()
    client.disconnect()


def _proc_kib(pid: int) -> dict[str, int]:
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in {"VmHWM", "VmRSS"}:
            fields[key] = int(rest.split()[0])
    return fields


def _wait_for_version(port: int, federation: str, version: int, timeout: float,
                      proc: subprocess.Popen[bytes]) -> None:
    seen = threading.Event()

    def on_message(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        model = codec.decode_as(msg.payload, GlobalModel)
        if model.version >= version:
            seen.set()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"rss-w-{uuid.uuid4().hex}",
                         protocol=mqtt.MQTTv5)
    client.on_message = on_message
    client.on_connect = lambda c, *a: c.subscribe(Topics(federation).model, qos=1)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        deadline = time.monotonic() + timeout
        while not seen.wait(0.2):
            if proc.poll() is not None:
                raise RuntimeError(f"aggregator exited with {proc.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no model version {version} within {timeout:.0f} s")
    finally:
        client.loop_stop()
        client.disconnect()


def measure(broker: MosquittoBroker, strategy: str, devices: int, rounds: int) -> dict[str, int]:
    """The aggregator's VmHWM and VmRSS (KiB) after ``rounds`` rounds of ``devices`` updates."""
    federation = f"rss{uuid.uuid4().hex[:8]}"
    work = Path(tempfile.mkdtemp(prefix="fedmq-rss-"))
    config = work / "aggregator.toml"
    _config(config, federation, broker.port, devices, strategy)
    proc = subprocess.Popen([sys.executable, "-m", "fedmq.cli", "aggregator", "--config",
                             str(config)], cwd=work, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    share = -(-devices // PUBLISHERS)
    pubs = [ctx.Process(target=_publisher, args=(broker.port, federation, first,
                                                 min(share, devices - first), stop))
            for first in range(0, devices, share)]
    try:
        for p in pubs:
            p.start()
        _wait_for_version(broker.port, federation, rounds, 300.0, proc)
        return _proc_kib(proc.pid)
    finally:
        stop.set()
        for p in pubs:
            p.join(timeout=30)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()


def run(strategies: tuple[str, ...], small: int, large: int, rounds: int) -> dict[str, Any]:
    """Per strategy: peak and current RSS at ``small`` and ``large`` updates per round, and
    the ratio of the peaks; ``max`` over strategies."""
    per: dict[str, Any] = {}
    with MosquittoBroker() as broker:
        for name in strategies:
            try:
                lo = measure(broker, name, small, rounds)
                hi = measure(broker, name, large, rounds)
            except RuntimeError as exc:
                per[name] = {"error": str(exc)}
                print(f"  rss {name:>10}: not measured: {exc}", flush=True)
                continue
            ratio = hi["VmHWM"] / lo["VmHWM"]
            per[name] = {"ratio": round(ratio, 3), "hwm_kib_small": lo["VmHWM"],
                         "hwm_kib_large": hi["VmHWM"], "rss_kib_small": lo["VmRSS"],
                         "rss_kib_large": hi["VmRSS"]}
            print(f"  rss {name:>10}: peak {lo['VmHWM'] / 1024:6.1f} MiB at {small}, "
                  f"{hi['VmHWM'] / 1024:6.1f} MiB at {large} updates/round: ratio {ratio:.3f}",
                  flush=True)
    return per
