"""Secure aggregation's codec: round trips, every truncated prefix, malformed payloads, and
random byte mutants that must decode or raise DecodeError and nothing else."""

from __future__ import annotations

import random
from typing import Any

import msgpack
import pytest

from fedmq.errors import DecodeError
from fedmq.secagg import codec
from fedmq.secagg.crypto import KeyPair
from fedmq.secagg.messages import (
    SEALED_BYTES,
    SecAggDelivery,
    SecAggKeys,
    SecAggMasked,
    SecAggMessage,
    SecAggReveal,
    SecAggRoster,
    SecAggShares,
    SecAggTopics,
    SecAggUnmask,
)
from fedmq.secagg.shamir import SHARE_BYTES

K1 = KeyPair(bytes(range(32))).public
K2 = KeyPair(bytes(range(1, 33))).public
SEALED = bytes(range(SEALED_BYTES))
SHARE = bytes(SHARE_BYTES - 1) + b"\x07"
HEAD: dict[str, Any] = {"federation": "fed", "run": 5, "round": 3}

MESSAGES: list[SecAggMessage] = [
    SecAggKeys(**HEAD, device="d1", c_key=K1, s_key=K2),
    SecAggRoster(**HEAD, devices=(("d1", K1, K2), ("d2", K2, K1), ("d3", K1, K1)), degree=2,
                 threshold=2, graph_seed=b"seed", frac_bits=22, clip=4.0, weight_cap=100.0,
                 size=11),
    SecAggShares(**HEAD, device="d1", commitment=bytes(32), shares={"d2": SEALED, "d3": SEALED}),
    SecAggDelivery(**HEAD, device="d2", shares={"d1": SEALED}),
    SecAggMasked(**HEAD, device="d1", offset=4, size=11, data=bytes(range(28))),
    SecAggUnmask(**HEAD, survivors=("d1", "d2"), dropped=("d3",)),
    SecAggReveal(**HEAD, device="d2", b_shares={"d1": SHARE}, s_shares={"d3": SHARE}),
]


def _norm(m: SecAggMessage) -> SecAggMessage:
    if isinstance(m, SecAggMasked):
        return SecAggMasked(m.federation, m.run, m.round, m.device, m.offset, m.size,
                            bytes(m.data))
    return m


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip_and_every_truncation(msg: SecAggMessage) -> None:
    raw = codec.encode(msg)
    assert _norm(codec.decode(raw)) == msg
    for n in range(len(raw)):
        with pytest.raises(DecodeError):
            codec.decode(raw[:n])


def _patched(i: int, **change: Any) -> bytes:
    m = msgpack.unpackb(codec.encode(MESSAGES[i]), raw=False)
    for k, v in change.items():
        if v is None:
            del m[k]
        else:
            m[k] = v
    out: bytes = msgpack.packb(m, use_bin_type=True)
    return out


MALFORMED = {
    "keys short key": _patched(0, c=K1[:31]),
    "keys device level": _patched(0, device="a/b"),
    "keys device wildcard": _patched(0, device="+"),
    "keys missing s": _patched(0, s=None),
    "keys round negative": _patched(0, round=-1),
    "roster unsorted": _patched(1, devices=[["d2", K1, K2], ["d1", K1, K2]]),
    "roster repeated": _patched(1, devices=[["d1", K1, K2], ["d1", K1, K2]]),
    "roster entry short": _patched(1, devices=[["d1", K1]]),
    "roster k too big": _patched(1, k=3),
    "roster t zero": _patched(1, t=0),
    "roster t over k": _patched(1, t=3),
    "roster frac bits": _patched(1, frac_bits=31),
    "roster clip nan": _patched(1, clip=float("nan")),
    "roster cap negative": _patched(1, weight_cap=-1.0),
    "roster seed long": _patched(1, seed=bytes(65)),
    "roster size one": _patched(1, size=1),
    "shares sealed short": _patched(2, shares={"d2": SEALED[:-1]}),
    "shares to itself": _patched(2, shares={"d1": SEALED}),
    "shares commit short": _patched(2, commit=bytes(31)),
    "shares key not str": _patched(2, shares={7: SEALED}),
    "masked odd bytes": _patched(4, data=bytes(27)),
    "masked empty": _patched(4, data=b""),
    "masked past size": _patched(4, offset=5),
    "masked offset at size": _patched(4, offset=11),
    "masked data not bin": _patched(4, data="text"),
    "unmask overlap": _patched(5, dropped=["d1"]),
    "unmask repeated": _patched(5, survivors=["d1", "d1"]),
    "reveal both": _patched(6, s={"d1": SHARE}),
    "reveal share long": _patched(6, b={"d1": SHARE + b"\x00"}),
    "wrong kind": _patched(0, kind="update"),
    "wrong version": _patched(0, v=2),
    "not a map": msgpack.packb([1, 2, 3]),
    "garbage": b"\xc1\xff\x00",
}


@pytest.mark.parametrize("payload", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_is_a_decode_error(payload: bytes) -> None:
    with pytest.raises(DecodeError) as info:
        codec.decode(payload)
    assert info.value.reason == "malformed"


def test_oversize_reason() -> None:
    limits = codec.SecAggLimits(max_payload_bytes=10)
    with pytest.raises(DecodeError) as info:
        codec.decode(codec.encode(MESSAGES[0]), limits)
    assert info.value.reason == "oversize"
    few = codec.SecAggLimits(max_devices=2)
    with pytest.raises(DecodeError):
        codec.decode(codec.encode(MESSAGES[1]), few)


def test_random_mutants_decode_or_raise_decode_error() -> None:
    rnd = random.Random(12)
    kept = 0
    for i in range(4000):
        raw = bytearray(codec.encode(MESSAGES[i % len(MESSAGES)]))
        for _ in range(rnd.randint(1, 4)):
            op = rnd.randrange(3)
            pos = rnd.randrange(len(raw))
            if op == 0:
                raw[pos] ^= 1 << rnd.randrange(8)
            elif op == 1:
                del raw[pos]
            else:
                raw.insert(pos, rnd.randrange(256))
        try:
            codec.decode(bytes(raw))
            kept += 1
        except DecodeError:
            pass
    assert kept < 4000  # most mutants are refused; the rest decoded to well-formed messages


def test_topics() -> None:
    t = SecAggTopics("fed")
    assert t.keys("d1") == "fedmq/v1/fed/secagg/keys/d1"
    assert t.device_of(t.masked("d9")) == ("masked", "d9")
    assert t.device_of(t.roster) is None
    assert t.device_of("fedmq/v1/fed/secagg/masked/a/b") is None
    assert t.device_of("fedmq/v1/fed/update/d1") is None
