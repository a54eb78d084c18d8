"""A minimal MQTT 3.1.1 / 5 client on asyncio, for holding thousands of sessions in one process.

Only what ``fedmq simulate`` needs: CONNECT (with a will, username/password, TLS through the
caller's ``ssl.SSLContext``), SUBSCRIBE, PUBLISH at QoS 0 and 1 both ways, PUBACK, PINGREQ and
DISCONNECT. No QoS 2, no session resumption on our side, no topic aliases, no flow control
beyond what the broker enforces. Each session is one ``asyncio.Protocol`` on one socket (no
thread, no socket pair, no task of its own): the event loop's epoll waits for all of them, so an
idle session costs memory only (docs/scaling.md, "The fleet simulator", has the measurement
against paho's external-loop API).

MQTT 5 is spoken when ``mqtt5`` is set: every packet gets an empty property list, the broker's
properties are parsed only for Maximum Packet Size, and a PUBACK or SUBACK reason code of 0x80
or above fails the corresponding future.
"""

from __future__ import annotations

import asyncio
import ssl
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["AsyncMqttClient", "ConnectOptions", "MqttError", "Will"]

CONNECT, CONNACK, PUBLISH, PUBACK = 1, 2, 3, 4
SUBSCRIBE, SUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 12, 13, 14

# MQTT 5 property identifiers and the width of their values (section 2.2.2.2): a fixed number of
# bytes, "v" a variable byte integer, "s" a length-prefixed string or binary, "p" a string pair.
_PROPERTY_WIDTH: dict[int, int | str] = {
    0x01: 1, 0x02: 4, 0x03: "s", 0x08: "s", 0x09: "s", 0x0B: "v", 0x11: 4, 0x12: "s",
    0x13: 2, 0x15: "s", 0x16: "s", 0x17: 1, 0x18: 4, 0x19: 1, 0x1A: "s", 0x1C: "s",
    0x1F: "s", 0x21: 2, 0x22: 2, 0x23: 2, 0x24: 1, 0x25: 1, 0x26: "p", 0x27: 4, 0x28: 1,
    0x29: 1, 0x2A: 1,
}
_MAXIMUM_PACKET_SIZE = 0x27


class MqttError(ConnectionError):
    """The broker refused something (a CONNACK, SUBACK or PUBACK code) or the session ended."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class Will:
    """The last will the broker publishes when the session ends without a DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True, slots=True)
class ConnectOptions:
    """What goes into CONNECT."""

    client_id: str
    keepalive: int = 60
    clean_session: bool = True
    username: str | None = None
    password: str | None = None
    will: Will | None = None
    mqtt5: bool = False


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(s: str | bytes) -> bytes:
    data = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(data)) + data


def _packet(kind: int, flags: int, body: bytes) -> bytes:
    return bytes([kind << 4 | flags]) + _varint(len(body)) + body


