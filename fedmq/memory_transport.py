"""An in-process fake of the transport seam (``fedmq.transport.Transport``) for logic tests:
clients joined by a ``MemoryHub`` that routes by MQTT topic filters and keeps retained messages.
No sockets, no threads: a publish is delivered to the subscribers' inboxes on the spot."""

from __future__ import annotations

import queue

from fedmq.transport import Delivery, Message, topic_matches

__all__ = ["MemoryHub", "MemoryTransport"]


class MemoryTransport:
    """An in-process fake transport for logic tests: a tiny broker with retained messages."""

    def __init__(self, hub: MemoryHub | None = None) -> None:
        self.hub = hub or MemoryHub()
        self.inbox: queue.Queue[Message] = queue.Queue()
        self.published: list[Message] = []
        self.acked: list[Message] = []
        self.max_packet_size: int | None = None
        #: Every filter subscribed to, with the QoS it was last asked for.
        self.subscriptions: dict[str, int] = {}

    def start(self) -> None:
        self.hub.clients.append(self)

    def stop(self) -> None:
        if self in self.hub.clients:
            self.hub.clients.remove(self)

    def wait_connected(self, timeout: float) -> bool:
        return self in self.hub.clients

    def ack(self, msg: Message) -> None:
        self.acked.append(msg)

    def subscribe(self, topic: str, qos: int = 1) -> None:
        self.subscriptions[topic] = qos
        self.hub.subscribe(self, topic)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> Delivery:
        msg = Message(topic, payload, qos, retain)
        self.published.append(msg)
        self.hub.route(msg)
        return Delivery(None)  # delivered on the spot


class MemoryHub:
    """Routes messages between ``MemoryTransport`` clients by MQTT topic filters."""

    def __init__(self) -> None:
        self.clients: list[MemoryTransport] = []
        self.filters: list[tuple[MemoryTransport, str]] = []
        self.retained: dict[str, Message] = {}

    def subscribe(self, client: MemoryTransport, topic_filter: str) -> None:
        self.filters.append((client, topic_filter))
        for topic, msg in self.retained.items():
            if topic_matches(topic_filter, topic):
                client.inbox.put(msg)

    def route(self, msg: Message) -> None:
        if msg.retain:
            self.retained[msg.topic] = msg
        live = Message(msg.topic, msg.payload, msg.qos, False)
        for client, topic_filter in self.filters:
            if topic_matches(topic_filter, msg.topic):
                client.inbox.put(live)
