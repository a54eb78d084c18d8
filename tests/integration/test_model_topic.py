"""The model topic as an outside app sees it: retained, and decodable with msgpack + numpy only.

The decoding below follows docs/protocol.md and deliberately uses neither fedmq's codec nor its
classes: it is what an app in any language would do.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
import uuid
from typing import Any

import msgpack
import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fedmq.broker import MosquittoBroker

from fedhelpers import (
    Recorder,
    aggregator_config,
    broker_config,
    random_delta,
    running_aggregator,
    unique_federation,
    update_payload,
)


def decode_model_by_the_doc(payload: bytes) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """docs/protocol.md, "Decoding the model topic": msgpack map → arrays, sha256 checked."""
    msg = msgpack.unpackb(payload, raw=False)
    assert msg["v"] == 1
    assert msg["kind"] == "model"
    h = hashlib.sha256()
    arrays = {}
    for t in msg["tensors"]:
        assert t["dtype"] == "float32"
        assert t["codec"] == "fp32"
        n = int(np.prod(t["shape"], dtype=np.int64))
        assert len(t["data"]) == 4 * n
        arrays[t["name"]] = np.frombuffer(t["data"], dtype="<f4").reshape(t["shape"])
        h.update(t["name"].encode() + b"\0" + ",".join(map(str, t["shape"])).encode() + b"\0")
        h.update(t["data"])
    assert h.hexdigest() == msg["sha256"]
    return msg, arrays


@pytest.mark.broker
def test_late_subscriber_gets_current_model_at_once(mosquitto: MosquittoBroker) -> None:
    fed = unique_federation("late")
    broker = broker_config(mosquitto)
    rec = Recorder(broker, fed).start()
    try:
        with running_aggregator(aggregator_config(broker, fed)) as agg:
            rec.wait_for(lambda r: 0 in r.models())
            base = rec.models()[0]
            rng = np.random.default_rng(9)
            for dev in ("a", "b"):
                rec.transport.publish(rec.topics.update(dev),
                                      update_payload(fed, dev, random_delta(base, rng)))
            rec.wait_for(lambda r: 1 in r.models())
            current = agg.model

        # A plain paho client that knows nothing of fedmq subscribes after the fact.
        got: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        subscribed = threading.Event()
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"app-{uuid.uuid4().hex}",
                             protocol=mqtt.MQTTv5)
        client.on_message = lambda c, u, m: got.put(m)
        client.on_subscribe = lambda *a: subscribed.set()
        client.connect(broker.host, broker.port)
        client.loop_start()
        try:
            t0 = time.monotonic()
            client.subscribe(f"fedmq/v1/{fed}/model", qos=1)
            message = got.get(timeout=5)
            elapsed = time.monotonic() - t0
        finally:
            client.disconnect()
            client.loop_stop()
        assert message.retain, "the model must be a retained message"
        assert elapsed < 2.0
        msg, arrays = decode_model_by_the_doc(bytes(message.payload))
        assert msg["fed"] == fed
        assert msg["version"] == 1
        assert msg["round"] == 1
        assert list(arrays) == list(current)
        for name, array in arrays.items():
            np.testing.assert_array_equal(array, current[name])
    finally:
        rec.stop()
