"""A queue bounded in bytes as well as in items: the inbox between a network thread and a
consumer (``fedmq.transport.PahoTransport``).

The broker's flow control does not bound what reaches a subscriber: Mosquitto 2.0.11 keeps
sending a client that acknowledges steadily far more than its ``max_inflight_messages``
unacknowledged messages (measured: 20 with no acks, hundreds once acks flow; docs/learning.md,
"The learning bench"). A consumer that must keep its memory bounded bounds its own inbox: the
network thread blocks in ``put`` while the inbox is full, stops reading its socket, and TCP
pushes back on the broker, which queues the rest under its own caps.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable
from typing import TypeVar

__all__ = ["ByteBoundedQueue"]

T = TypeVar("T")


class ByteBoundedQueue(queue.Queue[T]):
    """A FIFO queue holding at most ``max_bytes`` bytes of items (as ``size`` counts them) and
    at most ``maxsize`` items (0: no count limit).

    An item is admitted only while the bytes already queued plus its own fit under the cap,
    except into an empty queue: an item larger than the cap passes alone rather than never.
    ``peak_bytes`` is the most bytes the queue has held.
    """

    def __init__(self, max_bytes: int, size: Callable[[T], int], maxsize: int = 0) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1, got {max_bytes}")
        super().__init__(maxsize)
        self.max_bytes = max_bytes
        self.bytes = 0
        self.peak_bytes = 0
        self._size = size

    def _fits(self, n: int) -> bool:
        # Called with the queue's mutex held.
        if self.maxsize > 0 and self._qsize() >= self.maxsize:
            return False
        return self._qsize() == 0 or self.bytes + n <= self.max_bytes

    def put(self, item: T, block: bool = True, timeout: float | None = None) -> None:
        """Queue ``item``, waiting (as ``queue.Queue.put``) while it does not fit."""
        n = self._size(item)
        with self.not_full:
            if not block:
                if not self._fits(n):
                    raise queue.Full
            elif timeout is None:
                while not self._fits(n):
                    self.not_full.wait()
            elif timeout < 0:
                raise ValueError("'timeout' must be a non-negative number")
            else:
                end = time.monotonic() + timeout
                while not self._fits(n):
                    remaining = end - time.monotonic()
                    if remaining <= 0.0:
                        raise queue.Full
                    self.not_full.wait(remaining)
            self._put(item)
            self.unfinished_tasks += 1
            self.not_empty.notify()

    def _put(self, item: T) -> None:
        super()._put(item)
        self.bytes += self._size(item)
        self.peak_bytes = max(self.peak_bytes, self.bytes)

    def _get(self) -> T:
        item = super()._get()
        self.bytes -= self._size(item)
        # queue.Queue.get wakes one waiting put after every get; a get that frees room for
        # several waiters (or one whose item is larger than the freed space) must wake all.
        self.not_full.notify_all()
        return item
