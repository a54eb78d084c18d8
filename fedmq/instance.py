"""One aggregator per federation: its presence on ``fedmq/v1/{federation}/aggregator``, and the
check a starting aggregator makes before it connects with the federation's client id.

A second aggregator connecting as ``fedmq-aggregator-{federation}`` would take the first one's
session over (the broker disconnects the first, which reconnects and takes it back, twice a
second). So the running aggregator says it runs: after each connect it publishes a retained
``online`` presence, its last will (which the broker publishes as soon as the connection drops;
a kill -9 closes the socket) is the retained ``offline`` one, and a clean stop publishes that
itself. A starting aggregator first connects with a throwaway client id, reads the retained
presence and refuses to start (``AlreadyRunningError``: one line, exit code 2) when it says
``online``. Payload: a small JSON object, readable with ``mosquitto_sub``
(``docs/protocol.md``, section 1).

A broker that gives every connection of a user the same client id (``use_username_as_clientid``,
as ``production.conf`` does) gives the probe the aggregator's own client id: connecting takes the
session over whatever the probe does. With a username the probe therefore resumes the session
instead of starting a clean one (so a stopped aggregator's queued updates are kept: it neither
subscribes in a session it finds nor acknowledges anything), and waits a little: a running
aggregator takes its client id back at once, which is the sign it runs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from fedmq.config import BrokerConfig
from fedmq.errors import AlreadyRunningError
from fedmq.topics import Topics
from fedmq.transport import PahoTransport, Transport, Will

__all__ = ["AggregatorInstance", "Presence", "refuse_second_aggregator"]

log = logging.getLogger(__name__)

#: After the SUBACKs: time for a broker that sends retained messages after its SUBACK (amqtt).
PROBE_GRACE_S = 0.15
#: The least time a probe that may hold the aggregator's own client id waits to be taken over.
TAKEBACK_MIN_S = 2.0
#: The probe's session expiry when the aggregator's is shorter (MQTT 5 lets a DISCONNECT end a
#: session only if the CONNECT gave it a non-zero expiry).
PROBE_SESSION_S = 60

#: Unix time this module was imported: earlier than any aggregator this process starts.
_IMPORTED = time.time()


@dataclass(frozen=True)
class Presence:
    """What ``fedmq/v1/{federation}/aggregator`` says (JSON)."""

    state: str  # "online" or "offline"
    federation: str
    host: str
    pid: int
    #: When this aggregator process started (Unix time).
    started: float
    client_id: str

    def encode(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, payload: bytes) -> Presence | None:
        """The presence in ``payload``, or None if it is not one (empty: cleared)."""
        try:
            data = json.loads(payload)
            return cls(state=str(data["state"]), federation=str(data["federation"]),
                       host=str(data["host"]), pid=int(data["pid"]),
                       started=float(data["started"]), client_id=str(data["client_id"]))
        except (ValueError, TypeError, KeyError):
            return None

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started))
        return f"host {self.host}, pid {self.pid}, started {started}"


class AggregatorInstance:
    """This aggregator process's presence messages (the birth and the will of its transport)."""

    def __init__(self, federation: str, clock: Callable[[], float] = time.time) -> None:
        self.topics = Topics(federation)
        self.federation = federation
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.started = clock()
        self.client_id = f"fedmq-aggregator-{federation}"

    def presence(self, state: str) -> Presence:
        return Presence(state, self.federation, self.host, self.pid, self.started,
                        self.client_id)

    def birth(self) -> Will:
        """Retained ``online``, published after each connect."""
        return Will(self.topics.aggregator, self.presence("online").encode())

    def will(self) -> Will:
        """Retained ``offline``: the last will, and published on a clean stop."""
        return Will(self.topics.aggregator, self.presence("offline").encode())

    @property
    def duplicate_hint(self) -> str:
        """The end of the transport's duplicate-client-id line."""
        return (f"is a second aggregator running for federation {self.federation!r}? Stop it "
                "(one aggregator per federation)")


