"""Which devices are online: the latest retained ``status/{id}`` message of each device (pure
logic: no sockets, no clock; the time of receipt is an argument).

A device publishes ``online`` when it connects, ``training`` while it trains, and ``offline`` when
it stops; the broker publishes the device's last will (``offline``) when it vanishes. The latest
message *received* on a device's topic wins, not the one with the largest ``ts``: a last will's
``ts`` is when its connection was made (docs/operations.md), so it is older than the ``online``
it supersedes. An empty retained payload (someone cleared the topic) forgets the device.

Status messages come from devices, so a bad one is data: it is counted under ``ignored`` by
reason and never raises, and it is no update rejection.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

from fedmq import codec
from fedmq.errors import DecodeError
from fedmq.wire import DeviceStatus

__all__ = ["IGNORE_REASONS", "MAX_DEVICES", "Presence", "Seen"]

#: Why a status message did not change anything (counted, never raised).
IGNORE_REASONS: tuple[str, ...] = ("malformed", "wrong_device", "wrong_federation", "full")

#: Devices tracked at most (about 150 bytes each): a flood of made-up ids cannot grow it further.
MAX_DEVICES = 1_000_000

#: Joins and leaves logged one by one per window; the rest of a window is one summary line
#: (a restart of the aggregator receives every device's retained status at once).
LOG_EACH = 10
LOG_WINDOW_S = 10.0

log = logging.getLogger("aggregator.service")

#: A status message is a few hundred bytes; anything much larger is not one.
_LIMITS = codec.DecodeLimits(max_payload_bytes=4096, max_tensors=1, max_elements=1,
                             max_entries=32)


@dataclass(frozen=True, slots=True)
class Seen:
    """A device's latest status: its state, the ``ts`` it carried and when it arrived here."""

    state: str
    ts: float
    received: float


class Presence:
    """Devices by their latest status, with the count per state kept up to date."""

    def __init__(self, federation: str, max_devices: int = MAX_DEVICES) -> None:
        self.federation = federation
        self.max_devices = max_devices
        self.devices: dict[str, Seen] = {}
        self.counts: Counter[str] = Counter()
        self.ignored: Counter[str] = Counter()
        self._window_start = -float("inf")
        self._logged = 0
        self._unlogged: Counter[str] = Counter()  # "joined" / "left" past LOG_EACH

    @property
    def online(self) -> int:
        """Devices connected now: their latest status is ``online`` or ``training``."""
        return self.counts["online"] + self.counts["training"]

    @property
    def offline(self) -> int:
        """Devices whose latest status is ``offline`` (a clean stop or their last will)."""
        return self.counts["offline"]

    def receive(self, device: str | None, payload: bytes, now: float) -> None:
        """One message from ``status/{device}`` (``device`` None: not a valid id); never raises."""
        if device is None:
            self.ignored["wrong_device"] += 1
            return
        if not payload:
            self.forget(device)
            return
        try:
            status = codec.decode_as(payload, DeviceStatus, _LIMITS)
        except DecodeError:
            self.ignored["malformed"] += 1
            return
        self.update(status, device, now)

    def update(self, status: DeviceStatus, device: str, now: float) -> bool:
        """Record ``status`` from ``status/{device}``; False (counted in ``ignored``) if it does
        not belong there."""
        if status.federation != self.federation:
            self.ignored["wrong_federation"] += 1
            return False
        if status.device_id != device:
            # The ACL lets a device write only its own topic; the payload must agree with it.
            self.ignored["wrong_device"] += 1
            return False
        old = self.devices.get(device)
        if old is None and len(self.devices) >= self.max_devices:
            self.ignored["full"] += 1
            return False
        if old is not None:
            self.counts[old.state] -= 1
        self.devices[device] = Seen(status.state, status.ts, now)
        self.counts[status.state] += 1
        was = old is not None and old.state != "offline"
        if was != (status.state != "offline"):
            self._transition(device, "left" if was else "joined", status, now)
        return True

    def _transition(self, device: str, what: str, status: DeviceStatus, now: float) -> None:
        """One INFO line per join or leave, at most ``LOG_EACH`` per window; then a summary."""
        self.tick(now)
        if self._logged < LOG_EACH:
            self._logged += 1
            how = (f"agent {status.agent_version or '?'}" if what == "joined"
                   else "offline status or last will")
            log.info("device %s %s (%s); %d online", device, what, how, self.online)
        else:
            self._unlogged[what] += 1

    def tick(self, now: float) -> None:
        """Start a new log window when the last one is over, summing up what it did not log."""
        if now - self._window_start < LOG_WINDOW_S:
            return
        if self._unlogged:
            log.info("in the last %.0f s also %s; %d devices online, %d offline", LOG_WINDOW_S,
                     ", ".join(f"{n} more {w}" for w, n in sorted(self._unlogged.items())),
                     self.online, self.offline)
        self._window_start = now
        self._logged = 0
        self._unlogged.clear()

    def forget(self, device: str) -> None:
        """Drop ``device`` (its retained status was cleared)."""
        old = self.devices.pop(device, None)
        if old is not None:
            self.counts[old.state] -= 1
