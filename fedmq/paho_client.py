"""paho's MQTT client with a receive path that copies large messages less (``_Client``).

Used by ``fedmq.transport.PahoTransport`` only; a transport module (it imports paho). What it
changes and why is in ``_Client``'s docstring; ``split_publish`` is the cut it uses.

Besides the receive path, ``_Client`` changes how paho's network thread waits (see its
docstring, "Waiting"): it sleeps until the keepalive needs it instead of waking every second,
every wait before a reconnect takes its delay from the caller (jittered back-off), and a socket
that ``select()`` cannot watch (file descriptor 1024 or above) is reported loudly.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import cast

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode, _ConnectionState
from paho.mqtt.exception import MalformedPacket
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

log = logging.getLogger("fedmq.transport")


def split_publish(packet: bytes | bytearray, qos: int, mqtt5: bool,
                  ) -> tuple[bytes, int, bytes, bytes] | None:
    """Cut the variable part of a PUBLISH into (topic, packet id, properties, payload).

    ``properties`` holds the property length and the properties, undecoded (empty before MQTT
    5). Each part is copied out once. None when the packet is malformed, so the caller can let
    paho's own decoder raise its usual error.
    """
    view = memoryview(packet)
    try:
        if len(view) < 2:
            return None
        end = 2 + int.from_bytes(view[:2], "big")
        if end > len(view):
            return None
        topic = bytes(view[2:end])
        mid = 0
        if qos > 0:
            if len(view) < end + 2:
                return None
            mid = int.from_bytes(view[end:end + 2], "big")
            end += 2
        props = b""
        if mqtt5:
            # Property length: a variable byte integer of at most 4 bytes.
            length, mult, i = 0, 1, end
            while True:
                if i >= len(view) or i - end >= 4:
                    return None
                byte = view[i]
                length += (byte & 0x7F) * mult
                mult *= 128
                i += 1
                if not byte & 0x80:
                    break
            if i + length > len(view):
                return None
            props = bytes(view[end:i + length])
            end = i + length
        return topic, mid, props, bytes(view[end:])
    finally:
        view.release()


#: The paho internals the one-copy receive path uses; a paho without them gets paho's own path.
_FAST_PUBLISH = all(hasattr(mqtt.Client, name) for name in
                    ("_handle_publish", "_handle_on_message", "_send_puback"))


#: The paho internals the direct body read uses (with those of ``_FAST_PUBLISH``).
_FAST_READ = _FAST_PUBLISH and all(hasattr(mqtt.Client, name) for name in
                                   ("_packet_read", "_packet_handle", "_sock_recv",
                                    "_call_socket_register_write"))

#: paho's keepalive clock (``time.monotonic`` in paho 2.x): the receive time must use the same.
_paho_clock: Callable[[], float] = getattr(mqtt, "time_func", time.monotonic)

#: Packets whose body is at least this long are read straight into one buffer of their size.
DIRECT_READ_MIN = 64 * 1024

#: ``select()`` watches file descriptors below this only (glibc's FD_SETSIZE); paho's network
#: loop uses ``select()``, so a client whose socket got a higher number cannot work.
FD_SETSIZE = 1024
#: The longest the network thread sleeps when the keepalive does not need it sooner (keepalive
#: off, or a very long one): only a safety net, sockets and the wake-up pipe wake it anyway.
MAX_WAIT_S = 300.0
#: Added to a keepalive deadline so the thread wakes just after it, not a hair before (paho
#: compares with ``>=``; waking early would mean a second wake-up right after).
KEEPALIVE_SLACK_S = 0.01

_fd_limit_logged = False
_fd_limit_lock = threading.Lock()


def fd_limit_message(fd: int) -> str:
    """The one line that says why a client with socket ``fd`` cannot work."""
    return (f"MQTT socket got file descriptor {fd}, but paho's network loop uses select(), "
            f"which only handles descriptors below {FD_SETSIZE} (FD_SETSIZE): this process "
            f"holds too many open files (about {FD_SETSIZE // 3} paho clients per process at "
            "3 descriptors each). Run fewer MQTT clients per process; the client retries with "
            "back-off but cannot connect while that lasts")


def _fileno(sock: object) -> int:
    try:
        return int(sock.fileno()) if sock is not None else -1  # type: ignore[attr-defined]
    except (OSError, ValueError):  # closed meanwhile: paho's own path reports it
        return -1


class _LargeBody(Exception):  # noqa: N818 (a signal between two methods, not an error)
    """Raised by ``_Client._sock_recv`` to take a large packet body away from paho's loop."""


class _Body(bytearray):
    """A packet body being read in place: ``filled`` bytes of it have arrived."""

    filled = 0