def _read_varint(buf: bytes | bytearray, pos: int) -> tuple[int, int]:
    """(value, position after it); raises ValueError past four bytes or the buffer's end."""
    value = shift = 0
    for i in range(4):
        byte = buf[pos + i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos + i + 1
        shift += 7
    raise ValueError("malformed variable byte integer")


def _properties(body: bytes, pos: int) -> tuple[dict[int, int], int]:
    """The integer-valued MQTT 5 properties at ``pos`` (others skipped), and the end position."""
    length, pos = _read_varint(body, pos)
    end = pos + length
    found: dict[int, int] = {}
    while pos < end:
        ident = body[pos]
        pos += 1
        width = _PROPERTY_WIDTH.get(ident)
        if width is None:
            raise ValueError(f"unknown MQTT 5 property 0x{ident:02x}")
        if isinstance(width, int):
            found[ident] = int.from_bytes(body[pos:pos + width], "big")
            pos += width
        elif width == "v":
            found[ident], pos = _read_varint(body, pos)
        else:
            for _ in range(2 if width == "p" else 1):
                pos += 2 + int.from_bytes(body[pos:pos + 2], "big")
    return found, end


MessageHandler = Callable[["AsyncMqttClient", str, bytes, bool], None]
LostHandler = Callable[["AsyncMqttClient", BaseException | None], None]


class AsyncMqttClient(asyncio.Protocol):
    """One MQTT session. ``await connect(...)``, then ``subscribe`` and ``publish``;
    ``on_message(client, topic, payload, retained)`` runs for every PUBLISH received (its PUBACK
    is sent after it returns) and ``on_lost(client, exc)`` once when the connection ends."""

    def __init__(self, options: ConnectOptions, on_message: MessageHandler,
                 on_lost: LostHandler | None = None) -> None:
        self.options = options
        self.on_message = on_message
        self.on_lost = on_lost
        #: From the broker's CONNACK (MQTT 5 only; 0 = no limit given).
        self.max_packet_size = 0
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._next_id = 0
        #: Waiting for a PUBACK (completes with the time it was read) or a SUBACK (with the
        #: first granted QoS).
        self._pending: dict[int, asyncio.Future[float]] = {}
        self._connack: asyncio.Future[int] | None = None
        self._ping: asyncio.TimerHandle | None = None
        self._last_in = 0.0
        self._closed = False

    @property
    def connected(self) -> bool:
        """True from the CONNACK until the connection ends."""
        return (self._transport is not None and not self._closed and self._connack is not None
                and self._connack.done() and not self._connack.exception())

    async def connect(self, host: str, port: int, *, ssl_context: ssl.SSLContext | None = None,
                      timeout: float = 30.0) -> None:
        """Open the socket, send CONNECT and wait for a successful CONNACK."""
        loop = asyncio.get_running_loop()
        self._connack = loop.create_future()
        await asyncio.wait_for(loop.create_connection(lambda: self, host, port, ssl=ssl_context),
                               timeout)
        self._send(self._connect_packet())
        try:
            code = await asyncio.wait_for(self._connack, timeout)
        except BaseException:
            self.close()
            raise
        if code:
            self.close()
            raise MqttError(f"CONNACK refused with code {code:#x}", code)
        self._schedule_ping()

    def _connect_packet(self) -> bytes:
        o = self.options
        v5 = o.mqtt5
        flags = 0x02 if o.clean_session else 0
        payload = _string(o.client_id)
        if o.will is not None:
            flags |= 0x04 | (o.will.qos << 3) | (0x20 if o.will.retain else 0)
            payload += (b"\0" if v5 else b"") + _string(o.will.topic) + _string(o.will.payload)
        if o.username is not None:
            flags |= 0x80
            payload += _string(o.username)
        if o.password is not None:
            flags |= 0x40
            payload += _string(o.password)
        header = _string("MQTT") + bytes([5 if v5 else 4, flags]) + struct.pack("!H", o.keepalive)
        return _packet(CONNECT, 0, header + (b"\0" if v5 else b"") + payload)

    def _packet_id(self) -> int:
        self._next_id = self._next_id % 0xFFFF + 1
        return self._next_id

    def subscribe(self, filters: list[tuple[str, int]]) -> asyncio.Future[float]:
        """SUBSCRIBE; the future gets the first granted QoS, or fails on a refusal."""
        pid = self._packet_id()
        body = struct.pack("!H", pid) + (b"\0" if self.options.mqtt5 else b"")
        for topic, qos in filters:
            body += _string(topic) + bytes([qos])
        return self._expect(pid, _packet(SUBSCRIBE, 0x2, body))

    def publish(self, topic: str, payload: bytes, qos: int = 0,
                retain: bool = False) -> asyncio.Future[float] | None:
        """PUBLISH; at QoS 1 the future completes with the PUBACK: its result is the
        ``time.monotonic()`` at which the PUBACK was read off the socket (the future's callbacks
        run later, after whatever else that read woke up), and it fails on a refusal or a lost
        connection. At QoS 0 there is nothing to wait for (None)."""
        flags = (qos << 1) | (1 if retain else 0)
        props = b"\0" if self.options.mqtt5 else b""
        if qos == 0:
            self._send(_packet(PUBLISH, flags, _string(topic) + props + payload))
            return None
        pid = self._packet_id()
        return self._expect(pid, _packet(
            PUBLISH, flags, _string(topic) + struct.pack("!H", pid) + props + payload))

    def _expect(self, pid: int, packet: bytes) -> asyncio.Future[float]:
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        if self._closed or self._transport is None:
            future.set_exception(MqttError("not connected"))
            return future
        self._pending[pid] = future
        self._send(packet)
        return future

    def disconnect(self) -> None:
        """Send DISCONNECT (the broker then drops the will) and close."""
        if self._transport is not None and not self._closed:
            self._send(_packet(DISCONNECT, 0, b"\0" if self.options.mqtt5 else b""))
        self.close()

    def close(self) -> None:
        """Close the socket without DISCONNECT (the broker publishes the will)."""
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    def _send(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    # --- keepalive: one timer per session, re-armed on each expiry -----------------------
    def _schedule_ping(self) -> None:
        if self.options.keepalive and not self._closed:
            loop = asyncio.get_running_loop()
            # Ping a little before the keepalive so the broker never sees a silent interval.
            self._ping = loop.call_later(self.options.keepalive * 0.75, self._on_ping_timer)

    def _on_ping_timer(self) -> None:
        if self._closed:
            return
        if time.monotonic() - self._last_in > self.options.keepalive * 1.5:
            # Nothing from the broker, not even our last PINGRESP: the link is dead.
            if self._transport is not None:
                self._transport.abort()
            return
        self._send(_packet(PINGREQ, 0, b""))
        self._schedule_ping()

    # --- asyncio.Protocol ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._last_in = time.monotonic()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self._ping is not None:
            self._ping.cancel()
        lost = MqttError(f"connection lost: {exc}" if exc else "connection closed")
        if self._connack is not None and not self._connack.done():
            self._connack.set_exception(lost)
        for future in self._pending.values():
            if not future.done():
                future.set_exception(lost)
        self._pending.clear()
        if self.on_lost is not None:
            self.on_lost(self, exc)

    def data_received(self, data: bytes) -> None:
        self._last_in = time.monotonic()
        buf = self._buffer
        buf += data
        pos = 0
        try:
            while len(buf) - pos >= 2:
                try:
                    length, start = _read_varint(buf, pos + 1)
                except IndexError:
                    break  # the length itself is not all here yet
                end = start + length
                if end > len(buf):
                    break
                self._dispatch(buf[pos] >> 4, buf[pos] & 0x0F, bytes(buf[start:end]))
                pos = end
        except (ValueError, IndexError, UnicodeDecodeError):
            # A broker we cannot parse: drop the session (on_lost reports it).
            if self._transport is not None:
                self._transport.abort()
        finally:
            del buf[:pos]

    def _dispatch(self, kind: int, flags: int, body: bytes) -> None:
        v5 = self.options.mqtt5
        if kind == PUBLISH:
            qos = (flags >> 1) & 3
            tlen = int.from_bytes(body[:2], "big")
            topic = bytes(body[2:2 + tlen]).decode()
            pos = 2 + tlen
            pid = 0
            if qos:
                pid = int.from_bytes(body[pos:pos + 2], "big")
                pos += 2
            if v5:
                _, pos = _properties(body, pos)
            payload = bytes(body[pos:])
            try:
                self.on_message(self, topic, payload, bool(flags & 1))
            finally:
                if qos:
                    self._send(_packet(PUBACK, 0, struct.pack("!H", pid)))
        elif kind in (PUBACK, SUBACK):
            pid = int.from_bytes(body[:2], "big")
            if kind == PUBACK:
                code = body[2] if v5 and len(body) > 2 else 0
            else:
                pos = _properties(body, 2)[1] if v5 else 2
                code = body[pos] if len(body) > pos else 0
            future = self._pending.pop(pid, None)
            if future is not None and not future.done():
                if code >= 0x80:
                    what = "PUBACK" if kind == PUBACK else "SUBACK"
                    future.set_exception(MqttError(f"{what} refused with code {code:#x}", code))
                else:
                    future.set_result(time.monotonic() if kind == PUBACK else code)
        elif kind == CONNACK:
            code = body[1]
            if v5 and len(body) > 2:
                props, _ = _properties(body, 2)
                self.max_packet_size = props.get(_MAXIMUM_PACKET_SIZE, 0)
            if self._connack is not None and not self._connack.done():
                self._connack.set_result(code)
        elif kind == DISCONNECT and self._transport is not None:
            self._transport.close()
