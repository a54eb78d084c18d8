"""Delivery of update messages through the device's outbox (``AgentService``'s part that
talks to the broker about updates).

Every update message (each chunk) is written to the ``Outbox`` before it is published and
removed once the broker acknowledged it (its ``Delivery`` is done; the worker checks every
turn). What is still there is published again: at start-up (left by an earlier process) and
after every (re)connect. On a reconnect, messages never handed to paho go at once; those paho
holds (it resends unacknowledged QoS 1 messages itself after a reconnect, in this process) are
published again only if still unacknowledged ``RESEND_GRACE_S`` later, which spares a duplicate
in the common case. Duplicates are harmless: the aggregator rejects them as ``duplicate``.
"""

from __future__ import annotations

import logging
import threading
import time

from device_agent.outbox import Outbox, OutboxFullError
from fedmq.errors import BrokerError
from fedmq.transport import Delivery, Transport

__all__ = ["RESEND_GRACE_S", "OutboxDelivery"]

log = logging.getLogger(__name__)

#: After a reconnect, how long paho gets to resend what it holds before the outbox resends it.
RESEND_GRACE_S = 5.0


class OutboxDelivery:
    """Publishes updates through the outbox and keeps them there until acknowledged. A base of
    ``AgentService``: it needs ``transport`` and ``device_id``, and calls ``_init_delivery``."""

    transport: Transport
    device_id: str

    def _init_delivery(self, outbox: Outbox) -> None:
        self.outbox = outbox
        #: Update messages the broker acknowledged, updates all of whose messages it did,
        #: messages published from the outbox again (after a restart or a reconnect), and
        #: updates sent without the outbox (larger than it, or a disk error).
        self.messages_acked = 0
        self.updates_acked = 0
        self.messages_resent = 0
        self.updates_unbuffered = 0
        self._deliveries: dict[str, Delivery] = {}  # outbox key -> its latest publish
        # Connections seen by pump_outbox, and on which one each key was last published: the
        # resend after a reconnect is for what an earlier connection left unacknowledged, not
        # for an update published since, whose PUBACK is merely still on its way.
        self._connection = 0
        self._published_on: dict[str, int] = {}
        self._connected_again = threading.Event()  # set by the transport's connect hook
        self._resend_due: float | None = None

    def pump_outbox(self) -> None:
        """Forget acknowledged messages; after a (re)connect, publish what is still unsent.

        Called by the worker every turn (cheap when there is nothing to do).
        """
        self._sweep()
        if not self.transport.wait_connected(0):
            return  # the connect hook sets _connected_again: we come back then
        if self._connected_again.is_set():
            self._connected_again.clear()
            self._connection += 1
            self._resend_due = time.monotonic() + RESEND_GRACE_S
            self._publish_pending(unsent_only=True)
        if self._resend_due is not None and time.monotonic() >= self._resend_due:
            self._resend_due = None
            self._publish_pending(unsent_only=False)

    def _sweep(self) -> None:
        for key, delivery in list(self._deliveries.items()):
            if key not in self.outbox:  # dropped to make room for a newer update
                del self._deliveries[key]
                self._published_on.pop(key, None)
            elif delivery.done():
                del self._deliveries[key]
                self._published_on.pop(key, None)
                self.messages_acked += 1
                if self.outbox.remove(key):
                    self.updates_acked += 1

    def _publish_pending(self, *, unsent_only: bool) -> None:
        """Publish the outbox's messages never handed to the transport (and, unless
        ``unsent_only``, those handed to it on an earlier connection and still not
        acknowledged), oldest first."""
        todo = [k for k in self.outbox.pending_keys()
                if k not in self._deliveries
                or (not unsent_only and not self._deliveries[k].done()
                    and self._published_on.get(k, 0) < self._connection)]
        for key in todo:
            item = self.outbox.get(key)
            if item is None:
                continue
            self.messages_resent += 1
            self._publish_entry(key, *item)
        if todo:
            log.info("device %s: published %d outbox messages again", self.device_id, len(todo))

    def _publish_entry(self, key: str, topic: str, payload: bytes) -> None:
        try:
            self._deliveries[key] = self.transport.publish(topic, payload, qos=1)
            self._published_on[key] = self._connection
        except BrokerError as exc:  # too large for this broker: kept, tried again on connect
            self._deliveries.pop(key, None)
            log.warning("device %s: cannot publish outbox message %s: %s", self.device_id, key,
                        exc)

    def _send_update(self, update_id: str, messages: list[tuple[str, bytes]]) -> None:
        """Store an update's messages in the outbox, then publish them (if connected)."""
        try:
            keys = self.outbox.put_update(update_id, messages)
        except (OutboxFullError, OSError) as exc:  # larger than the outbox, or a disk error
            self.updates_unbuffered += 1
            log.warning("device %s: update %s sent without the outbox (not kept until "
                        "acknowledged): %s", self.device_id, update_id, exc)
            for topic, payload in messages:
                self.transport.publish(topic, payload, qos=1)
            return
        if self.transport.wait_connected(0):
            for key, (topic, payload) in zip(keys, messages, strict=True):
                self._publish_entry(key, topic, payload)
            self._sweep()
        # else: published by pump_outbox once the transport (re)connects
