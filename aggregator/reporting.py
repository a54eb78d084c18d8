"""What the aggregator tells its operator between round summaries: rate-limited log lines.

- Rejections: each one is logged at DEBUG; at INFO, one summary line per reason window
  (``reject_log_every_s``) says how many were rejected for what, and the latest detail. A flood
  of bad messages therefore writes a line a minute, not a line a message.
- Waiting: a round below quorum that has received nothing for ``FIRST_STATUS_S`` (5 s) gets one
  INFO line saying what it waits for; after ``idle_warn_s`` of silence a WARNING line, repeated
  at most that often.

The clock is an argument: ``tick(now, ...)`` is called from the worker, never from a timer.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

__all__ = ["FIRST_STATUS_S", "Reporter"]

#: Silence below quorum after which one INFO line says what the round waits for.
FIRST_STATUS_S = 5.0

log = logging.getLogger("aggregator.service")


@dataclass
class Reporter:
    """Rate-limited rejection summaries and below-quorum warnings."""

    reject_every_s: float
    idle_warn_s: float
    #: Rejections since the last summary line, and the latest one's detail.
    pending: Counter[str] = field(default_factory=Counter)
    last_detail: str = ""
    last_summary_at: float | None = None
    #: When the last message arrived on an update topic, and when the last warning went out.
    last_received_at: float | None = None
    last_warned_at: float | None = None
    quiet_since_start: bool = False
    #: The INFO line for this quiet spell was written.
    status_said: bool = False
    #: Warnings written (for tests and operators).
    idle_warnings: int = 0

    def received(self, now: float) -> None:
        """A message arrived on an update topic."""
        self.last_received_at = now
        self.quiet_since_start = False
        self.status_said = False

    def rejected(self, reason: str, device: str, update_id: str, detail: str = "") -> None:
        """Count one rejection; the single line goes to DEBUG."""
        self.pending[reason] += 1
        self.last_detail = f"{reason} from {device}" + (f": {detail}" if detail else "")
        log.debug("rejected update %r from %s: %s%s", update_id, device, reason,
                  f" ({detail})" if detail else "")

    def tick(self, now: float, *, round_: int, accepted: int, quorum: int,
             deadline: float | None, waiting: bool) -> None:
        """Write what is due at ``now``: a rejection summary, a below-quorum warning."""
        if self.last_summary_at is None:
            self.last_summary_at = now
        if self.pending and now - self.last_summary_at >= self.reject_every_s:
            self.flush(now)
        if not waiting:
            self.last_warned_at = None
            self.status_said = False
            return
        if self.last_received_at is None:  # nothing yet: count from the first waiting tick
            self.last_received_at = now
            self.quiet_since_start = True
        left = f", deadline in {deadline - now:.0f} s" if deadline is not None else ""
        if not self.status_said and now - self.last_received_at >= FIRST_STATUS_S:
            log.info("round %d waiting: %d/%d updates%s", round_, accepted, quorum, left)
            self.status_said = True
        quiet_from = max(self.last_received_at, self.last_warned_at or self.last_received_at)
        if now - quiet_from < self.idle_warn_s:
            return
        heard = ("nothing received since it started" if self.quiet_since_start
                 else f"nothing received for {now - self.last_received_at:.0f} s")
        log.warning("round %d waiting for updates: %d/%d of its quorum in, %s%s", round_,
                    accepted, quorum, heard, left)
        self.last_warned_at = now
        self.idle_warnings += 1

    def flush(self, now: float) -> None:
        """Write the rejection summary now (if anything was rejected since the last one)."""
        if self.pending:
            total = sum(self.pending.values())
            reasons = ", ".join(f"{n} {r}" for r, n in self.pending.most_common())
            window = now - self.last_summary_at if self.last_summary_at is not None else 0.0
            log.info("rejected %d update messages in the last %.0f s (%s); latest: %s", total,
                     window, reasons, self.last_detail)
            self.pending = Counter()
        self.last_summary_at = now
