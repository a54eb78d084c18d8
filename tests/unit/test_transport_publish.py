"""The transport's one-copy PUBLISH split against paho's own decoder."""

from __future__ import annotations

import itertools
import socket
import struct

import paho.mqtt.client as mqtt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt import _packet
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.exception import MalformedPacket
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fedmq import paho_client as transport
from fedmq.paho_client import _Client, split_publish


def _props(user: list[tuple[str, str]], expiry: int | None) -> bytes:
    p = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    if user:
        p.UserProperty = user
    if expiry is not None:
        p.MessageExpiryInterval = expiry
    return bytes(p.pack())  # type: ignore[no-untyped-call]


def _packet_bytes(topic: bytes, qos: int, mid: int, props: bytes, payload: bytes) -> bytes:
    return (struct.pack("!H", len(topic)) + topic + (struct.pack("!H", mid) if qos else b"")
            + props + payload)


texts = st.text(alphabet="abcxyz/+-_0123456789", max_size=12)


@given(topic=st.binary(min_size=1, max_size=300), qos=st.integers(0, 1),
       mid=st.integers(1, 65535), payload=st.binary(max_size=3000),
       user=st.lists(st.tuples(texts, texts), max_size=3),
       expiry=st.none() | st.integers(0, 2**32 - 1), mqtt5=st.booleans())
def test_split_matches_paho(*, topic: bytes, qos: int, mid: int, payload: bytes,
                            user: list[tuple[str, str]], expiry: int | None,
                            mqtt5: bool) -> None:
    props = _props(user, expiry) if mqtt5 else b""
    packet = bytearray(_packet_bytes(topic, qos, mid, props, payload))
    version = MQTTProtocolVersion.MQTTv5 if mqtt5 else MQTTProtocolVersion.MQTTv311
    ref = _packet.decode_publish(0x30 | qos << 1, packet, version)
    got = split_publish(packet, qos, mqtt5)
    assert got is not None
    assert got[0] == ref.topic
    assert got[1] == ref.mid
    assert got[3] == ref.payload
    assert got[2] == props
    if mqtt5:
        parsed = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        parsed.unpack(got[2])  # type: ignore[no-untyped-call]
        assert str(parsed) == str(ref.properties)


@given(topic=st.binary(min_size=1, max_size=40), qos=st.integers(0, 1),
       payload=st.binary(max_size=40), mqtt5=st.booleans(), data=st.data())
def test_truncated_packets_are_refused_not_misread(topic: bytes, qos: int, payload: bytes,
                                                   mqtt5: bool, data: st.DataObject) -> None:
    props = _props([("k", "v")], None) if mqtt5 else b""
    full = _packet_bytes(topic, qos, 7, props, payload)
    header = len(full) - len(payload)
    cut = data.draw(st.integers(0, header - 1))
    # A packet cut inside its header: None, so paho's own decoder reports it.
    assert split_publish(full[:cut], qos, mqtt5) is None


def test_the_payload_is_a_copy_not_a_view() -> None:
    packet = bytearray(_packet_bytes(b"t", 1, 3, b"\x00", b"payload"))
    got = split_publish(packet, 1, True)
    assert got is not None
    packet[-7:] = b"XXXXXXX"
    assert got[3] == b"payload"
    packet.extend(b"more")  # no view is left holding the buffer: it can still grow


def test_bad_properties_go_to_paho_which_reports_the_packet() -> None:
    client = _Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    got: list[object] = []
    client.on_message = lambda *args: got.append(args)
    # Property length 2, then an identifier no MQTT 5 property has.
    packet = bytearray(_packet_bytes(b"t", 1, 9, b"\x02\xff\x00", b"payload"))
    client._in_packet["command"] = 0x32
    client._in_packet["packet"] = packet
    with pytest.raises(MalformedPacket):
        client._handle_publish()
    assert got == []  # nothing half-delivered


# ---------------------------------------------------------------- reading large bodies in place


def _wire_publish(topic: bytes, qos: int, mid: int, payload: bytes) -> bytes:
    """A whole MQTT 5 PUBLISH packet (fixed header included), no properties."""
    body = _packet_bytes(topic, qos, mid, b"\x00", payload)
    n, length = len(body), bytearray()
    while True:
        byte, n = n % 128, n // 128
        length.append(byte | (0x80 if n else 0))
        if not n:
            break
    return bytes([0x30 | qos << 1]) + bytes(length) + body


