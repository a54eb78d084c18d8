"""The MQTT seam: with ``fedmq.paho_client`` (paho's client with a leaner receive path), the
only module that imports paho.

``PahoTransport`` owns one paho client and its network thread (``loop_start``). Before every
reconnect attempt (after a refused or failed connect, a lost connection, a missed keepalive, a
socket select() cannot watch) paho waits the delay we give it: a jittered exponential back-off
(paho's own doubles without jitter, so a fleet that lost its broker would come back in
lockstep). The thread sleeps until the network, the keepalive or a stop wakes it
(``fedmq.paho_client``): an idle connection costs a wake-up per keepalive, not per second. Paho
callbacks only convert the message to our ``Message`` and put it on ``inbox``; all real work
happens on the caller's threads. ``fedmq.memory_transport.MemoryTransport`` is an in-process
fake with the same surface for logic tests.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import random
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from fedmq.backoff import Backoff
from fedmq.config import BrokerConfig
from fedmq.errors import BrokerError
from fedmq.inbox import ByteBoundedQueue
from fedmq.paho_client import _Client

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Message:
    """One received MQTT message, in our own type (paho's objects stay inside this module)."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    #: paho's message id, for ``ack`` when the transport acknowledges manually.
    mid: int = 0


@dataclass(frozen=True, slots=True)
class Will:
    """The last will the broker publishes if this client vanishes."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


class Delivery:
    """What became of one publish: ``done()`` once the broker acknowledged it (QoS 1 PUBACK).

    Wraps paho's ``MQTTMessageInfo`` (``Delivery(None)`` is already done: ``MemoryTransport``).
    Not done yet is not failed: paho keeps an unacknowledged QoS 1 message in memory and
    resends it after a reconnect, within this process only. An MQTT 5 PUBACK that carries an
    error reason code counts as done too (paho reports no reason code here).
    """

    __slots__ = ("_info",)

    def __init__(self, info: mqtt.MQTTMessageInfo | None) -> None:
        self._info = info

    def done(self) -> bool:
        """True once the broker acknowledged the message (for QoS 0: once it was written)."""
        info = self._info
        if info is None:
            return True
        if info.rc == mqtt.MQTT_ERR_NO_CONN:
            # Published while disconnected: paho queued it and sends it on connect, but its
            # is_published() raises for this rc even after the PUBACK; read the flag itself.
            return bool(info._published)
        try:
            return info.is_published()
        except (ValueError, RuntimeError):  # paho refused it (queue full, ...): never sent
            return False


class Transport(Protocol):
    """What the services need from MQTT."""

    inbox: queue.Queue[Message]
    max_packet_size: int | None

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def subscribe(self, topic: str, qos: int = 1) -> None: ...
    def publish(self, topic: str, payload: bytes, qos: int = 1,
                retain: bool = False) -> Delivery: ...
    def wait_connected(self, timeout: float) -> bool: ...
    def ack(self, msg: Message) -> None: ...


def _no_delay(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    """Send small packets at once (TCP_NODELAY). Without it a message's last segment can wait up
    to 40 ms for the peer's delayed ACK (Nagle): measured, a 100-update round's model reached
    the devices 44 ms after its last update, against 2 ms with it (docs/scaling.md)."""
    with contextlib.suppress(OSError, AttributeError):  # not TCP (a Unix socket), or closed
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def describe_connect_error(exc: BaseException) -> str:
    """A short, operator-facing reason a TCP (or TLS) connect failed."""
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host name: {exc.strerror or exc}"
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timed out"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc}"
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


#: The broker's MQTT 5 DISCONNECT reason when another client connected with our client id.
SESSION_TAKEN_OVER = 0x8E
#: A connection dropped sooner than this after its CONNACK counts as a quick drop; this many
#: quick drops in a row (MQTT 3.1.1 gives no reason) mean another client shares our id.
QUICK_DROP_S = 2.0
QUICK_DROPS = 3
#: At most one "waiting for the broker" line per this many seconds, and one duplicate-id line
#: per ``DUPLICATE_REPEAT_S``.
WAITING_REPEAT_S = 30.0
DUPLICATE_REPEAT_S = 60.0
#: How long ``stop()`` waits for the broker to acknowledge a farewell.
FAREWELL_WAIT_S = 2.0
#: How often paho's thread, waiting for room in a full inbox, checks whether we are stopping.
INBOX_WAIT_S = 0.1


def _payload_size(msg: Message) -> int:
    return len(msg.payload)


class PahoTransport:
    """A paho-mqtt client with its own network thread and jittered reconnects.

    What it waits for is logged: one WARNING when the broker cannot be reached (then at most one
    per ``WAITING_REPEAT_S`` while that lasts), one INFO line per successful connect, and one
    ERROR (at most per ``DUPLICATE_REPEAT_S``) when another client uses the same client id,
    ending with ``duplicate_hint`` (what to do about it). ``quiet``: the connect and disconnect
    lines at DEBUG and no duplicate line (a short-lived helper connection).

    ``will`` may be a callable: it is called before each connection attempt, so the last will
    can carry the connect time. ``birth`` (also a message or a callable) is published after
    each connect: with a retained will on the same topic, the topic says whether this client is
    online. ``farewell``: ``stop()`` publishes the will itself before disconnecting (a clean
    disconnect makes the broker discard it).
    """

    def __init__(
        self,
        broker: BrokerConfig,
        client_id: str,
        *,
        will: Will | Callable[[], Will] | None = None,
        on_connect: Callable[[], None] | None = None,
        inbox_size: int = 10_000,
        inbox_bytes: int | None = None,
        seed: int | None = None,
        manual_ack: bool = False,
        session_expiry_s: int = 0,
        birth: Will | Callable[[], Will] | None = None,
        farewell: bool = False,
        duplicate_hint: str = "every MQTT client needs its own client id",
        quiet: bool = False,
        on_published: Callable[[], None] | None = None,
    ) -> None:
        self.broker = broker
        self.client_id = broker.client_id or client_id
        # manual_ack: QoS 1 messages are acknowledged only by ack(), i.e. once the consumer has
        # made them durable; session_expiry_s > 0: a persistent session, so the broker queues
        # messages while this client is away (both for the aggregator, see docs/operations.md).
        self.manual_ack = manual_ack
        self.session_expiry_s = session_expiry_s
        # Bounded: when the consumer falls behind, the network thread blocks and TCP pushes back
        # on the broker instead of this process growing without limit. inbox_bytes bounds the
        # payload bytes too: the broker's in-flight cap does not (see fedmq.inbox).
        self.inbox: queue.Queue[Message] = (
            queue.Queue(maxsize=inbox_size) if inbox_bytes is None
            else ByteBoundedQueue(inbox_bytes, _payload_size, maxsize=inbox_size))
        self._on_connect_hook = on_connect
        self._subscriptions: dict[str, int] = {}
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._stopping = threading.Event()
        self._started = False
        self._backoff = Backoff(broker.reconnect_min_s, broker.reconnect_max_s,
                                random.Random(seed))
        #: Where to connect: ``[broker] host:port``, then each ``failover`` node in turn.
        self._endpoints = [(broker.host, broker.port)] + [
            (h, int(p)) for h, _, p in (e.rpartition(":") for e in broker.failover)]
        self._endpoint = 0
        self.connects = 0
        #: The delays (seconds) of the latest reconnect waits, oldest first.
        self.reconnect_delays: deque[float] = deque(maxlen=64)
        self.last_error: str | None = None
        #: The broker's Maximum Packet Size from CONNACK (MQTT 5), None when it sets none.
        self.max_packet_size: int | None = None
        # What-we-wait-for lines (monotonic times; see the class docstring).
        self._clock: Callable[[], float] = time.monotonic
        self._failing_since: float | None = None
        self._waiting_logged: float | None = None
        self._connected_at: float | None = None
        self._quick_drops = 0
        self._connack = False  # the current connection attempt got its CONNACK
        self._duplicate_logged: float | None = None
        #: Times another client was seen using our client id.
        self.duplicate_id_seen = 0
        #: Connections the broker (or the network) ended, and SUBACKs received.
        self.drops = 0
        self.subacks = 0
        #: The CONNACK's session-present flag of the latest connect.
        self.session_present = False
        self._will = will
        self._birth = birth
        self._farewell = farewell
        self._duplicate_hint = duplicate_hint
        self._info = logging.DEBUG if quiet else logging.INFO
        self._quiet = quiet

        protocol = mqtt.MQTTv5 if broker.mqtt5 else mqtt.MQTTv311
        persistent = session_expiry_s > 0
        self._client = _Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                               protocol=protocol, manual_ack=manual_ack,
                               clean_session=None if broker.mqtt5 else not persistent)
        if broker.username is not None:
            self._client.username_pw_set(broker.username, broker.password)
        if broker.tls:
            self._client.tls_set(ca_certs=broker.ca_file, certfile=broker.cert_file,
                                 keyfile=broker.key_file, cert_reqs=ssl.CERT_REQUIRED)
        if not callable(will):  # a callable will is built before each connection attempt
            self._set_will()
        self._wire(on_published)

    def _wire(self, on_published: Callable[[], None] | None) -> None:
        """paho's hooks and callbacks: all of them land in this object's handlers."""
        c = self._client
        c.before_connect = self._before_connect
        c.reconnect_delay = self._next_reconnect_delay
        c.after_publish = on_published
        c.on_connect = self._handle_connect
        c.on_socket_open = _no_delay
        c.on_connect_fail = self._handle_connect_fail
        c.on_disconnect = self._handle_disconnect
        c.on_message = self._handle_message
        c.on_subscribe = self._handle_subscribe

    def _before_connect(self) -> None:
        self._connack = False
        self._set_will()

    def _set_will(self) -> None:
        will = self._will() if callable(self._will) else self._will
        if will is not None:
            self._client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)

    @property
    def address(self) -> str:
        """``host:port`` of the broker (the failover node tried last), for log lines."""
        host, port = self._endpoints[self._endpoint]
        return f"{host}:{port}"

    # ---- paho callbacks: run on the network thread, so they only record and enqueue

    def _handle_connect(self, client: mqtt.Client, userdata: Any, flags: Any,
                        reason: ReasonCode, properties: Any) -> None:
        self._connack = True
        if reason.is_failure:
            self.last_error = f"broker refused the connection: {reason}"
            log.warning("%s: %s", self.client_id, self.last_error)
            return
        log.log(self._info, "connected to %s as %s", self.address, self.client_id)
        self.session_present = bool(getattr(flags, "session_present", False))
        self._failing_since = self._waiting_logged = None
        self._connected_at = self._clock()
        birth = self._birth() if callable(self._birth) else self._birth
        if birth is not None:
            client.publish(birth.topic, birth.payload, qos=birth.qos, retain=birth.retain)
        # paho does not enforce the broker's limit; an oversize publish is dropped or gets us
        # disconnected, so remember it and let senders chunk below it.
        self.max_packet_size = getattr(properties, "MaximumPacketSize", None)
        with self._lock:
            subs = list(self._subscriptions.items())
        for topic, qos in subs:  # a clean session forgets subscriptions: renew them each time
            client.subscribe(topic, qos)
        self.connects += 1
        self._backoff.reset()
        self._connected.set()
        if self._on_connect_hook is not None:
            self._on_connect_hook()

    def _handle_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any,
                           reason: ReasonCode, properties: Any) -> None:
        self._connected.clear()
        if not self._stopping.is_set():
            self.drops += 1
            log.log(self._info, "%s: disconnected (%s)", self.client_id, reason)
            self._check_duplicate(reason)
            if self._client.fd_error is not None:
                self.last_error = self._client.fd_error
            elif not self._connack:
                # A broker out of file descriptors accepts the TCP connection and closes it
                # at once, saying nothing to the client: say what that looks like.
                self._waiting("the broker closed the connection before accepting it (no "
                              "CONNACK): is it out of file descriptors or connections? "
                              "see its log")

    def _handle_subscribe(self, client: mqtt.Client, userdata: Any, mid: int,
                          reasons: Any, properties: Any) -> None:
        self.subacks += 1

    def _check_duplicate(self, reason: ReasonCode) -> None:
        """Report, in one line, a broker that keeps handing our session to another client."""
        now = self._clock()
        lived = None if self._connected_at is None else now - self._connected_at
        self._connected_at = None
        taken_over = reason.value == SESSION_TAKEN_OVER
        if lived is not None and lived < QUICK_DROP_S:
            self._quick_drops += 1
        else:
            self._quick_drops = 0
        if not taken_over and self._quick_drops < QUICK_DROPS:
            return
        self.duplicate_id_seen += 1
        if self._quiet or (self._duplicate_logged is not None
                           and now - self._duplicate_logged < DUPLICATE_REPEAT_S):
            return
        self._duplicate_logged = now
        log.error("another client is connected with client id %s (the broker handed it our "
                  "session): %s", self.client_id, self._duplicate_hint)

    def _handle_message(self, client: mqtt.Client, userdata: Any,
                        msg: mqtt.MQTTMessage) -> None:
        message = Message(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain), msg.mid)
        while True:
            try:
                self.inbox.put(message, timeout=INBOX_WAIT_S)
                return
            except queue.Full:
                # A full inbox holds paho's thread (and so the socket); stop() must not wait
                # on it. A message dropped here was never acknowledged when acks are manual.
                if self._stopping.is_set():
                    return

    def _handle_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        error = self._client.connect_error
        self._waiting(describe_connect_error(error) if error is not None else "cannot connect")

    def _waiting(self, why: str) -> None:
        """A connection attempt failed: remember why, and say so (at most every
        ``WAITING_REPEAT_S``)."""
        self.last_error = f"cannot reach {self.address}: {why}"
        now = self._clock()
        if self._failing_since is None:
            self._failing_since = now
        if self._waiting_logged is None or now - self._waiting_logged >= WAITING_REPEAT_S:
            self._waiting_logged = now
            log.warning("waiting for the broker at %s (%s); retrying with back-off",
                        self.address, why)

    def _next_reconnect_delay(self) -> float:
        """paho's network thread asks this before every reconnect attempt (each one a failed
        attempt for the back-off; a CONNACK resets it)."""
        delay = max(self._backoff.next_delay(), 0.05)
        self.reconnect_delays.append(delay)
        if len(self._endpoints) > 1:
            self._next_endpoint()
        log.debug("%s: reconnecting in %.2f s (attempt %d)", self.client_id, delay,
                  self._backoff.attempt)
        return delay

    def _next_endpoint(self) -> None:
        """Point the next attempt at the next node of ``[broker] failover`` (paho's thread calls
        this between attempts, the socket closed)."""
        i = (self._endpoint + 1) % len(self._endpoints)
        host, port = self._endpoints[i]
        try:
            self._client.retarget(host, port)
        except RuntimeError:  # still open after all: stay on the current node
            return
        self._endpoint = i
        log.log(self._info, "%s: trying the next broker node, %s", self.client_id, self.address)

    # ---- public surface

    def start(self) -> None:
        """Start paho's network thread; it connects (and reconnects) in the background."""
        if self._started:
            raise BrokerError("transport already started")
        self._started = True
        # All socket writes happen on paho's own thread (loop_start): publishing from another
        # thread while a hand-rolled loop() also writes interleaved packets on the wire.
        properties = None
        clean_start: bool | Literal[3] = mqtt.MQTT_CLEAN_START_FIRST_ONLY
        if self.broker.mqtt5 and self.session_expiry_s > 0:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = self.session_expiry_s
            clean_start = False
        self._client.connect_async(self.broker.host, self.broker.port,
                                   keepalive=self.broker.keepalive, clean_start=clean_start,
                                   properties=properties)
        self._client.loop_start()

    def ack(self, msg: Message) -> None:
        """Acknowledge a QoS 1 message received with ``manual_ack`` (after it is durable)."""
        if self.manual_ack and msg.qos > 0:
            self._client.ack(msg.mid, msg.qos)

    def wait_connected(self, timeout: float) -> bool:
        """Block until connected (or ``timeout`` seconds); True if connected."""
        return self._connected.wait(timeout)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def subscribe(self, topic: str, qos: int = 1) -> None:
        """Subscribe now if connected, and again after every reconnect."""
        with self._lock:
            self._subscriptions[topic] = qos
        if self._connected.is_set():
            self._client.subscribe(topic, qos)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> Delivery:
        """Queue a publish; paho sends it when connected (QoS 1 is resent after a reconnect).

        Returns a ``Delivery`` whose ``done()`` turns true once the broker acknowledged it.
        Raises ``BrokerError`` if the packet would exceed the broker's Maximum Packet Size.
        """
        self._check_size(topic, payload)
        return Delivery(self._client.publish(topic, payload, qos=qos, retain=retain))

    def _check_size(self, topic: str, payload: bytes) -> None:
        limit = self.max_packet_size
        # Fixed header (5) + topic (2 + len) + packet id (2) + properties (1): a safe upper bound.
        if limit is not None and len(payload) + len(topic.encode()) + 10 > limit:
            raise BrokerError(f"a {len(payload)}-byte publish on {topic} exceeds the broker's "
                              f"maximum packet size of {limit} bytes; lower max_chunk_bytes")

    def stop(self, *, end_session: bool = False) -> None:
        """Disconnect cleanly (so no last will is sent) and stop the network thread.

        With ``farewell`` the will is published first (waiting up to ``FAREWELL_WAIT_S`` for
        its PUBACK). ``end_session``: an MQTT 5 persistent session ends with this disconnect
        instead of waiting on the broker for ``session_expiry_s``.
        """
        self._stopping.set()
        if self._started:
            was_connected = self._connected.is_set()
            will = self._will() if callable(self._will) else self._will
            if self._farewell and was_connected and will is not None:
                info = self._client.publish(will.topic, will.payload, qos=will.qos,
                                            retain=will.retain)
                deadline = time.monotonic() + FAREWELL_WAIT_S
                while not Delivery(info).done() and time.monotonic() < deadline:
                    time.sleep(0.005)
            properties = None
            if end_session and self.broker.mqtt5 and self.session_expiry_s > 0:
                properties = Properties(PacketTypes.DISCONNECT)  # type: ignore[no-untyped-call]
                properties.SessionExpiryInterval = 0
            self._client.disconnect(properties=properties)
            if was_connected:
                # Let paho's thread send the DISCONNECT and close the socket before it stops.
                deadline = time.monotonic() + 2.0
                while self._client.socket() is not None and time.monotonic() < deadline:
                    time.sleep(0.005)
            self._client.loop_stop()
            # loop_start opened a loopback socket pair that paho closes only in __del__; when
            # the client dies in a reference cycle the sockets may be finalised first and warn
            # (ResourceWarning). Close them, and the connection if still open, now.
            self._client._reset_sockets()
            self._started = False
        self._connected.clear()


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT filter matching with ``+`` and ``#``."""
    return bool(mqtt.topic_matches_sub(topic_filter, topic))
