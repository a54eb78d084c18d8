"""The transport's one-copy PUBLISH split against paho's own decoder."""

from __future__ import annotations

import struct

import paho.mqtt.client as mqtt
import pytest
from hypothesis import given
from hypothesis import strategies as st
from paho.mqtt import _packet
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.exception import MalformedPacket
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fedmq.transport import _Client, split_publish


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
