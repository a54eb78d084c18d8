"""When an agent's worker wakes: it sleeps on the inbox until a message, a wake-up (connect,
PUBACK, stop) or the next of its own timers, and says what it waits for when no round comes. A
base of ``AgentService`` (after ``OutboxDelivery``): it reads the service's state, set in its
``__init__``."""

from __future__ import annotations

import contextlib
import logging
import queue
import time
from collections.abc import Callable

from device_agent.agent import AgentMachine
from device_agent.delivery import OutboxDelivery
from fedmq.topics import Topics
from fedmq.transport import Message, PahoTransport

__all__ = ["DELIVERY_POLL_S", "IDLE_MAX_S", "ROUND_WAIT_REPEAT_S", "ROUND_WAIT_WARN_S",
           "STATUS_REFRESH_S", "AgentPacing"]

log = logging.getLogger("device_agent.service")

#: Connected this long (service clock) without a round announcement: say what the agent waits
#: for, then again at most every ``ROUND_WAIT_REPEAT_S`` while it lasts.
ROUND_WAIT_WARN_S = 3.0
ROUND_WAIT_REPEAT_S = 30.0
#: A refused model or announcement is published in the status's ``ignored`` counts at most this
#: often (a flood of forgeries must not become a flood of status messages).
STATUS_REFRESH_S = 1.0
#: The worker sleeps on the inbox until a message or its next timer; never longer than this (a
#: safety net: a missed wake-up costs at most this delay, and an idle agent one turn a minute).
IDLE_MAX_S = 60.0
#: While updates wait for their PUBACK the transport wakes the worker on each acknowledgement;
#: a transport without that hook (``MemoryTransport``) is checked this often.
DELIVERY_POLL_S = 1.0

#: Put on the inbox to wake the worker (stop, a (re)connect, a PUBACK); never handled.
_WAKE = Message("", b"")


class AgentPacing(OutboxDelivery):
    """The worker's sleep and its timers; the waiting line."""

    topics: Topics
    clock: Callable[[], float]
    subscribe_qos: int
    machine: AgentMachine
    _round_seen: bool
    _waiting_since: float | None
    _round_wait_logged: float | None
    _status_due: bool
    _status_at: float

    def wake(self) -> None:
        """Wake the worker from its sleep on the inbox (safe from any thread)."""
        with contextlib.suppress(queue.Full):  # a full inbox keeps the worker busy anyway
            self.transport.inbox.put_nowait(_WAKE)

    def check_waiting(self) -> None:
        """Connected, yet no round announcement after ``ROUND_WAIT_WARN_S``: say so (the worker
        calls this every turn; the transport itself reports an unreachable broker)."""
        if self._round_seen:
            return
        if not self.transport.wait_connected(0):
            self._waiting_since = None
            return
        now = self.clock()
        if self._waiting_since is None:
            self._waiting_since = now
        if now - self._waiting_since < ROUND_WAIT_WARN_S:
            return
        if (self._round_wait_logged is not None
                and now - self._round_wait_logged < ROUND_WAIT_REPEAT_S):
            return
        self._round_wait_logged = now
        where = (self.transport.address if isinstance(self.transport, PahoTransport)
                 else "the broker")
        log.warning("no round announcement on %s yet (connected to %s); is the aggregator "
                    "running and is the federation name right?", self.topics.round, where)
        # Subscribing again makes the broker send the retained round and model again: a
        # clustered broker can miss them for a subscription made just after their publication
        # (measured on NATS, docs/scaling.md), and nothing else would ever resend them.
        for topic in (self.topics.round, self.topics.model, self.topics.model_parts):
            self.transport.subscribe(topic, qos=self.subscribe_qos)

    def _round_wait_due(self) -> float | None:
        """When (service clock) ``check_waiting`` next has a line to log; None: not before an
        event (a connect, or the first announcement, ends the wait)."""
        if self._round_seen or self._waiting_since is None:
            return None
        due = self._waiting_since + ROUND_WAIT_WARN_S
        if self._round_wait_logged is not None:
            due = max(due, self._round_wait_logged + ROUND_WAIT_REPEAT_S)
        return due

    def _tick_due(self) -> float | None:
        """When (service clock) ``tick`` may start training on a timer: an asynchronous round's
        ``min_interval_s`` since the last start. Everything else that lets it train arrives as a
        message, which wakes the worker anyway."""
        m = self.machine
        ann = m.announcement
        if (m.training or ann is None or ann.mode != "async" or not ann.open
                or m.weights is None or m.started_at is None or m.min_interval_s <= 0):
            return None
        return m.started_at + m.min_interval_s

    def idle_timeout(self) -> float:
        """Seconds the worker may sleep on the inbox before a timer of its own is due."""
        waits = [IDLE_MAX_S]
        mono = time.monotonic()
        if self._status_due:
            waits.append(self._status_at + STATUS_REFRESH_S - mono)
        if self.transport.wait_connected(0):  # else the connect hook wakes the worker
            if self._resend_due is not None and len(self.outbox):  # nothing to resend: no turn
                waits.append(self._resend_due - mono)
            if self._deliveries:
                waits.append(DELIVERY_POLL_S)
        now = self.clock()
        for due in (self._round_wait_due(), self._tick_due()):
            if due is not None and due > now:  # past: nothing more before an event
                waits.append(due - now)
        return max(min(waits), 0.0)