class _Client(mqtt.Client):
    """paho's client with a receive path that copies a large inbound packet less.

    Reading: paho receives a packet body with ``recv(remaining)``, allocating a buffer of the
    whole remaining size on every call, then appends each piece to a growing ``bytearray``
    (a 1 MB update arrives in about six pieces on loopback: three or four copies of it, and six
    1 MB allocations). A body of ``DIRECT_READ_MIN`` bytes or more is instead read with
    ``recv_into`` straight into one buffer of its final size (one copy, from the kernel); the
    header and small packets stay with paho's code, and so does any socket without
    ``recv_into`` (websockets).

    Cutting: paho 2.x slices the payload out of an inbound PUBLISH with ``struct.unpack`` once
    per header field and again while it strips the MQTT 5 properties: five or more copies of a
    1 MB update per message, on the network thread, which the aggregator measured as a third of
    that thread's time. QoS 0 and 1 messages are cut with ``split_publish`` instead and then
    handled exactly as paho's own ``_handle_publish`` does (callback, then PUBACK unless
    acknowledged manually); QoS 2 and anything malformed go to paho's code unchanged.

    Waiting: paho's ``loop_forever`` calls ``_loop`` with a 1 s select() timeout and checks the
    keepalive after each, so an idle client woke every second; here the timeout is the time to
    the next keepalive deadline (a PINGREQ to send, or an unanswered one to give up on), and
    what other threads send wakes select() through paho's socket pair as before. paho's wait
    before a reconnect (1 s sleeps, its own unjittered doubling) becomes one sleep of
    ``reconnect_delay()`` that ``disconnect()``/``loop_stop()`` cut short. A socket select()
    cannot watch (``FD_SETSIZE``) made paho retry at once, silently (select() raised, no
    on_disconnect): it is one ERROR per process and an ordinary disconnect instead.
    """

    #: Called before each connection attempt (refreshes the last will) and with the error of
    #: a failed one; set by ``PahoTransport``.
    before_connect: Callable[[], None] | None = None
    connect_error: BaseException | None = None
    #: Called (network thread) for the delay before each reconnect attempt, on every path
    #: that leads to one: a failed connect, a lost connection, a socket select() cannot watch.
    #: None: paho's own doubling delay.
    reconnect_delay: Callable[[], float] | None = None
    #: Called (network thread) after a QoS>0 publish was acknowledged (its
    #: ``MQTTMessageInfo`` already says so, unlike in paho's own on_publish).
    after_publish: Callable[[], None] | None = None
    #: Set when this client's socket was beyond select()'s reach (``fd_limit_message``).
    fd_error: str | None = None
    _stop_wait: threading.Event | None = None

    # ---- waiting: paho's loop thread sleeps until the network, a keepalive or a stop wakes it

    def _keepalive_wait(self) -> float:
        """Seconds until paho's keepalive check (``loop_misc``) has something to do: send a
        PINGREQ, or give up on an unanswered one. paho itself checks once per ``_loop``, whose
        select() times out after 1 s, so an idle connection woke its thread every second."""
        keepalive = self._keepalive
        if keepalive <= 0:
            return MAX_WAIT_S
        with self._msgtime_mutex:
            last = min(self._last_msg_out, self._last_bytes_received)
        if self._ping_t > 0:
            last = min(last, self._ping_t)
        wait = last + keepalive - _paho_clock() + KEEPALIVE_SLACK_S
        return min(max(wait, 0.0), float(keepalive), MAX_WAIT_S)

    def _loop(self, timeout: float = 1.0) -> MQTTErrorCode:
        if self._sock is not None:
            fd = max(_fileno(self._sock), _fileno(self._sockpairR))  # both go to select()
            if fd >= FD_SETSIZE:
                return self._fd_out_of_range(fd)
        # loop_forever passes paho's 1 s; what is sent from other threads wakes select()
        # through paho's socket pair, and what arrives through the socket itself.
        return super()._loop(self._keepalive_wait())

    def _fd_out_of_range(self, fd: int) -> MQTTErrorCode:
        """paho would let select() raise, call it a lost connection without telling anyone
        (no on_disconnect) and reconnect at once, again and again: report it, once per process
        at ERROR, and end the connection the ordinary way (our back-off applies)."""
        global _fd_limit_logged
        self.fd_error = fd_limit_message(fd)
        with _fd_limit_lock:
            first, _fd_limit_logged = not _fd_limit_logged, True
        log.log(logging.ERROR if first else logging.DEBUG, "%s", self.fd_error)
        self._sock_close()
        self._state = _ConnectionState.MQTT_CS_CONNECTION_LOST
        self._do_on_disconnect(packet_from_broker=False, v1_rc=MQTTErrorCode.MQTT_ERR_CONN_LOST)
        return MQTTErrorCode.MQTT_ERR_CONN_LOST

    def _reconnect_wait(self) -> None:
        """Wait the caller's delay (``reconnect_delay``) before the next attempt, in one sleep
        that ``disconnect()`` or ``loop_stop()`` cut short (paho's own wakes every second)."""
        if self.reconnect_delay is None:
            super()._reconnect_wait()
            return
        delay = self.reconnect_delay()
        stop = self._stop_wait
        if stop is None:
            stop = self._stop_wait = threading.Event()
        if self._thread_terminate or self._state in (
                _ConnectionState.MQTT_CS_DISCONNECTING,
                _ConnectionState.MQTT_CS_DISCONNECTED):
            return
        stop.wait(delay)

    def retarget(self, host: str, port: int) -> None:
        """Send the next connect attempt to ``host:port`` (``[broker] failover``). Called between
        attempts, with the socket closed; paho's own ``host``/``port`` setters refuse while its
        loop is reconnecting."""
        if self._sock is not None:
            raise RuntimeError("a connection is open")
        self._host, self._port = host, port

    def _wake(self) -> None:
        if self._stop_wait is not None:
            self._stop_wait.set()
        sockpair = self._sockpairW
        if sockpair is not None:  # cut a select() short: the loop then sees it must stop
            with contextlib.suppress(OSError):
                sockpair.send(b"0")

    def loop_start(self) -> MQTTErrorCode:
        self._stop_wait = threading.Event()
        return super().loop_start()

    def loop_stop(self) -> MQTTErrorCode:
        self._thread_terminate = True
        self._wake()
        return super().loop_stop()

    def disconnect(self, reasoncode: ReasonCode | None = None,
                   properties: Properties | None = None) -> MQTTErrorCode:
        rc = super().disconnect(reasoncode, properties)
        self._wake()
        return rc

    def _do_on_publish(self, mid: int, reason_code: ReasonCode,
                       properties: Properties) -> MQTTErrorCode:
        rc = super()._do_on_publish(mid, reason_code, properties)
        if self.after_publish is not None:
            self.after_publish()
        return rc

    def reconnect(self) -> MQTTErrorCode:
        if self.before_connect is not None:
            self.before_connect()
        self.connect_error = None
        try:
            return super().reconnect()
        except OSError as exc:  # paho's loop reports it as on_connect_fail, without the error
            self.connect_error = exc
            raise

    def _sock_recv(self, bufsize: int) -> bytes:
        p = self._in_packet
        if (_FAST_READ and bufsize >= DIRECT_READ_MIN and p["have_remaining"]
                and bufsize == p["to_process"] and not p["packet"]
                and isinstance(self._sock, (socket.socket, ssl.SSLSocket))):
            # paho asks for a large body it has not started: _packet_read reads it instead.
            raise _LargeBody
        return super()._sock_recv(bufsize)

    def _packet_read(self) -> MQTTErrorCode:
        p = self._in_packet
        if not isinstance(p["packet"], _Body):
            try:
                return super()._packet_read()
            except _LargeBody:
                p["packet"] = _Body(p["to_process"])
        return self._read_body()

    def _read_body(self) -> MQTTErrorCode:
        """Continue reading a large body in place; then hand the packet on as paho does."""
        p = self._in_packet
        body = cast(_Body, p["packet"])
        # A plain or TLS socket (checked in _sock_recv before the body was taken over).
        sock = cast(socket.socket | None, self._sock)
        if sock is None:
            return MQTTErrorCode.MQTT_ERR_NO_CONN
        with memoryview(body) as view:
            while p["to_process"] > 0:
                try:
                    n = sock.recv_into(view[body.filled:])
                except (BlockingIOError, ssl.SSLWantReadError):
                    return MQTTErrorCode.MQTT_ERR_AGAIN
                except ssl.SSLWantWriteError:
                    self._call_socket_register_write()
                    return MQTTErrorCode.MQTT_ERR_AGAIN
                except OSError as err:
                    log.debug("failed to receive on socket: %s", err)
                    return MQTTErrorCode.MQTT_ERR_CONN_LOST
                if n == 0:
                    return MQTTErrorCode.MQTT_ERR_CONN_LOST
                body.filled += n
                p["to_process"] -= n
                self._mark_received()
        p["pos"] = 0
        try:
            rc = self._packet_handle()
        except MalformedPacket as exc:
            log.debug("received a malformed packet: %s", exc)
            rc = MQTTErrorCode.MQTT_ERR_PROTOCOL
        self._in_packet = {"command": 0, "have_remaining": 0, "remaining_count": [],
                           "remaining_mult": 1, "remaining_length": 0, "packet": bytearray(),
                           "to_process": 0, "pos": 0}
        self._mark_received()
        return rc

    def _mark_received(self) -> None:
        # paho's keepalive reads this to decide whether the connection is alive.
        with self._msgtime_mutex:
            self._last_bytes_received = _paho_clock()

    def _handle_publish(self) -> MQTTErrorCode:
        if not _FAST_PUBLISH:
            return super()._handle_publish()
        header = self._in_packet["command"]
        qos = (header & 0x06) >> 1
        mqtt5 = self._protocol == mqtt.MQTTv5
        parts = split_publish(self._in_packet["packet"], qos, mqtt5) if qos < 2 else None
        if parts is None or (not mqtt5 and not parts[0]):
            return super()._handle_publish()
        topic, mid, props, payload = parts
        message = mqtt.MQTTMessage(mid=mid, topic=topic)
        message.dup = bool(header & 0x08)
        message.qos = qos
        message.retain = bool(header & 0x01)
        if mqtt5:
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            try:
                properties.unpack(props)  # type: ignore[no-untyped-call]
            except Exception:  # bad properties: paho's own decoder reports the packet
                return super()._handle_publish()
            message.properties = properties
        message.payload = payload
        message.timestamp = time.monotonic()
        self._handle_on_message(message)
        if qos == 0 or self._manual_ack:
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        return self._send_puback(mid)

