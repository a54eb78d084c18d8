"""The model topic as an outside app sees it: retained, and decodable with msgpack + numpy only;
a signed model verifies with plain ``cryptography`` (docs/protocol.md, 5b).

The decoding below follows docs/protocol.md and deliberately uses neither fedmq's codec nor its
classes: it is what an app in any language would do.
"""

from __future__ import annotations

import dataclasses
import hashlib
import queue
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import paho.mqtt.client as mqtt
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from paho.mqtt.enums import CallbackAPIVersion

from fedmq.broker import MosquittoBroker
from fedmq.config import SigningConfig

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


def verify_model_by_the_doc(payload: bytes, trusted: Ed25519PublicKey) -> dict[str, Any]:
    """docs/protocol.md 5b with plain ``cryptography``: the signature over ``sig.signed``, then
    the signed manifest against the model's header and tensors. Raises when anything differs."""
    msg, arrays = decode_model_by_the_doc(payload)
    sig = msg["sig"]
    raw = trusted.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    if sig["key"] != hashlib.sha256(raw).hexdigest()[:16]:
        raise ValueError(f"signed by key {sig['key']}, not the trusted one")
    trusted.verify(sig["ed25519"], sig["signed"])  # InvalidSignature if not the key's
    manifest = msgpack.unpackb(sig["signed"], raw=False)
    for key in ("fed", "run", "version", "round", "sha256"):
        assert manifest[key] == msg[key], key
    assert manifest["chunks"] == msg.get("chunks", 1) == 1
    assert manifest["codec"] == "fp32"
    assert manifest["shapes"] == [[t["name"], t["shape"]] for t in msg["tensors"]]
    assert [list(a.shape) for a in arrays.values()] == [s for _, s in manifest["shapes"]]
    return msg


@pytest.mark.broker
def test_a_signed_model_verifies_with_plain_cryptography(mosquitto: MosquittoBroker,
                                                         tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    pem = tmp_path / "signing_key.pem"
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    fed = unique_federation("signed-doc")
    broker = broker_config(mosquitto)
    config = dataclasses.replace(aggregator_config(broker, fed),
                                 security=SigningConfig(signing_key=str(pem)))
    rec = Recorder(broker, fed).start()
    try:
        with running_aggregator(config) as agg:
            rec.wait_for(lambda r: 0 in r.models())
            run = agg.run
    finally:
        rec.stop()
    payload = next(bytes(m.payload) for m, d in rec.messages
                   if m.topic == f"fedmq/v1/{fed}/model" and d is not None)
    msg = verify_model_by_the_doc(payload, key.public_key())
    assert (msg["fed"], msg["run"], msg["version"]) == (fed, run, 0)
    with pytest.raises(ValueError, match="not the trusted one"):  # another key
        verify_model_by_the_doc(payload, Ed25519PrivateKey.generate().public_key())
    signed = bytes(msg["sig"]["signed"])
    at = payload.index(signed) + len(signed) // 2  # one byte of what was signed
    with pytest.raises(InvalidSignature):
        verify_model_by_the_doc(payload[:at] + bytes([payload[at] ^ 1]) + payload[at + 1:],
                                key.public_key())