class _Fed:
    """A client reading from one end of a socket pair; the test writes the other end."""

    def __init__(self) -> None:
        self.client = _Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5, manual_ack=True)
        self.got: list[mqtt.MQTTMessage] = []
        self.client.on_message = lambda client, userdata, msg: self.got.append(msg)
        self.ours, self.peer = socket.socketpair()
        self.ours.setblocking(False)
        self.peer.setblocking(False)
        self.client._sock = self.ours

    def feed(self, data: bytes) -> list[MQTTErrorCode]:
        """Write ``data`` and read as paho's loop would, until all is written and read; the
        codes ``_packet_read`` returned."""
        codes = []
        view = memoryview(data)
        while True:
            if view:  # as much as the socket buffer takes; the rest after reading
                view = view[self.peer.send(view):]
            while True:
                rc = self.client._packet_read()
                codes.append(rc)
                if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    break
            if not view or rc != MQTTErrorCode.MQTT_ERR_AGAIN:
                return codes

    def close(self) -> None:
        self.ours.close()
        self.peer.close()


@settings(max_examples=40, deadline=None)
@given(size=st.sampled_from([0, 10, transport.DIRECT_READ_MIN - 20, transport.DIRECT_READ_MIN,
                             transport.DIRECT_READ_MIN + 1, 300_000, 1_000_003]),
       qos=st.integers(0, 1), cuts=st.lists(st.floats(0.0, 1.0), max_size=6),
       data=st.data())
def test_any_split_of_large_and_small_packets_arrives_whole(
        size: int, qos: int, cuts: list[float], data: st.DataObject) -> None:
    payload = data.draw(st.binary(min_size=size, max_size=size)) if size < 100 else (
        bytes(range(256)) * (size // 256 + 1))[:size]
    first = _wire_publish(b"fedmq/v1/f/update/d1", qos, 7, payload)
    second = _wire_publish(b"t/2", qos, 8, payload[::-1])
    stream = first + second
    points = sorted({int(c * len(stream)) for c in cuts} | {0, len(stream)})
    fed = _Fed()
    try:
        for a, b in itertools.pairwise(points):
            codes = fed.feed(stream[a:b])
            assert codes[-1] == MQTTErrorCode.MQTT_ERR_AGAIN  # drained, nothing went wrong
    finally:
        fed.close()
    assert [(m.topic, m.mid if qos else 0, m.qos) for m in fed.got] == [
        ("fedmq/v1/f/update/d1", 7 if qos else 0, qos), ("t/2", 8 if qos else 0, qos)]
    assert [bytes(m.payload) for m in fed.got] == [payload, payload[::-1]]


def test_a_large_body_is_read_in_place_and_a_small_one_by_paho() -> None:
    big = _wire_publish(b"t", 1, 1, b"x" * (2 * transport.DIRECT_READ_MIN))
    fed = _Fed()
    try:
        fed.feed(big[:transport.DIRECT_READ_MIN])  # header and part of the body
        assert isinstance(fed.client._in_packet["packet"], transport._Body)
        fed.feed(big[transport.DIRECT_READ_MIN:])
        assert len(fed.got) == 1
        # The packet state is paho's empty one again, ready for the next packet.
        assert fed.client._in_packet["command"] == 0
        assert type(fed.client._in_packet["packet"]) is bytearray
        small = _wire_publish(b"t", 1, 2, b"y" * 100)
        fed.feed(small[:10])
        assert type(fed.client._in_packet["packet"]) is bytearray  # paho's own buffer
        fed.feed(small[10:])
        assert [bytes(m.payload) for m in fed.got] == [b"x" * (2 * transport.DIRECT_READ_MIN),
                                                       b"y" * 100]
    finally:
        fed.close()


def test_a_connection_closed_inside_a_large_body_is_reported_lost() -> None:
    big = _wire_publish(b"t", 1, 1, b"x" * (2 * transport.DIRECT_READ_MIN))
    fed = _Fed()
    try:
        fed.feed(big[:-5])
        fed.peer.close()
        assert fed.client._packet_read() == MQTTErrorCode.MQTT_ERR_CONN_LOST
        assert fed.got == []
    finally:
        fed.ours.close()
