"""The transport sends small packets at once (TCP_NODELAY): without it a 100-update round's model
reached the devices 44 ms after its last update (a delayed ACK), 2 ms with it (docs/scaling.md)."""

from __future__ import annotations

import socket

from fedmq.broker import MosquittoBroker
from fedmq.transport import PahoTransport

from fedhelpers import broker_config


def test_a_connected_transport_has_tcp_nodelay(mosquitto: MosquittoBroker) -> None:
    t = PahoTransport(broker_config(mosquitto), client_id="nodelay-check")  # any client
    t.start()
    try:
        assert t.wait_connected(10)
        sock = t._client.socket()
        assert isinstance(sock, socket.socket)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        t.stop()
