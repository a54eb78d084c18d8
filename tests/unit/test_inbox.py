"""The byte-bounded inbox (fedmq.inbox)."""

from __future__ import annotations

import queue

import pytest

from fedmq.inbox import ByteBoundedQueue


def _q(max_bytes: int, maxsize: int = 0) -> ByteBoundedQueue[bytes]:
    return ByteBoundedQueue(max_bytes, len, maxsize=maxsize)


def test_items_are_admitted_while_their_bytes_fit_under_the_cap() -> None:
    q = _q(10)
    q.put(b"abcd")
    q.put(b"efgh")
    assert q.bytes == 8
    with pytest.raises(queue.Full):
        q.put(b"xyz", block=False)  # 8 + 3 > 10
    with pytest.raises(queue.Full):
        q.put(b"xyz", timeout=0)
    q.put(b"xy", block=False)  # exactly at the cap
    assert q.bytes == 10
    assert q.qsize() == 3


def test_a_get_makes_room_and_order_is_kept() -> None:
    q = _q(10)
    for item in (b"aaaa", b"bbbb", b"cc"):
        q.put(item)
    assert q.get() == b"aaaa"
    assert q.bytes == 6
    q.put(b"dddd", block=False)
    assert [q.get_nowait() for _ in range(3)] == [b"bbbb", b"cc", b"dddd"]
    assert q.bytes == 0
    assert q.peak_bytes == 10


def test_an_item_larger_than_the_cap_passes_alone_into_an_empty_queue() -> None:
    q = _q(10)
    q.put(b"x" * 25, block=False)
    assert q.bytes == 25
    with pytest.raises(queue.Full):
        q.put(b"y", block=False)  # nothing else while it is there
    assert q.get_nowait() == b"x" * 25
    q.put(b"y", block=False)
    assert q.peak_bytes == 25


def test_the_item_count_cap_still_holds() -> None:
    q = _q(1000, maxsize=2)
    q.put(b"a")
    q.put(b"b")
    with pytest.raises(queue.Full):
        q.put(b"c", block=False)
    assert q.full()


def test_empty_items_count_against_the_item_cap_only() -> None:
    q = _q(1, maxsize=3)
    q.put(b"a")
    q.put(b"")  # fits: 1 + 0 <= 1
    q.put(b"")
    with pytest.raises(queue.Full):
        q.put(b"", block=False)


def test_a_cap_below_one_byte_is_refused() -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        _q(0)