def _is_stale(other: Presence) -> bool:
    """An ``online`` left behind by a process of this host that no longer runs."""
    if other.host != socket.gethostname():
        return False
    if other.pid == os.getpid():
        # Ours, or from before this process (a container restarted with its hostname and its
        # pid 1): an aggregator of this very process started after its modules were imported.
        return other.started < _IMPORTED
    try:
        os.kill(other.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _latest(probe: PahoTransport, topic: str) -> Presence | None:
    """The newest presence received on ``topic`` so far (None: none, or it was cleared)."""
    latest: Presence | None = None
    while not probe.inbox.empty():
        msg = probe.inbox.get_nowait()
        if msg.topic == topic:
            latest = Presence.decode(msg.payload)
    return latest


def _refuse(other: Presence, broker: BrokerConfig, topic: str) -> AlreadyRunningError:
    auth = " (with your credentials)" if broker.username is not None else ""
    return AlreadyRunningError(
        f"another aggregator is running for federation {other.federation!r} ({other.describe()}) "
        f"on {broker.host}:{broker.port}: refusing to start a second one; stop that one first. If "
        f"it is gone, clear its presence{auth}: mosquitto_pub -h {broker.host} -p {broker.port} "
        f"-t {topic} -r -n")


def refuse_second_aggregator(transport: Transport, federation: str,
                             connect_timeout: float = 30.0) -> None:
    """Raise ``AlreadyRunningError`` if another aggregator runs for ``federation`` on the
    broker of ``transport`` (a ``PahoTransport``; any other transport has no other clients).

    Waits up to ``connect_timeout`` for the broker (``ConnectionError`` after it), then about
    0.2 s; with a username (the broker may give this probe the aggregator's own client id)
    at least ``TAKEBACK_MIN_S`` more.
    """
    if not isinstance(transport, PahoTransport):
        return
    broker = dataclasses.replace(transport.broker, client_id=None)
    topics = Topics(federation)
    shared_id = broker.username is not None
    if shared_id and not broker.mqtt5:
        # MQTT 3.1.1 has no session expiry: a clean probe would end a stopped aggregator's
        # session (its queued updates), a persistent one would leave a session behind.
        log.info("not checking for another aggregator (MQTT 3.1.1 with a username)")
        return
    expiry = max(transport.session_expiry_s, PROBE_SESSION_S) if broker.mqtt5 else 0
    probe = PahoTransport(broker, f"fedmq-probe-{federation}-{secrets.token_hex(4)}",
                          manual_ack=True, session_expiry_s=expiry, inbox_size=0, quiet=True)
    probe.start()
    try:
        if not probe.wait_connected(connect_timeout):
            raise ConnectionError(f"aggregator could not connect to the broker at "
                                  f"{broker.host}:{broker.port} within {connect_timeout:.0f} s; "
                                  "check [broker] in the config and that the broker runs"
                                  + (f" (last error: {probe.last_error})"
                                     if probe.last_error else ""))
        if not probe.session_present:
            # Subscribed twice: the second SUBACK comes after the first subscription's retained
            # message on the same connection.
            probe.subscribe(topics.aggregator, qos=0)
            probe.subscribe(topics.aggregator, qos=0)
            deadline = time.monotonic() + 5.0
            while probe.subacks < 2 and probe.connected and time.monotonic() < deadline:
                time.sleep(0.005)
            time.sleep(PROBE_GRACE_S)
            other = _latest(probe, topics.aggregator)
            if other is not None and other.state == "online":
                if not _is_stale(other):
                    raise _refuse(other, broker, topics.aggregator)
                log.info("the presence of aggregator pid %d on this host is stale (it no "
                         "longer runs): starting", other.pid)
        if shared_id:
            _wait_for_takeback(probe, broker, topics)
    finally:
        # A session the probe found is the aggregator's own: keep it. Its own session: end it.
        probe.stop(end_session=not probe.session_present)


def _wait_for_takeback(probe: PahoTransport, broker: BrokerConfig, topics: Topics) -> None:
    """Refuse if, while we hold it, a running aggregator takes its client id back."""
    end = time.monotonic() + max(TAKEBACK_MIN_S, 2 * broker.reconnect_min_s + 1.0)
    while time.monotonic() < end:
        if probe.drops:
            raise AlreadyRunningError(
                f"another aggregator is running for federation {topics.federation!r} on "
                f"{broker.host}:{broker.port}: it took its client id back from this one's check "
                f"(the broker gives every connection of user {broker.username!r} the same "
                "client id); refusing to start a second one; stop that one first")
        other = _latest(probe, topics.aggregator)
        if other is not None and other.state == "online" and not _is_stale(other):
            raise _refuse(other, broker, topics.aggregator)
        time.sleep(0.02)
